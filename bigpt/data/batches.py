"""Micro-batches for one data-parallel rank, in Megatron's pretraining-sampler order.

The global sample stream is ``dataset[consumed_samples], dataset[consumed_samples + 1], ...``.
Each micro-batch step takes the next ``micro_batch_size × dp_size`` samples and data-parallel
rank ``r`` gets slice ``[r × mbs, (r + 1) × mbs)``. So what is trained on depends only on the
seed and the samples consumed so far: resuming, or resuming at another dp size, continues the
same stream.
"""

from collections.abc import Iterator

import torch

from bigpt.errors import BigptError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def micro_batches(
    dataset, *, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches on CPU: ``BATCH_KEYS`` (a masked-LM dataset's ``MASKED_BATCH_KEYS``) →
    ``[micro_batch_size, seq_length]``.

    tokens, labels and position_ids are int64, loss_mask float32. The iterator raises
    BigptError once the dataset cannot fill another full step (it is sized for the run when
    built). ``num_workers`` processes read ahead; the order stays the same.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
    indices = _rank_indices(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=indices,
        collate_fn=_collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # Each iterator draws its workers' base seed from this generator; without one it draws from
        # torch's default CPU generator, which is also dropout's on CPU: every new iterator (a resume,
        # each evaluation) would move the training's dropout masks. The order is the sampler's alone.
        generator=torch.Generator().manual_seed(0),
    )
    return _until_exhausted(loader, len(dataset))


def _until_exhausted(loader, length: int):
    yield from loader
    raise BigptError(
        f"the dataset has {length} samples and all were consumed; the training split is built for "
        "the samples of train.train_iters steps and the validation split for one evaluation "
        "(eval.iters × train.global_batch_size samples, read from its first sample at every "
        "evaluation), so a run past them needs the datasets built again for the longer run"
    )


def _rank_indices(length: int, start: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> Iterator[list[int]]:
    """This rank's sample indices per micro-batch; ends before a step the dataset cannot fill."""
    step = micro_batch_size * dp_size
    first = start
    while first + step <= length:
        mine = first + dp_rank * micro_batch_size
        yield list(range(mine, mine + micro_batch_size))
        first += step


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    # Blended datasets add a "dataset_id"; the batch carries only what the model step reads
    # (BATCH_KEYS, or a masked-LM dataset's MASKED_BATCH_KEYS).
    return {key: torch.stack([sample[key] for sample in samples]) for key in samples[0] if key != "dataset_id"}


def on_model_device(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with every tensor on ``model``'s device: batches are built on the CPU, and every
    forward pass (training, evaluation, logits) hands its inputs to the model through here."""
    device = next(model.parameters()).device
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
