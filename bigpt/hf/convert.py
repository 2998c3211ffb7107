"""Hugging Face directory ⇄ bigpt checkpoint, through megatron-core ``dist_checkpointing``.

Import writes each parameter once, whole, under its global key (per-layer parameters as
one-layer slices of the stacked tensor), so ``load_weights`` reshards it to any TP/PP/VPP; the
embedding and output layer are stored unpadded and megatron-core pads them to the layout's
vocabulary size on load. Export reads a checkpoint of any layout back one layer at a time.
Both run in an existing process group: a tool runs a group of one, a training job converts
with all of its ranks, each writing a share of the tensors. Neither holds the model in memory:
import makes each tensor only when torch's writer reaches it, export reads one layer at a time
(bench/hf_import_memory.py measures both, for a dense model and an MoE).
"""

import contextlib
import itertools
import json
import os
import shutil
import tomllib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import WriteItemType

import bigpt
from bigpt.checkpoint import store
from bigpt.data.vocab_extension import VocabExtension, extension_tokenizer, read_extension
from bigpt.errors import BigptError
from bigpt.hf.bert import fresh_head_note, usable_positions
from bigpt.hf.config import hf_from_model
from bigpt.hf.files import (
    CONFIG,
    KEPT_AS_STORED,
    SENTENCEPIECE_FILES,
    TOKENIZER_FILES,
    SafetensorsWeights,
    copy_side_files,
    exported_bytes,
    exported_dtype,
    inspect_hf,
    plan_shards,
    read_config,
    write_shards,
)
from bigpt.hf.mapping import Rule, expected_hf_shapes, rules
from bigpt.hf.t5 import INPUT_LENGTH
from bigpt.paths import OVERWRITE, partial_dir, reporting_a_full_disk, write_atomically
from bigpt.recipe import ModelConfig, table_to_toml
from bigpt.recipe.tables import EncoderConfig, EncoderDecoderConfig, MLAConfig, MoEConfig
from bigpt.runtime import console

HF_FILES = "hf"  # inside an imported checkpoint: the source's config and tokenizer files
MODEL_TOML = "model.toml"  # inside an imported checkpoint: its [model] table, a recipe fragment
DEFAULT_SHARD_BYTES = 5 * 2**30


Item = tuple[Rule, int | None, int | None]
"""(rule, layer, expert): one megatron tensor, or one layer's or one expert's slice of it."""


def _items(model: dict, config: dict | None) -> list[Item]:
    """Every (rule, layer, expert) of ``model`` in the Hugging Face form ``config`` describes, in
    Hugging Face's order (embedding, layers, norm, head)."""
    embedding, *table = rules(model, config)  # rules() lists the embedding first
    per_layer = [
        (rule, layer, expert)
        for rule in table
        if rule.per_layer
        for layer, expert in rule.instances(model["num_layers"])
    ]
    layers = sorted(per_layer, key=lambda item: item[1] or 0)  # a stable sort: each layer's in the rules' order
    return [(embedding, None, None)] + layers + [(rule, None, None) for rule in table if not rule.per_layer]


def _sharded(item: Item, tensor: torch.Tensor, num_layers: int) -> ShardedTensor:
    """``tensor`` as the global tensor of ``item``, or its one-layer or one-expert slice."""
    rule, layer, _ = item
    # A real leading axis of size 1 per slice rather than megatron's prepend_axis_num: with the
    # latter, megatron-core 0.16 cannot read a single layer back (it expects the whole grid locally).
    slices = _sliced_axes(item, num_layers)
    for _ in slices:
        tensor = tensor.unsqueeze(0)
    offsets = [(axis, index, count) for axis, (index, count) in enumerate(slices)]
    return ShardedTensor.from_rank_offsets(rule.checkpoint_key(layer), tensor, *offsets, replica_id=0)


def _sliced_axes(item: Item, num_layers: int) -> list[tuple[int, int]]:
    """(index, size) of each leading axis ``item`` is one slice of: the layer axis of a stacked
    tensor (the dense decoder; an MoE model keys its layers by number), then the expert axis."""
    rule, layer, expert = item
    axes = []
    if layer is not None and rule.checkpoint_key(layer) == rule.key:  # a stack of all of rule.layers (T5's encoder)
        axes.append((layer, num_layers if rule.layers is None else len(rule.layers)))
    if expert is not None:
        axes.append((expert, rule.experts))
    return axes


class _MadeWhenWritten(MCoreSavePlanner):
    """megatron-core's planner, but a tensor's data is ``makers[key, global offset]()``, called
    when the writer reaches it (the state dict holds placeholders without storage)."""

    def __init__(self, makers: dict):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.makers = makers

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:  # megatron-core's common state
            return super().resolve_data(write_item)
        return self.makers[write_item.index.fqn, tuple(write_item.index.offset)]()


class _Streamed(TorchDistSaveShardedStrategy):
    """megatron-core's torch_dist format (translated as its own save translates it), written by
    torch's writer one file per tensor: its one-file-per-rank mode keeps every tensor of the file
    alive until the file is closed, which would hold a rank's whole share of the model again."""

    def __init__(self, makers: dict):
        super().__init__()
        self.makers = makers

    def save(self, sharded_state_dict, checkpoint_dir):
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        dcp.save(
            mcore_to_pyt_state_dict(by_key),
            planner=_MadeWhenWritten(self.makers),
            storage_writer=dcp.FileSystemWriter(checkpoint_dir, single_file_per_rank=False),
        )


@contextlib.contextmanager
def _interrupts_as_raised():
    """torch.distributed.checkpoint reports whatever stopped a save or load, Ctrl-C included, as a
    CheckpointException: an interrupt or a BigptError (a tensor refused as it is read) is raised
    again as itself, so that a tool ends it in one line or one paragraph."""
    try:
        yield
    except CheckpointException as err:
        ours = [exc for exc, _ in err.failures.values() if isinstance(exc, KeyboardInterrupt | BigptError)]
        if ours:
            raise ours[0] from None
        raise


def _save_streamed(items, weights, num_layers: int, directory: Path) -> None:
    """``dist_checkpointing.save`` of the tensors of ``items`` ((rule, layer) pairs), each joined
    from its Hugging Face tensors only when it is written and dropped after: memory stays near
    the largest tensor (and the inputs of its join), whatever the size of the model."""

    def joined(item: Item, read) -> ShardedTensor:
        rule, layer, expert = item
        return _sharded(item, rule.join([read(name) for name in rule.names(layer, expert)]), num_layers)

    state, makers = {}, {}
    for item in items:
        placeholder = joined(item, weights.meta)  # the shape and dtype of the data, on the meta device
        state[f"{item[0].key}/{item[1]}/{item[2]}"] = placeholder
        makers[placeholder.key, placeholder.global_offset] = lambda item=item: joined(item, weights.get).data
    with _interrupts_as_raised():
        dist_checkpointing.save(state, str(directory), sharded_strategy=_Streamed(makers))


EXPORT_MARKER = "bigpt_export.json"  # inside an exported directory: what it was exported from


def _check_replaceable(out: Path, ours: bool, what: str, overwrite: bool) -> None:
    """Never delete a directory this module did not write: ``out`` must be missing, empty, or
    ``ours`` (``what`` a conversion wrote; a downloaded model or a run's checkpoint never is),
    unless the user passed --overwrite (``overwrite``)."""
    if out.exists() and not ours and not overwrite and (not out.is_dir() or any(out.iterdir())):
        kind = "a file" if not out.is_dir() else "a directory with other files"
        raise BigptError(
            f"OUT: {out} exists ({kind}) and is not {what}; refusing to replace it, since that would "
            f"delete what is there: choose a new or empty output directory, or pass {OVERWRITE} to "
            "replace it on purpose"
        )


VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def grow_vocabulary(table: torch.Tensor, extension: VocabExtension, vocab_size: int) -> torch.Tensor:
    """An embedding or output table ([vocab, hidden]) with ``vocab_size`` rows: the old rows as
    they were, each new token's row the mean of the rows of the pieces the old tokenizer split it
    into (computed in fp32)."""
    grown = torch.zeros((vocab_size, table.shape[1]), dtype=table.dtype)
    grown[: table.shape[0]] = table
    for token in extension.tokens:
        grown[token.id] = table[token.pieces].float().mean(dim=0).to(table.dtype)
    return grown


class _GrownVocabulary:
    """Safetensors weights whose embedding and output layer have the rows of an extended vocabulary."""

    def __init__(self, weights, extension: VocabExtension, vocab_size: int):
        self.weights, self.extension, self.vocab_size = weights, extension, vocab_size

    def get(self, name: str) -> torch.Tensor:
        tensor = self.weights.get(name)
        return grow_vocabulary(tensor, self.extension, self.vocab_size) if name in VOCABULARY_TENSORS else tensor

    def meta(self, name: str) -> torch.Tensor:
        tensor = self.weights.meta(name)
        if name in VOCABULARY_TENSORS:
            return torch.empty((self.vocab_size, *tensor.shape[1:]), dtype=tensor.dtype, device="meta")
        return tensor


def import_hf(directory: Path, out: Path, overwrite: bool = False, extend_vocab: str | Path | None = None) -> dict:
    """Write the Hugging Face model in ``directory`` as a bigpt checkpoint at ``out``, with every
    rank of the process group converting a share of the tensors, one at a time; returns its
    [model] table. ``out`` appears only when complete; ``overwrite`` (--overwrite) replaces one
    that bigpt did not write. ``extend_vocab`` (init.extend_vocab): the vocabulary extension whose
    rows the embedding and output layer grow, and whose tokenizer the checkpoint carries."""
    directory, out = Path(directory).resolve(), Path(out)
    imported = store.is_complete(out) and "imported_from" in store.read_marker(out)
    _check_replaceable(out, imported, "a checkpoint an earlier import wrote", overwrite)
    model, safetensors = inspect_hf(directory)
    for note in safetensors.notes:
        console.note(note)
    weights: SafetensorsWeights | _GrownVocabulary = safetensors
    if extend_vocab:
        extension = read_extension(extend_vocab)
        model["vocab_size"] = extension.model_vocab_size(model["vocab_size"])
        weights = _GrownVocabulary(safetensors, extension, model["vocab_size"])
    config = read_config(directory)
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = partial_dir(out)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an import that was killed
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        with reporting_a_full_disk(out, "OUT"):
            mine = [item for number, item in enumerate(_items(model, config)) if number % world == rank]
            _save_streamed(mine, weights, model["num_layers"], tmp)
            dist.barrier()
            if rank == 0:
                for note in _import_notes(config, safetensors, directory):
                    console.note(note)
                (tmp / HF_FILES).mkdir()
                copy_side_files(directory, tmp / HF_FILES)
                if extend_vocab:  # the extended tokenizer replaces the source's (its other files stay)
                    _replace_tokenizer(tmp / HF_FILES, extension_tokenizer(extend_vocab))
                (tmp / MODEL_TOML).write_text(model_toml(model, directory, config))
                marker = {
                    "iteration": 0,
                    "imported_from": str(directory),
                    **({"vocab_extension": str(Path(extend_vocab).resolve())} if extend_vocab else {}),
                    "vocab_size": model["vocab_size"],
                    "bigpt_version": bigpt.__version__,
                    "files": store.manifest(tmp),
                }
                write_atomically(tmp / store.MARKER, json.dumps(marker, indent=2))
                if out.exists():
                    shutil.rmtree(out)
                os.replace(tmp, out)
    except BaseException:  # an interrupt or a full disk: nothing half written is left (OUT is replaced whole)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return model


def _import_notes(config: dict, weights, directory: Path) -> list[str]:
    """What an import leaves out of the weights or makes anew, said as it does so."""
    notes = []
    if weights.left_out:
        notes.append(
            f"{directory}: left out {len(weights.left_out)} tensors {weights.left_out_why} "
            f"({', '.join(weights.left_out[:4])}{', ...' if len(weights.left_out) > 4 else ''}); an export "
            "does not write them"
        )
    head = fresh_head_note(config, directory)
    return notes + [head] if head else notes


def model_toml(model: dict, source: Path, config: dict) -> str:
    """The [model] table of ``config`` as a recipe fragment (a ``base`` or a table to paste)."""
    positions = usable_positions(model, config) if "max_position_embeddings" in model else INPUT_LENGTH  # T5: no table
    table = dict(model, seq_length=min(positions, 8192))
    return (
        f"# The architecture of {source} (written by tools/convert_hf.py import).\n"
        "# Paste this table into a recipe, or name this file as its base; seq_length is yours to choose.\n"
        + table_to_toml("model", table)
        + "\n"
    )


def checkpoint_model(checkpoint: Path) -> ModelConfig:
    """The [model] table a checkpoint was saved with: its recipe.toml, or an import's model.toml."""
    for name in ("recipe.toml", MODEL_TOML):
        if (checkpoint / name).is_file():
            table = tomllib.loads((checkpoint / name).read_text())["model"]
            tables = {
                "moe": MoEConfig(**table.get("moe", {})),
                "mla": MLAConfig(**table.get("mla", {})),
                "encoder": EncoderConfig(**table.get("encoder", {})),
                "encoder_decoder": EncoderDecoderConfig(**table.get("encoder_decoder", {})),
            }
            return ModelConfig(**table | tables)
    raise BigptError(
        f"{checkpoint} is not a bigpt checkpoint (it has neither recipe.toml nor {MODEL_TOML}); point at "
        "an iter_* directory of a run, or at the output of tools/convert_hf.py import"
    )


def _lineage_origin(checkpoint: Path) -> tuple[Path, dict]:
    """Where a lineage of continual runs began: the first checkpoint, going back through
    init.from_checkpoint, that is an import (it holds Hugging Face files) or whose run did not
    start from a bigpt checkpoint; with its run's [init] table."""
    for _ in range(100):  # a cycle cannot happen, but never loop forever
        recipe = checkpoint / "recipe.toml"
        init = tomllib.loads(recipe.read_text()).get("init", {}) if recipe.is_file() else {}
        if (checkpoint / HF_FILES).is_dir() or not init.get("from_checkpoint"):
            return checkpoint, init
        checkpoint = Path(init["from_checkpoint"])
    return checkpoint, {}


def hf_files_of(checkpoint: Path) -> Path | None:
    """Where the Hugging Face config and tokenizer files of a checkpoint's lineage are: its own
    (an import), or those of the weights its run started from (init.from_hf / from_checkpoint)."""
    origin, init = _lineage_origin(checkpoint)
    if (origin / HF_FILES).is_dir():
        return origin / HF_FILES
    return Path(init["from_hf"]) if init.get("from_hf") else None


def extended_tokenizer_of(checkpoint: Path) -> Path | None:
    """The tokenizer a checkpoint's lineage grew its vocabulary for (init.extend_vocab with
    init.from_hf), which replaces the released one beside the weights; an import carries its own."""
    origin, init = _lineage_origin(checkpoint)
    if (origin / HF_FILES).is_dir() or not init.get("extend_vocab"):
        return None
    return extension_tokenizer(init["extend_vocab"])


def _replace_tokenizer(directory: Path, tokenizer: Path) -> str:
    """Put ``tokenizer`` (an extended one) in place of ``directory``'s, of either kind; its name there."""
    for name in ("tokenizer.json", *SENTENCEPIECE_FILES):
        (directory / name).unlink(missing_ok=True)
    name = "tokenizer.json" if tokenizer.suffix == ".json" else "tokenizer.model"
    shutil.copyfile(tokenizer, directory / name)
    return name


def _layer_loads(checkpoint: Path, metadata: dict, items: list[Item], num_layers: int, dtype: torch.dtype):
    """Yield (item, its tensor in ``dtype``, or as saved for ``KEPT_AS_STORED``) in ``items`` order,
    one load per run of items of the same layer, or of the same expert of a layer (memory stays near
    one layer's dense tensors, or one expert's, however many experts a layer has)."""
    for _, run in itertools.groupby(items, key=lambda item: item[1:]):
        request = {}
        for item in run:
            saved = metadata[item[0].checkpoint_key(item[1])]
            shape = saved.global_shape[len(_sliced_axes(item, num_layers)) :]
            request[item] = _sharded(item, torch.empty(shape, dtype=saved.dtype), num_layers)
        # one layer of the stacked tensors: a partial read, which the integrity check would refuse
        with _interrupts_as_raised():
            loaded = dist_checkpointing.load(request, str(checkpoint), validate_access_integrity=False)
        for item in request:  # (the load also returns the checkpoint's common, non-tensor state)
            tensor = loaded[item]
            for _ in _sliced_axes(item, num_layers):
                tensor = tensor[0]
            rule, layer, expert = item
            kept = any(name.endswith(KEPT_AS_STORED) for name in rule.names(layer, expert))
            yield item, tensor if kept else tensor.to(dtype)  # kept: exported as exported_dtype says


def tokenizer_note(hf_files: Path | None, copied: list[str]) -> str:
    """What an export says about its tokenizer (in the tool's output and the export's README.md)."""
    found = [name for name in copied if name in TOKENIZER_FILES]
    if any(name in found for name in ("tokenizer.json", *SENTENCEPIECE_FILES)):
        return f"tokenizer: {', '.join(found)} from {hf_files}"
    why = (
        f"{hf_files} has no tokenizer.json, {' or '.join(SENTENCEPIECE_FILES)}"
        if hf_files
        else "the checkpoint's lineage names no Hugging Face directory (it was not started from one)"
    )
    return (
        f"WARNING: no tokenizer was exported ({why}): this directory holds weights and config.json only. Copy the "
        "tokenizer files of the model the run started from into it, or export again with --hf-files DIR "
        "naming a directory that has them"
    )


def export_hf(
    checkpoint: Path,
    out: Path,
    *,
    hf_files: Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> str:
    """Write the bigpt checkpoint (any layout; or the newest intact one in a run's checkpoint
    directory) as a Hugging Face directory ``out``, with a README.md saying where it came from;
    returns what ``tokenizer_note`` says of its tokenizer. ``overwrite`` (--overwrite) replaces an
    ``out`` that bigpt did not write."""
    out = Path(out)
    _check_replaceable(
        out,
        (out / EXPORT_MARKER).is_file(),
        f"a directory an earlier export wrote (it has no {EXPORT_MARKER})",
        overwrite,
    )
    checkpoint = store.checkpoint_at(
        Path(checkpoint), "the checkpoint to export", alternatives="or at the output of tools/convert_hf.py import"
    )
    model_config = checkpoint_model(checkpoint)
    model = vars(model_config)
    metadata = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    extended = None if hf_files else extended_tokenizer_of(checkpoint)
    hf_files = hf_files or hf_files_of(checkpoint)
    original = read_config(hf_files) if hf_files and (hf_files / CONFIG).is_file() else None
    config = hf_from_model(model_config, str(dtype or torch.float32).removeprefix("torch."), original)
    items = _items(model, config)
    for rule, layer, _ in items:
        if rule.checkpoint_key(layer) not in metadata:
            raise BigptError(
                f"{checkpoint} has no tensor {rule.checkpoint_key(layer)}, which its model needs; the "
                "checkpoint is damaged or was written by an incompatible program"
            )
    if dtype is None:
        dtype = metadata[items[0][0].key].dtype
        config["dtype"] = str(dtype).removeprefix("torch.")

    shapes = expected_hf_shapes(model, config)
    order = [name for rule, layer, expert in items for name in rule.names(layer, expert)]
    shards = plan_shards([(name, exported_bytes(name, shapes[name], dtype)) for name in order], max_shard_bytes)
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an export that was killed
    tmp.mkdir(parents=True)

    def tensors():
        for (rule, layer, expert), tensor in _layer_loads(checkpoint, metadata, items, model["num_layers"], dtype):
            names = rule.names(layer, expert)
            yield from ((name, part.to(exported_dtype(name, dtype))) for name, part in zip(names, rule.split(tensor)))

    try:
        with reporting_a_full_disk(out, "the export's OUT"):
            write_shards(tmp, shards, shapes, dtype, tensors())
            copied = copy_side_files(hf_files, tmp, skip=(CONFIG,)) if hf_files and hf_files.is_dir() else []
            (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            note = tokenizer_note(hf_files, copied)
            if extended:  # the run grew the vocabulary: its tokenizer, not the released one
                note = (
                    f"tokenizer: {_replace_tokenizer(tmp, extended)} extended by init.extend_vocab ({extended}), "
                    f"the other files from {hf_files}"
                )
            (tmp / "README.md").write_text(
                f"# {out.name}\n\n{config['architectures'][0]} exported by bigpt "
                f"(tools/convert_hf.py export) from the checkpoint {checkpoint.resolve()}."
                f"\n\n{note}.\n"
            )
            (tmp / EXPORT_MARKER).write_text(
                json.dumps({"exported_from": str(checkpoint.resolve()), "bigpt_version": bigpt.__version__}, indent=2)
                + "\n"
            )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return note
