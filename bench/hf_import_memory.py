"""How much memory does tools/convert_hf.py import (and export) take, against the model's size?

    OMP_NUM_THREADS=1 python bench/hf_import_memory.py [--dir DIR] [--layers 6 30] [--experts N] [--checkout DIR ...]

Writes random-weight Hugging Face Llama directories (fp32, GQA, untied embeddings, ``--hidden``
wide; with ``--experts``, Mixtral directories of that many experts per layer) with ``--layers``
layers each, one layer per safetensors shard, without building a model
(each tensor is made, written and dropped). Each conversion runs in a fresh process of its own:
``import`` of every directory, then ``export`` of that import. Its peak resident memory is the
kernel's (``ru_maxrss`` of that child alone, from ``wait4``); the baseline is a child that
imports the same modules, opens the same process group and exits, measured in the same
invocation. Prints model bytes, peak RSS, peak minus baseline, (peak - baseline) / model and
the wall time.
``--checkout`` also measures the tools of other checkouts of bigpt (e.g. ``git worktree add
/tmp/before main``) on the same directories, for before/after figures. ``--fp8`` stores the
layers' matrices as DeepSeek-V3's release does (float8_e4m3fn, a float32 scale per 128 × 128
block, ``quantization_config`` fp8), so that import dequantises each as it reads it.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, MixtralConfig  # noqa: E402

from bigpt.hf.config import model_from_hf  # noqa: E402
from bigpt.hf.files import CONFIG, INDEX, SCALE_SUFFIX, plan_shards, write_shards  # noqa: E402
from bigpt.hf.mapping import expected_hf_shapes  # noqa: E402

BASELINE = """
import sys
sys.path.insert(0, sys.argv[1])
from bigpt.hf.convert import export_hf, import_hf
from bigpt.runtime.distributed import process_group_of_one
with process_group_of_one():
    pass
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/bigpt-bench/hf-memory", help="directory to write into (emptied)")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 30], help="one model per number of layers")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (ffn 2.75x, 8 heads, 4 key/value heads)")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size")
    parser.add_argument("--experts", type=int, default=0, help="write Mixtral models of this many experts a layer")
    parser.add_argument("--checkout", action="append", default=[], help="another bigpt checkout to measure too")
    parser.add_argument("--fp8", action="store_true", help="store the layers' matrices in FP8 blocks (DeepSeek-V3's)")
    return parser.parse_args(argv)


def write_model(directory: Path, layers: int, hidden: int, vocab: int, experts: int) -> int:
    """A random Llama (or Mixtral of ``experts`` experts), one shard per layer; returns its bytes."""
    shape = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    config = MixtralConfig(**shape, num_local_experts=experts) if experts else LlamaConfig(**shape)
    config.save_pretrained(directory)
    shapes = expected_hf_shapes(model_from_hf(config.to_dict(), directory))
    sizes = [(name, 4 * math.prod(shape)) for name, shape in shapes.items()]
    generator = torch.Generator().manual_seed(layers)
    layer = sum(size for name, size in sizes if name.startswith("model.layers.0."))
    write_shards(
        directory,
        plan_shards(sizes, layer),
        shapes,
        torch.float32,
        ((name, torch.randn(shape, generator=generator)) for name, shape in shapes.items()),
    )
    return sum(size for _, size in sizes)


FP8_BLOCK = 128


def quantize_to_fp8_blocks(directory: Path) -> int:
    """Every matrix of the layers of ``directory`` (but the routers) in float8_e4m3fn with a
    float32 scale per block (its amax / 448), one shard at a time, as DeepSeek-V3 is released;
    returns the new bytes of the weights."""
    index = json.loads((directory / INDEX).read_text())
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(directory / shard)
        for name in [name for name in tensors if name.startswith("model.layers.") and tensors[name].dim() == 2]:
            if name.endswith(".gate.weight"):  # a router: left in float, as in the release
                continue
            weight = tensors[name]
            rows, columns = (-(-size // FP8_BLOCK) for size in weight.shape)
            padded = torch.zeros(rows * FP8_BLOCK, columns * FP8_BLOCK)
            padded[: weight.shape[0], : weight.shape[1]] = weight
            blocks = padded.view(rows, FP8_BLOCK, columns, FP8_BLOCK)
            scales = blocks.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max
            quantized = (blocks / scales[:, None, :, None]).view(padded.shape)[: weight.shape[0], : weight.shape[1]]
            tensors[name] = quantized.to(torch.float8_e4m3fn)
            tensors[name + SCALE_SUFFIX] = scales
            index["weight_map"][name + SCALE_SUFFIX] = shard
        save_file(tensors, directory / shard, metadata={"format": "pt"})
        total += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    (directory / INDEX).write_text(json.dumps(index))
    config = json.loads((directory / CONFIG).read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (directory / CONFIG).write_text(json.dumps(config))
    return total


def peak_rss(command: list[str]) -> tuple[int, float]:
    """Peak resident bytes and wall seconds of ``command``, run to completion as a child of its own."""
    start = time.perf_counter()
    child = subprocess.Popen(
        command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(command)} failed:\n{child.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # Linux reports KiB


def main(argv=None) -> None:
    args = parse_args(argv)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    checkouts = [ROOT] + [Path(c).resolve() for c in args.checkout]
    models = {
        layers: write_model(root / f"hf_{layers}", layers, args.hidden, args.vocab, args.experts)
        for layers in args.layers
    }
    if args.fp8:
        models = {layers: quantize_to_fp8_blocks(root / f"hf_{layers}") for layers in models}
    largest = 4 * args.vocab * args.hidden
    kind = f"Mixtral of {args.experts} experts" if args.experts else "Llama"
    kind += " fp32" + (", the layers' matrices in FP8 blocks (dequantised to fp32 on import)" if args.fp8 else "")
    print(
        f"hf import/export memory: {kind}, hidden {args.hidden}, vocab {args.vocab}, largest tensor "
        f"{largest / 2**20:.1f} MiB; torch {torch.__version__}, one fresh process per figure"
    )
    print(
        f"{'checkout':<28} {'layers':>6} {'model MiB':>10} {'step':>7} {'peak MiB':>9} {'- base MiB':>11} "
        f"{'/ model':>8} {'seconds':>8}"
    )
    for checkout in checkouts:
        base, seconds = peak_rss([sys.executable, "-c", BASELINE, str(checkout)])
        print(f"{str(checkout):<28} {'':>6} {'':>10} {'base':>7} {base / 2**20:9.0f} {'':>11} {'':>8} {seconds:8.1f}")
        tool = [sys.executable, str(checkout / "tools" / "convert_hf.py")]
        for layers, size in models.items():
            imported, exported = root / f"imported_{layers}", root / f"exported_{layers}"
            for step, command in (
                ("import", ["import", str(root / f"hf_{layers}"), str(imported)]),
                ("export", ["export", str(imported), str(exported)]),
            ):
                peak, seconds = peak_rss(tool + command)
                print(
                    f"{str(checkout):<28} {layers:6d} {size / 2**20:10.0f} {step:>7} {peak / 2**20:9.0f} "
                    f"{(peak - base) / 2**20:11.0f} {(peak - base) / size:8.3f} {seconds:8.1f}"
                )
            shutil.rmtree(imported)
            shutil.rmtree(exported)


if __name__ == "__main__":
    main()
