"""The files of a Hugging Face model directory: weights (safetensors only, never a pickle),
``config.json`` and the tokenizer files that travel with the weights; their checks, which
need neither megatron-core nor a process group."""

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from bigpt.errors import BigptError
from bigpt.hf.config import model_from_hf
from bigpt.hf.mapping import expected_hf_shapes

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model")
"""A SentencePiece tokenizer's file: Llama's name, T5's and mT5's (their only tokenizer, for mT5)."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    *SENTENCEPIECE_FILES,
    *("vocab.txt", "vocab.json", "merges.txt"),  # the slow tokenizers' vocabularies: WordPiece (BERT), BPE (RoBERTa)
    "chat_template.jinja",
)
# Copied on import and export (whichever exist); none of them is a pickle.
SIDE_FILES = (CONFIG, "generation_config.json", *TOKENIZER_FILES)
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Buffers some older checkpoints saved next to the weights; they are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(directory: Path) -> dict:
    path = directory / CONFIG
    if not path.is_file():
        raise BigptError(
            f"{path} does not exist: a Hugging Face model directory needs its config.json; "
            "point at the directory that save_pretrained wrote (or the hub snapshot)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BigptError(f"{path} is not valid JSON ({err})") from None


class SafetensorsWeights:
    """Tensor name -> safetensors file of a directory, single file or sharded with an index."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.notes: list[str] = []
        """What the import should say about how the weights are read (``unify_dtypes``, ``read_fp8_blocks``)."""
        self.fp8: Fp8Blocks | None = None
        """Weights stored in FP8 blocks, dequantised when read (``read_fp8_blocks``)."""
        index = directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
            except (json.JSONDecodeError, AttributeError):
                weight_map = None
            if not isinstance(weight_map, dict):
                raise BigptError(f"{index} is not an index with a weight_map; fetch it again or re-save the model")
            for shard in sorted(set(weight_map.values())):
                if not (directory / shard).is_file():
                    raise BigptError(
                        f"{index} names the shard {shard}, which is not in {directory}; the "
                        "download is incomplete: fetch that file again"
                    )
            self.files = {name: directory / shard for name, shard in weight_map.items()}
        elif (directory / SINGLE).is_file():
            self.files = dict.fromkeys(_open(directory / SINGLE).keys(), directory / SINGLE)
        else:
            pickles = sorted(p.name for pattern in _PICKLES for p in directory.glob(pattern))
            found = (
                f" (it has {', '.join(pickles[:3])}: pickle files, which bigpt never loads, since unpickling "
                "runs code from the download)"
                if pickles
                else ""
            )
            raise BigptError(
                f"{directory} has neither {SINGLE} nor {INDEX}{found}; bigpt reads safetensors "
                "weights only: use a safetensors release of the model, or convert it yourself with "
                "transformers (from_pretrained then save_pretrained(safe_serialization=True))"
            )
        self.files = {name: path for name, path in self.files.items() if not name.endswith(_IGNORED_SUFFIXES)}
        self.left_out: list[str] = []
        """Tensors of the directory that the model does not use (bigpt.hf.bert.left_out, ``mtp_tensors``)."""
        self.left_out_why = ""
        """Why they are left out: what they are, said in the import's note."""
        self.stored: dict[str, str] = {}
        """A tensor's name in its file, where it differs from the name the map uses."""

    def rename(self, names: dict[str, str]) -> None:
        """Use the names ``names`` maps to for the tensors it maps from."""
        for stored, name in names.items():
            self.files[name] = self.files.pop(stored)
            self.stored[name] = stored

    def _read(self, name: str, read):
        """``read(handle, name in the file)`` of the file that holds ``name``, through a handle closed
        at once: safetensors maps the file, and what a handle kept open has read would stay resident."""
        with _open(self.files[name]) as handle:
            return read(handle, self.stored.get(name, name))

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return self._read(name, lambda handle, stored: tuple(handle.get_slice(stored).get_shape()))
        except Exception as err:  # safetensors raises its own error type for a name the file lacks
            raise BigptError(
                f"tensor {name} is not in {self.files[name]} although {INDEX} says so ({err}); "
                "the file is damaged or from another model: fetch it again"
            ) from None

    dtype: torch.dtype | None = None
    """Every tensor is read in this dtype (``unify_dtypes``); None: as stored."""

    def stored_dtype(self, name: str) -> str:
        """safetensors' name of the dtype ``name`` is stored in ("BF16", "F16", ...); an FP8 block
        weight's is that of the dtype it is dequantised into."""
        if self.fp8 and name in self.fp8.scales:
            return _DTYPE_NAMES[self.fp8.dtype]
        return self._read(name, lambda handle, stored: handle.get_slice(stored).get_dtype())

    def read_dtype(self, name: str) -> torch.dtype | None:
        """The dtype ``name`` is read in: the one ``unify_dtypes`` chose, or an FP8 block weight's
        dequantised dtype; None: as stored (always so for ``KEPT_AS_STORED``)."""
        if name.endswith(KEPT_AS_STORED):
            return None
        return self.dtype or (self.fp8.dtype if self.fp8 and name in self.fp8.scales else None)

    def get(self, name: str) -> torch.Tensor:
        tensor = self._read(name, lambda handle, stored: handle.get_tensor(stored))
        if self.fp8 and name in self.fp8.scales:
            tensor = self.fp8.dequantize(name, tensor)
        dtype = self.read_dtype(name)
        if dtype is None or tensor.dtype == dtype:
            return tensor
        converted = tensor.to(dtype)
        if not torch.isfinite(converted).all() and torch.isfinite(tensor).all():
            raise BigptError(
                f"tensor {name} in {self.files[name]} holds values beyond the range of {dtype} (as "
                f"which the weights are read, see the note above), up to {tensor.abs().max().item():.4g}; "
                "save the model in one dtype that holds them all (bfloat16 or float32) and import that"
            )
        return converted

    def rows_equal(self, name: str, other: str, rows: int = 4096) -> bool:
        """Tensors ``name`` and ``other`` are equal, compared ``rows`` rows at a time (memory stays
        near two such blocks, whatever the vocabulary)."""
        if self.shape(name) != self.shape(other):
            return False
        if self.fp8 and {name, other} & set(self.fp8.scales):  # compared as dequantised, whole
            return torch.equal(self.get(name).float(), self.get(other).float())
        with _open(self.files[name]) as first, _open(self.files[other]) as second:
            left = first.get_slice(self.stored.get(name, name))
            right = second.get_slice(self.stored.get(other, other))
            return all(
                torch.equal(left[start : start + rows].float(), right[start : start + rows].float())
                for start in range(0, self.shape(name)[0], rows)
            )

    def meta(self, name: str) -> torch.Tensor:
        """A tensor without data (on the meta device) of the shape and dtype of ``name``."""

        def empty(handle, stored):
            part = handle.get_slice(stored)
            dtype = self.read_dtype(name) or part[:0].dtype  # [:0]: no data read
            return torch.empty(part.get_shape(), dtype=dtype, device="meta")

        return self._read(name, empty)


def inspect_hf(directory: Path) -> tuple[dict, SafetensorsWeights]:
    """The [model] table of a Hugging Face directory and its weights, all checked before a
    single tensor is read: architecture, every tensor present with the shape config.json
    implies, no tensor bigpt could not map, a tokenizer that fits the vocabulary."""
    directory = Path(directory)
    config = read_config(directory)
    model = model_from_hf(config, directory / CONFIG)
    weights = SafetensorsWeights(directory)
    read_fp8_blocks(weights, config)
    expected = expected_hf_shapes(model, config)
    if model.get("family") == "encoder":
        from bigpt.hf import bert

        weights.rename(bert.current_names(weights.files))
        weights.left_out = bert.left_out(weights.files, config)  # a released BERT's pooler, NSP head
        weights.left_out_why = "that masked-LM training does not use"
        for name in weights.left_out + bert.redundant(weights.files, config):
            del weights.files[name]
    elif model.get("family") == "encoder_decoder":
        from bigpt.hf import t5

        t5.check_tying(directory, weights, model, config)  # and drops the embedding's copies
    elif mtp_tensors(weights.files, config):
        weights.left_out = mtp_tensors(weights.files, config)
        weights.left_out_why = (
            f"of DeepSeek's {config['num_nextn_predict_layers']} multi-token-prediction layers (layers "
            f"{config['num_hidden_layers']} on), which bigpt does not train (megatron-core's MTP is not "
            "wired into bigpt)"
        )
        for name in weights.left_out:
            del weights.files[name]
    elif model["tie_embeddings"] and "lm_head.weight" in weights.files:  # some tied checkpoints store the copy too
        _check_tied_copy(directory, weights)
        del weights.files["lm_head.weight"]
    missing = sorted(set(expected) - set(weights.files))
    if missing:
        raise BigptError(
            f"{directory}: tensor {missing[0]} is missing ({len(missing)} missing in all) although "
            f"config.json describes a model that has it; the weights and config.json do not belong "
            "together, or the download is incomplete"
        )
    unmapped = sorted(set(weights.files) - set(expected))
    if unmapped:
        raise BigptError(
            f"{directory}: tensor {unmapped[0]} ({weights.files[unmapped[0]].name}) has no place in "
            f"the {model['num_layers']}-layer model config.json describes ({len(unmapped)} such tensors); bigpt "
            "cannot map it (biases beyond Qwen2's q/k/v, extra modules and adapters are not supported)"
        )
    for name, shape in expected.items():
        if weights.shape(name) != shape:
            raise BigptError(
                f"{directory}: tensor {name} in {weights.files[name].name} has shape "
                f"{weights.shape(name)} but config.json implies {shape}; the weights and config.json "
                "do not belong together"
            )
    check_tokenizer_fits(directory, model["vocab_size"])
    unify_dtypes(weights, read_config(directory))
    return model, weights


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def mtp_tensors(names, config: dict) -> list[str]:
    """DeepSeek-V3's multi-token-prediction layers: ``num_nextn_predict_layers`` layers past
    ``num_hidden_layers`` (model.layers.{N}…), which transformers does not build either."""
    if not config.get("num_nextn_predict_layers"):
        return []
    layers = config["num_hidden_layers"]
    return sorted(name for name in names if (found := _LAYER.match(name)) and int(found[1]) >= layers)


def _check_tied_copy(directory: Path, weights: SafetensorsWeights) -> None:
    """A tied model's stored ``lm_head.weight`` is the embedding's copy: dropping one that differs
    would silently change the model (transformers ties it to the embedding as well)."""
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    if embedding in weights.files and not weights.rows_equal(head, embedding):
        raise BigptError(
            f"{directory}: config.json ties the output layer to the embedding (tie_word_embeddings is "
            f"true), but {head} in {weights.files[head].name} differs from {embedding}; bigpt will "
            "not drop a trained output layer without a word. If the model has an output layer of its "
            'own, set "tie_word_embeddings": false in config.json; if the tied embedding is meant, '
            f"remove {head} from the weights (transformers: from_pretrained, then save_pretrained). "
            "Then import again"
        )


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors' names
KEPT_AS_STORED = ("e_score_correction_bias",)
"""Tensors read in the dtype they are stored in, whatever the others': DeepSeek-V3's router bias,
float32 beside bfloat16 weights in the release, as transformers keeps it (_keep_in_fp32_modules_strict)
and megatron-core's expert bias is (an fp32 buffer); in bfloat16 it would choose other experts.
An export writes them in float32 whatever the others' dtype (``exported_dtype``)."""


def exported_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor named ``name`` is exported in when the others are in ``dtype``."""
    return torch.float32 if name.endswith(KEPT_AS_STORED) else dtype


def unify_dtypes(weights: SafetensorsWeights, config: dict) -> None:
    """Weights stored in several float dtypes (shards mixing float16 and bfloat16) are read in one,
    with a note naming what is converted: config.json's torch_dtype, as transformers loads them,
    or float32, which holds every value of both, when config.json names none of them (but
    ``KEPT_AS_STORED``). A value the dtype cannot hold is refused when read (``SafetensorsWeights.get``)."""
    by_dtype: dict[str, list[str]] = {}
    for name in weights.files:
        if not name.endswith(KEPT_AS_STORED):
            by_dtype.setdefault(weights.stored_dtype(name), []).append(name)
    if len(by_dtype) < 2:
        return
    unknown = sorted(set(by_dtype) - set(_DTYPES))
    if unknown:
        raise BigptError(
            f"{weights.directory}: tensor {by_dtype[unknown[0]][0]} is stored as {unknown[0]}, beside "
            f"tensors in {', '.join(sorted(set(by_dtype) - {unknown[0]}))}; bigpt imports float weights "
            "(float32, bfloat16, float16) only: save the model unquantized"
        )
    in_config = _config_dtype(config)
    target = in_config if in_config in by_dtype else "F32"
    weights.dtype = _DTYPES[target]
    why = "config.json's torch_dtype" if target == in_config else "config.json names neither; float32 holds both"
    mix = " and ".join(
        f"{str(_DTYPES[code]).removeprefix('torch.')} ({len(names)} tensors, e.g. {names[0]})"
        for code, names in sorted(by_dtype.items())
    )
    weights.notes.append(
        f"{weights.directory}: the weights mix {mix}; every tensor is read as "
        f"{str(weights.dtype).removeprefix('torch.')} ({why})"
    )


def _config_dtype(config: dict) -> str | None:
    """safetensors' name of the float dtype config.json's torch_dtype names, if it names one."""
    named = str(config.get("torch_dtype") or config.get("dtype") or "")
    return {str(dtype).removeprefix("torch."): code for code, dtype in _DTYPES.items()}.get(named)


SCALE_SUFFIX = "_scale_inv"
"""An FP8 block weight's scales are the tensor of its name with this suffix (``weight_scale_inv``)."""
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors' names


@dataclass(frozen=True)
class Fp8Blocks:
    """Weights stored in FP8 with a float32 scale per block of ``block`` (rows, columns), as
    DeepSeek-V3 is released: ``weight = fp8 × weight_scale_inv`` over each block (blocks at the
    right and bottom edges partial), dequantised into ``dtype`` when read."""

    block: tuple[int, int]
    dtype: torch.dtype
    scales: dict[str, tuple[Path, str]]
    """A weight's name -> (file, stored name) of its scales."""

    def dequantize(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        file, stored = self.scales[name]
        with _open(file) as handle:
            scales = handle.get_tensor(stored)
        rows, columns = self.block
        out = torch.empty(weight.shape, dtype=self.dtype)
        for index, row_scales in enumerate(scales):  # a row of blocks at a time: memory stays near ``out``
            part = slice(index * rows, (index + 1) * rows)
            out[part] = (weight[part].float() * row_scales.repeat_interleave(columns)[: weight.shape[1]]).to(self.dtype)
        return out


def fp8_block_size(config: dict, source: Path) -> tuple[int, int] | None:
    """The block of config.json's quantization_config (FP8 scaled per block); None when the weights
    are not quantised. Every other quantisation is refused: bigpt trains float weights."""
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    method, block = quantization.get("quant_method"), quantization.get("weight_block_size")
    supported = (
        'bigpt imports float weights, and FP8 weights with a scale per block (quant_method "fp8" with '
        "weight_block_size, as DeepSeek-V3 is released), which it dequantises"
    )
    if method != "fp8":
        raise BigptError(
            f"{source}: quantization_config.quant_method is {method!r}; {supported}. Import an unquantised "
            "release of the model (bfloat16 or float32), or save one yourself (transformers: from_pretrained, "
            "then model.dequantize() where the method has it, then save_pretrained)"
        )
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(n, int) and n > 0 for n in block)):
        raise BigptError(
            f"{source}: quantization_config is FP8 with weight_block_size {block!r}, not [rows, columns]; "
            f"{supported}: FP8 with one scale per tensor or per channel is not read. Import an unquantised "
            "release of the model (bfloat16 or float32)"
        )
    return block[0], block[1]


def read_fp8_blocks(weights: SafetensorsWeights, config: dict) -> None:
    """Weights that config.json's quantization_config says are FP8 in blocks are dequantised as
    they are read (``Fp8Blocks``), into config.json's torch_dtype (float32 when it names none); their
    scale tensors leave the map, and the import says so. Headers only: nothing is read here."""
    source = weights.directory / CONFIG
    block = fp8_block_size(config, source)
    if block is None:
        return
    dtype = _DTYPES[_config_dtype(config) or "F32"]
    scales = {}
    for scale in [name for name in weights.files if name.endswith(SCALE_SUFFIX)]:
        name = scale.removesuffix(SCALE_SUFFIX)
        if name in weights.files:
            shape, stored = weights.shape(name), weights.stored_dtype(name)
            blocks = tuple(math.ceil(size / edge) for size, edge in zip(shape, block, strict=False))
            fits = stored in _FP8_DTYPES and len(shape) == 2 and weights.shape(scale) == blocks
            problem = "" if fits else f"{name} is {stored} of shape {shape}"
        else:
            problem = f"there is no {name}"
        if problem:
            raise BigptError(
                f"{weights.directory}: {scale} ({weights.files[scale].name}) should scale the {block[0]}×{block[1]} "
                f"blocks of a 2-D FP8 weight {name} (quantization_config.weight_block_size), but {problem} and "
                f"the scales' shape is {weights.shape(scale)}; the weights and config.json do not belong "
                "together, or the download is damaged: fetch it again"
            )
        scales[name] = (weights.files.pop(scale), weights.stored.get(scale, scale))
    unscaled = [name for name in weights.files if name not in scales and weights.stored_dtype(name) in _FP8_DTYPES]
    if unscaled:
        raise BigptError(
            f"{weights.directory}: tensor {unscaled[0]} ({weights.files[unscaled[0]].name}) is stored in FP8 "
            f"without its {unscaled[0]}{SCALE_SUFFIX} ({len(unscaled)} such tensors), so its values cannot be "
            "recovered; the download is incomplete: fetch the shards again"
        )
    if not scales:  # dequantised already (e.g. by DeepSeek's fp8_cast_bf16.py), its config.json left as it was
        return
    weights.fp8 = Fp8Blocks(block, dtype, scales)
    weights.notes.append(
        f"{weights.directory}: the weights stored in FP8 with a scale per {block[0]}×{block[1]} block (config.json's "
        f"quantization_config) are dequantised to {str(dtype).removeprefix('torch.')} as they are read; their "
        f"{len(scales)} {SCALE_SUFFIX} tensors are not imported"
    )


def _open(path: Path):
    try:
        return safe_open(path, "pt")
    except Exception as err:  # safetensors' own error type, for a damaged or foreign file
        raise BigptError(f"{path} is not a readable safetensors file ({err}); fetch it again") from None


def tokenizer_vocab_size(directory: Path) -> tuple[Path, int] | None:
    """(file, number of tokens) of the tokenizer beside the weights, if there is one."""
    path = directory / "tokenizer.json"
    try:
        if path.is_file():
            import tokenizers

            return path, tokenizers.Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        for path in (directory / name for name in SENTENCEPIECE_FILES):
            if path.is_file():
                import sentencepiece

                return path, sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except Exception as err:  # both libraries raise plain exceptions from native code
        raise BigptError(f"tokenizer {path} cannot be read ({err}); fetch it again") from None
    return None


def check_tokenizer_fits(directory: Path, vocab_size: int) -> None:
    found = tokenizer_vocab_size(directory)
    if found and found[1] > vocab_size:
        raise BigptError(
            f"tokenizer {found[0]} has {found[1]} tokens but config.json's vocab_size is {vocab_size}, "
            "so some token ids have no embedding row. If tokens were added to it, give the model rows "
            "for them first (transformers: model.resize_token_embeddings(len(tokenizer)), then "
            "save_pretrained) and import that directory (init.from_hf or tools/convert_hf.py import); "
            "otherwise put back the tokenizer files released with these weights"
        )


def copy_side_files(source: Path, destination: Path, *, skip=()) -> list[str]:
    """Copy the config, generation and tokenizer files that exist in ``source``."""
    copied = []
    for name in SIDE_FILES:
        if name not in skip and (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group consecutive tensors (name, bytes) into shards of at most ``max_bytes`` (a bigger
    tensor gets a shard of its own), in order."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes:
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return shards + [current] if current else shards


_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}  # safetensors' spelling


def exported_bytes(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.empty((), dtype=exported_dtype(name, dtype)).element_size() * math.prod(shape)


def _write_safetensors(path: Path, layout: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, tensors) -> None:
    """One safetensors file of ``layout`` ((name, shape), in order), written one tensor of
    ``tensors`` at a time: the header comes from the plan, so the file is never held whole."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layout:
        end = offset + exported_bytes(name, shape, dtype)
        written = exported_dtype(name, dtype)
        header[name] = {"dtype": _DTYPE_NAMES[written], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in layout:
            got, tensor = next(tensors)
            expected = (name, shape, exported_dtype(name, dtype))
            assert (got, tuple(tensor.shape), tensor.dtype) == expected, (got, tensor.shape, tensor.dtype, expected)
            f.write(tensor.contiguous().view(torch.uint8).numpy().data)


def write_shards(
    directory: Path, shards: list[list[str]], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, tensors
) -> None:
    """Write ``tensors`` ((name, tensor) pairs in shard order, of ``shapes`` and ``dtype``) as
    Hugging Face names them: one ``model.safetensors``, or ``model-0000k-of-0000n.safetensors``
    plus the index. Each tensor is written as it comes and may be dropped after."""
    tensors = iter(tensors)
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file = SINGLE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(directory / file, [(name, shapes[name]) for name in names], dtype, tensors)
        weight_map.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        total = sum(exported_bytes(name, shapes[name], dtype) for name in weight_map)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
