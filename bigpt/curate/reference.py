"""The perplexity stage's reference model: a bigpt checkpoint scoring documents, one process.

A document is scored as the trainer sees it: its tokens after an end-of-document token and
followed by one, cut into windows of the model's ``seq_length``; its perplexity is exp of the
mean next-token loss (nats, softmax over the real vocabulary, not the embedding's padding rows)
over its first ``max_tokens`` predicted tokens. The model runs in fp32 at TP = PP = 1
(megatron-core groups of one), on the GPU when there is one.

No datatrove here: ``check_reference`` runs before any work starts, on any machine.
"""

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bigpt.checkpoint import store
from bigpt.errors import BigptError
from bigpt.paths import not_a_file

KEY = "stage.perplexity"


@dataclass(frozen=True)
class ReferenceFiles:
    checkpoint: Path
    """An intact checkpoint (a directory of them resolved to its newest)."""
    tokenizer: Path


def check_reference(checkpoint: str, tokenizer: str | None) -> ReferenceFiles:
    """Resolve and check the reference model's files without loading the model; BigptError
    naming the recipe key on any problem."""
    from bigpt.data.checks import check_vocab
    from bigpt.data.tokenizer import load_tokenizer
    from bigpt.hf.convert import checkpoint_model

    path = store.checkpoint_at(
        Path(checkpoint), f"{KEY}.checkpoint", alternatives="e.g. a run of a small model on trusted text"
    )
    model = checkpoint_model(path)
    found = Path(tokenizer) if tokenizer else _tokenizer_of(path)
    if found is None:
        raise BigptError(
            f"{KEY}.tokenizer is not set and checkpoint {path} names no tokenizer (no "
            "data.tokenizer in its recipe.toml, no tokenizer.json in its Hugging Face files); "
            f"set {KEY}.tokenizer to the tokenizer its model was trained with."
        )
    if why := not_a_file(found):
        raise BigptError(
            f"{KEY}.tokenizer {found} {why}; set {KEY}.tokenizer to the tokenizer checkpoint {path} was trained with."
        )
    check_vocab(load_tokenizer(found).vocab_size, model.vocab_size, f"{found} ({KEY}.tokenizer)")
    return ReferenceFiles(path, found)


def _tokenizer_of(checkpoint: Path) -> Path | None:
    """The tokenizer a trained checkpoint's run used, or an import's tokenizer.json."""
    from bigpt.hf.convert import hf_files_of

    recipe = checkpoint / "recipe.toml"
    if recipe.is_file():
        named = tomllib.loads(recipe.read_text()).get("data", {}).get("tokenizer")
        if named:
            return Path(named)
    hf_files = hf_files_of(checkpoint)
    if hf_files and (hf_files / "tokenizer.json").is_file():
        return hf_files / "tokenizer.json"
    return None


class ReferenceModel:
    """Use as a context manager: the model and its process groups live inside the block."""

    def __init__(self, files: ReferenceFiles, *, max_tokens: int, batch_size: int, task: int = 0):
        self.files, self.max_tokens, self.batch_size = files, max_tokens, batch_size
        self.task = task  # picks the GPU: the local workers of a node share its GPUs round-robin

    def __enter__(self) -> "ReferenceModel":
        import torch

        from bigpt.data.tokenizer import load_tokenizer
        from bigpt.runtime.device import device, on_gpu
        from bigpt.runtime.distributed import model_parallel_of_one

        if on_gpu():
            torch.cuda.set_device(self.task % torch.cuda.device_count())
        self._groups = model_parallel_of_one()
        self._groups.__enter__()
        try:
            self.tokenizer = load_tokenizer(self.files.tokenizer)
            self.model, self.seq_length, self.vocab_size = _load_model(self.files.checkpoint)
            self.device = device()
        except BaseException:
            self._groups.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        del self.model
        self._groups.__exit__(*exc)

    def perplexities(self, texts: list[str]) -> list[float]:
        import torch

        eod = self.tokenizer.eod
        windows = []  # (document, tokens of one window + the token after it)
        for document, text in enumerate(texts):
            ids = ([eod] + self.tokenizer.encode(text) + [eod])[: self.max_tokens + 1]
            windows += [
                (document, ids[start : start + self.seq_length + 1])
                for start in range(0, len(ids) - 1, self.seq_length)
            ]
        loss = [0.0] * len(texts)
        count = [0] * len(texts)
        for first in range(0, len(windows), self.batch_size):
            batch = windows[first : first + self.batch_size]
            width = max(len(ids) for _, ids in batch) - 1
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.zeros_like(tokens)
            for row, (_, ids) in enumerate(batch):  # padded at the end: causal attention ignores it
                tokens[row, : len(ids) - 1] = torch.tensor(ids[:-1])
                labels[row, : len(ids) - 1] = torch.tensor(ids[1:])
            with torch.no_grad():
                logits = self.model(tokens.to(self.device), torch.arange(width, device=self.device).unsqueeze(0), None)
                # over the real vocabulary: the rows padding the embedding are no tokens
                losses = (
                    torch.nn.functional.cross_entropy(
                        logits[..., : self.vocab_size].flatten(0, 1).float(),
                        labels.to(self.device).flatten(),
                        reduction="none",
                    )
                    .view(len(batch), width)
                    .double()
                    .cpu()
                )
            for row, (document, ids) in enumerate(batch):
                loss[document] += losses[row, : len(ids) - 1].sum().item()
                count[document] += len(ids) - 1
        return [math.exp(total / n) for total, n in zip(loss, count)]


def _load_model(checkpoint: Path):
    """The checkpoint's model at TP = PP = 1 in fp32 (built on the GPU when there is one), weights
    loaded; its sequence length and (unpadded) vocabulary size."""
    from bigpt.checkpoint import load_weights
    from bigpt.hf.convert import checkpoint_model
    from bigpt.layout import Layout
    from bigpt.model import build_model_chunks
    from bigpt.recipe.tables import OptimizerConfig, PrecisionConfig, Recipe, TrainConfig
    from bigpt.runtime.seeding import seed_everything

    model_config = checkpoint_model(checkpoint)
    recipe = Recipe(
        name="perplexity_reference",
        model=model_config,
        precision=PrecisionConfig(dtype="fp32"),
        train=TrainConfig(global_batch_size=1, train_iters=1),
        optimizer=OptimizerConfig(lr=1.0),
    )
    seed_everything(recipe.train.seed)  # megatron-core's tensor-parallel RNG stream must exist
    (model,), _ = build_model_chunks(recipe, Layout.from_recipe(recipe, 1))
    load_weights([model], checkpoint, model_config.vocab_size)
    model.eval()
    return model, model_config.seq_length, model_config.vocab_size
