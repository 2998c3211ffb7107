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
/tmp/before main``) on the same directories, for before/after figures.
"""

import argparse
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
from transformers import LlamaConfig, MixtralConfig  # noqa: E402

from bigpt.hf.config import model_from_hf  # noqa: E402
from bigpt.hf.files import plan_shards, write_shards  # noqa: E402
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
    largest = 4 * args.vocab * args.hidden
    kind = f"Mixtral of {args.experts} experts" if args.experts else "Llama"
    print(
        f"hf import/export memory: {kind} fp32, hidden {args.hidden}, vocab {args.vocab}, largest tensor "
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
