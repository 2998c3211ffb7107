"""Weights released in FP8 blocks, as DeepSeek-V3's are: float8_e4m3fn with a float32
``weight_scale_inv`` per block (config.json's quantization_config ``{"quant_method": "fp8",
"weight_block_size": [128, 128]}``). A tiny Llama is quantised the way DeepSeek quantises (each
block scaled by its amax / 448, float8_e4m3fn's largest value), with blocks that do not divide
its shapes (partial edge blocks) and the scales in a shard of their own; bigpt must read each
weight as the dequantised reference exactly, leave the scales out, refuse other quantisations by
name, and import and export it end to end (slow). A tiny DeepSeek-V3 quantised so, with a
multi-token-prediction layer, computes transformers' logits of its dequantised weights (slow).
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bigpt.errors import BigptError
from bigpt.hf.files import INDEX, KEPT_AS_STORED, SCALE_SUFFIX, inspect_hf
from test_hf import SHAPES, TOLERANCE, hf_tensors, recipe_for, reference_logits, save_model

BLOCK = (32, 48)  # rows, columns: not square; 48 divides neither width 64 nor 160, so edge blocks are partial
QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK)}
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale per block) as DeepSeek-V3 quantises: weight / scale,
    with scale = the block's amax / 448."""
    rows, columns = BLOCK
    weight = weight.float()
    scales = torch.empty(math.ceil(weight.shape[0] / rows), math.ceil(weight.shape[1] / columns))
    quantized = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = (slice(i * rows, (i + 1) * rows), slice(j * columns, (j + 1) * columns))
            scales[i, j] = weight[block].abs().max() / FP8_MAX
            quantized[block] = (weight[block] / scales[i, j]).to(torch.float8_e4m3fn)
    return quantized, scales


def dequantize(quantized: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The reference: every scale spread over its block, the edge blocks cut to the weight's shape."""
    rows, columns = BLOCK
    spread = scales.repeat_interleave(rows, 0).repeat_interleave(columns, 1)
    return quantized.float() * spread[: quantized.shape[0], : quantized.shape[1]]


def edit_config(directory: Path, **changes) -> None:
    """config.json with ``changes`` (a None removes the key)."""
    config = json.loads((directory / "config.json").read_text()) | changes
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def copy_of(directory: Path, out: Path, **config_changes) -> Path:
    shutil.copytree(directory, out)
    edit_config(out, **config_changes)
    return out


def write_fp8_release(
    original: Path, out: Path, extra: dict | None = None, **config_changes
) -> dict[str, torch.Tensor]:
    """``original`` (a float model) as an FP8 release at ``out``: every matrix of the layers
    quantised (the embedding, output layer, norms and routers stay float, as in DeepSeek-V3's), the
    weights in one shard and the scales in another, with the tensors ``extra`` added; returns the
    dequantised reference of each quantised weight."""
    out.mkdir()
    tensors = load_file(original / "model.safetensors") | (extra or {})
    kept, scales, reference = {}, {}, {}
    for name, tensor in tensors.items():
        if name.startswith("model.layers.") and tensor.dim() == 2 and not name.endswith("mlp.gate.weight"):
            kept[name], scales[name + SCALE_SUFFIX] = quantize(tensor)
            reference[name] = dequantize(kept[name], scales[name + SCALE_SUFFIX])
        else:
            kept[name] = tensor
    save_file(kept, out / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(scales, out / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = dict.fromkeys(kept, "model-00001-of-00002.safetensors")
    weight_map.update(dict.fromkeys(scales, "model-00002-of-00002.safetensors"))
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copyfile(original / "config.json", out / "config.json")
    edit_config(out, **({"quantization_config": QUANTIZATION, "dtype": "float32"} | config_changes))
    return reference


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """(the original float32 model, its FP8 release, the dequantised reference of each quantised weight)."""
    root = tmp_path_factory.mktemp("fp8")
    original = save_model(root / "original", 3, SHAPES["gqa2_untied"])
    return original, root / "released", write_fp8_release(original, root / "released")


def test_fp8_block_weights_are_read_dequantised_and_their_scales_left_out(fp8):
    original, released, reference = fp8
    model, weights = inspect_hf(released)
    assert not [name for name in weights.files if name.endswith(SCALE_SUFFIX)]
    assert weights.fp8 is not None and sorted(weights.fp8.scales) == sorted(reference)
    assert len(reference) == 7 * SHAPES["gqa2_untied"]["num_hidden_layers"]
    assert any(shape % edge for name in reference for shape, edge in zip(weights.shape(name), BLOCK, strict=True))
    stored = load_file(original / "model.safetensors")
    for name, tensor in stored.items():
        read = weights.get(name)
        assert weights.meta(name).dtype == read.dtype == torch.float32, name
        if name in reference:
            assert torch.equal(read, reference[name]), name
            # ... and the reference is the original weight within FP8's precision (3 mantissa bits)
            torch.testing.assert_close(read, tensor, rtol=2**-4, atol=tensor.abs().max().item() * 2**-9 / FP8_MAX)
        else:
            assert torch.equal(read, tensor), name
    assert weights.notes == [
        f"{released}: the weights stored in FP8 with a scale per 32×48 block (config.json's quantization_config) "
        f"are dequantised to float32 as they are read; their {len(reference)} _scale_inv tensors are not imported"
    ]


def test_fp8_block_weights_are_dequantised_into_the_configs_dtype(fp8, tmp_path):
    """In float32, then rounded once to config.json's torch_dtype (DeepSeek-V3's: bfloat16)."""
    _, released, reference = fp8
    _, weights = inspect_hf(copy_of(released, tmp_path / "bf16", dtype="bfloat16"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert weights.meta(name).dtype == torch.bfloat16
    assert torch.equal(weights.get(name), reference[name].to(torch.bfloat16))
    assert "are dequantised to bfloat16 as they are read" in weights.notes[0]


def test_weights_dequantised_already_are_read_as_stored_whatever_config_json_says(fp8, tmp_path):
    """A release converted to bfloat16 or float32 (DeepSeek's fp8_cast_bf16.py) whose config.json
    still names its FP8 quantization: no scale, no FP8 tensor, nothing to dequantise or say."""
    original, released, _ = fp8
    directory = copy_of(original, tmp_path / "converted", quantization_config=QUANTIZATION)
    _, weights = inspect_hf(directory)
    assert weights.fp8 is None and weights.notes == []


def edit_shard(directory: Path, shard: str, edit) -> None:
    tensors = load_file(directory / shard)
    edit(tensors)
    save_file(tensors, directory / shard, metadata={"format": "pt"})


SCALES = "model-00002-of-00002.safetensors"
QKV = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"quantization_config": {"quant_method": "gptq", "bits": 4}},
            "quantization_config.quant_method is 'gptq'; bigpt imports float weights, and FP8 weights with a "
            "scale per block",
        ),
        (
            {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}},
            "quantization_config is FP8 with weight_block_size None, not \\[rows, columns\\]; .* FP8 with one "
            "scale per tensor or per channel is not read",
        ),
        (
            lambda tensors: tensors.update({QKV + SCALE_SUFFIX: tensors[QKV + SCALE_SUFFIX][:1]}),
            f"{QKV}{SCALE_SUFFIX} \\({SCALES}\\) should scale the 32×48 blocks of a 2-D FP8 weight {QKV} .* but "
            f"{QKV} is F8_E4M3 of shape \\(64, 64\\) and the scales' shape is \\(1, 2\\)",
        ),
        (
            lambda tensors: tensors.pop(QKV + SCALE_SUFFIX),
            f"tensor {QKV} \\(model-00001-of-00002.safetensors\\) is stored in FP8 without its {QKV}{SCALE_SUFFIX}",
        ),
    ],
    ids=["another-method", "fp8-without-blocks", "scales-of-another-shape", "fp8-without-scales"],
)
def test_what_cannot_be_dequantised_is_refused_by_name(fp8, tmp_path, change, message):
    directory = copy_of(fp8[1], tmp_path / "edited", **(change if isinstance(change, dict) else {}))
    if callable(change):
        edit_shard(directory, SCALES, change)
        index = json.loads((directory / INDEX).read_text())
        index["weight_map"] = {name: SCALES for name in load_file(directory / SCALES)} | {
            name: shard for name, shard in index["weight_map"].items() if shard != SCALES
        }
        (directory / INDEX).write_text(json.dumps(index))
    with pytest.raises(BigptError, match=message):
        inspect_hf(directory)


def test_a_tied_output_layer_stored_in_fp8_is_compared_dequantised(fp8, tmp_path):
    """A tied model's stored copy of the embedding is dropped only if it is the embedding: an FP8
    copy is compared as dequantised (its raw FP8 values differ from the embedding's)."""
    _, released, _ = fp8
    directory = copy_of(released, tmp_path / "tied", tie_word_embeddings=True)
    head, scales = quantize(load_file(released / "model-00001-of-00002.safetensors")["lm_head.weight"])
    embedding = dequantize(head, scales)

    def tie(tensors):
        tensors.update({"lm_head.weight": head, "model.embed_tokens.weight": embedding})

    edit_shard(directory, "model-00001-of-00002.safetensors", tie)
    edit_shard(directory, SCALES, lambda tensors: tensors.update({"lm_head.weight" + SCALE_SUFFIX: scales}))
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"]["lm_head.weight" + SCALE_SUFFIX] = SCALES
    (directory / INDEX).write_text(json.dumps(index))
    _, weights = inspect_hf(directory)
    assert "lm_head.weight" not in weights.files and torch.equal(weights.get("model.embed_tokens.weight"), embedding)


@pytest.mark.slow
def test_an_fp8_release_imports_and_exports_as_its_dequantised_model(fp8, tmp_path, capsys):
    """init.from_hf of the FP8 release computes transformers' logits of the dequantised model; its
    export is that float32 model, which transformers loads with no quantization_config."""
    from bigpt.hf.convert import export_hf
    from bigpt.runtime.distributed import process_group_of_one
    from test_hf_moe import logits_in_process

    original, released, reference = fp8
    dequantized = copy_of(original, tmp_path / "dequantized")
    save_file(load_file(original / "model.safetensors") | reference, dequantized / "model.safetensors")
    tokens = np.random.default_rng(3).integers(0, SHAPES["gqa2_untied"]["vocab_size"], size=(2, 16))
    np.save(tmp_path / "tokens.npy", tokens)
    recipe = recipe_for(released, tmp_path / "fp8.toml", "fp8")
    logits = logits_in_process(recipe, tmp_path / "run", tmp_path / "tokens.npy")
    assert np.abs(logits - reference_logits(dequantized, tokens)).max() <= TOLERANCE
    assert "are dequantised to float32 as they are read" in capsys.readouterr().err
    with process_group_of_one():
        export_hf(tmp_path / "run" / "init_from_hf", tmp_path / "exported")
    exported, expected = hf_tensors(tmp_path / "exported"), hf_tensors(dequantized)
    assert sorted(exported) == sorted(expected)
    assert all(torch.equal(exported[name], tensor) for name, tensor in expected.items())
    assert "quantization_config" not in json.loads((tmp_path / "exported" / "config.json").read_text())


@pytest.mark.slow
def test_an_fp8_deepseek_v3_release_computes_its_dequantised_model(tmp_path, capsys):
    """A tiny DeepSeek-V3 released as DeepSeek releases it: every projection of its attention, MLPs
    and experts in FP8 blocks, the other tensors in bfloat16 but the router's float32
    e_score_correction_bias, and a multi-token-prediction layer (quantised too) that bigpt leaves
    out. The bias is read as stored, the rest in bfloat16 with no conversion to say, and bigpt's
    logits are transformers' of the dequantised model. Its export keeps the bias in float32."""
    from bigpt.hf.convert import export_hf
    from bigpt.runtime.distributed import process_group_of_one
    from test_hf_deepseek import SHAPES as DEEPSEEK
    from test_hf_moe import logits_in_process

    shape = DEEPSEEK["deepseek_v3"]
    original = save_model(tmp_path / "original", 4, shape)
    stored = {
        name: tensor if name.endswith(KEPT_AS_STORED) else tensor.to(torch.bfloat16)
        for name, tensor in load_file(original / "model.safetensors").items()
    }
    save_file(stored, original / "model.safetensors", metadata={"format": "pt"})
    edit_config(original, dtype="bfloat16")
    last = shape["num_hidden_layers"]
    mtp = {  # what DeepSeek-V3's release stores for its one MTP layer: a layer and its own projections
        name.replace(f"layers.{last - 1}.", f"layers.{last}."): tensor.clone()
        for name, tensor in stored.items()
        if name.startswith(f"model.layers.{last - 1}.")
    }
    hidden = shape["hidden_size"]
    mtp[f"model.layers.{last}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden, dtype=torch.bfloat16) * 0.1
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"model.layers.{last}.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    released = tmp_path / "released"
    reference = write_fp8_release(original, released, mtp, num_nextn_predict_layers=1, dtype="bfloat16")
    # 5 attention projections a layer, 3 in a dense MLP, 3 in each routed expert and in the shared ones
    dense = shape["first_k_dense_replace"]
    main_model = [name for name in reference if f"layers.{last}." not in name]
    assert len(main_model) == last * 5 + dense * 3 + (last - dense) * (shape["n_routed_experts"] + 1) * 3
    dequantized = copy_of(original, tmp_path / "dequantized")
    save_file(
        stored | {name: reference[name].to(torch.bfloat16) for name in main_model}, dequantized / "model.safetensors"
    )

    _, weights = inspect_hf(released)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert weights.get(bias).dtype == torch.float32 and torch.equal(weights.get(bias), stored[bias])
    assert not torch.equal(stored[bias].to(torch.bfloat16).float(), stored[bias])  # bfloat16 would round it
    assert weights.get(main_model[0]).dtype == torch.bfloat16 and len(weights.notes) == 1  # no conversion to note
    tokens = np.random.default_rng(4).integers(0, shape["vocab_size"], size=(2, 16))
    np.save(tmp_path / "tokens.npy", tokens)
    logits = logits_in_process(
        recipe_for(released, tmp_path / "fp8.toml", "fp8"), tmp_path / "run", tmp_path / "tokens.npy"
    )
    assert np.abs(logits - reference_logits(dequantized, tokens)).max() <= TOLERANCE
    # ... not those of the weights before quantisation: the comparison sees the dequantisation
    assert np.abs(logits - reference_logits(original, tokens)).max() > 100 * TOLERANCE
    said = capsys.readouterr().err
    assert f"their {len(reference)} _scale_inv tensors are not imported" in said
    assert "multi-token-prediction layers" in said
    # exported in bfloat16, the checkpoint's dtype, but the router bias in float32, as imported
    with process_group_of_one():
        export_hf(tmp_path / "run" / "init_from_hf", tmp_path / "exported")
    exported = hf_tensors(tmp_path / "exported")
    assert exported[bias].dtype == torch.float32 and torch.equal(exported[bias], stored[bias])
    assert exported[main_model[0]].dtype == torch.bfloat16
