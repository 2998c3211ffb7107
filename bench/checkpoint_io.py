"""How fast does bigpt save and load a checkpoint, against the raw bandwidth of the same directory?

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/checkpoint_io.py [--dir DIR] [--repeats 3] [key=value ...]

Builds the trainer of ``--recipe`` (default bench/checkpoint_mock.toml: ~100M parameters, fp32,
data parallel over the ranks, so the distributed optimizer shards its state), takes one training
step (so the optimizer has state to save), then, ``--repeats``
times: saves the full training state with bigpt's ``CheckpointWriter`` (synchronous: the time
a step is held up), loads it back with ``load_checkpoint``, and has every rank write (with fsync)
and read back as many bytes as its share of that checkpoint as one plain file in the same
directory. Times are the slowest rank's; rank 0 prints medians, GB/s and the ratios bigpt/raw.
Reads come from the page cache for both, as a resume right after a save would.
"""

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import torch.distributed as dist  # noqa: E402

CHUNK = 64 << 20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "bench" / "checkpoint_mock.toml"), help="TOML recipe")
    parser.add_argument("--dir", default="/tmp/bigpt-bench/checkpoint-io", help="directory to write into")
    parser.add_argument("--repeats", type=int, default=3, help="save/load/raw rounds")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. parallel.tensor=2")
    return parser.parse_args(argv)


def timed(action) -> float:
    dist.barrier()
    start = time.perf_counter()
    action()
    dist.barrier()
    return time.perf_counter() - start


def raw_write(path: Path, size: int) -> None:
    block = os.urandom(min(CHUNK, size))
    with open(path, "wb") as f:
        for offset in range(0, size, len(block)):
            f.write(block[: size - offset])
        f.flush()
        os.fsync(f.fileno())


def raw_read(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass


def main() -> None:
    args = parse_args()
    from bigpt.checkpoint import CheckpointWriter, load_checkpoint
    from bigpt.layout import Layout
    from bigpt.recipe import load_recipe
    from bigpt.runtime.distributed import destroy_distributed, init_distributed
    from bigpt.train.main import build_trainer

    root = Path(args.dir)
    recipe = load_recipe(args.recipe, [f'run_dir="{root / "run"}"', f'checkpoint.dir="{root / "checkpoints"}"',
                                       *args.overrides])
    layout = Layout.from_recipe(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    init_distributed(layout)
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = build_trainer(recipe, layout)
    trainer.train_step(trainer.data_iterator(lambda: trainer.batches(0)))  # the optimizer has state from now on
    writer = CheckpointWriter(root / "checkpoints", asynchronous=False)
    checkpoint = root / "checkpoints" / "iter_0000001"
    raw_file = root / f"raw.{rank}"
    saves, loads, raw_writes, raw_reads = [], [], [], []
    for _ in range(args.repeats):
        saves.append(timed(lambda: writer.save(trainer)))
        loads.append(timed(lambda: load_checkpoint(trainer, checkpoint)))
        size = sum(f.stat().st_size for f in checkpoint.iterdir()) // world
        raw_writes.append(timed(lambda: raw_write(raw_file, size)))
        raw_reads.append(timed(lambda: raw_read(raw_file)))
    raw_file.unlink()
    if rank == 0:
        total = size * world / 1e9
        rows = [("save", saves, raw_writes, "raw write+fsync"), ("load", loads, raw_reads, "raw read")]
        print(f"checkpoint i/o: {args.recipe} | {world} ranks = {layout} | {total:.2f} GB per checkpoint in {root}")
        for name, ours, raw, raw_name in rows:
            a, b = statistics.median(ours), statistics.median(raw)
            print(f"{name}: bigpt {a:.2f} s ({total / a:.2f} GB/s) | {raw_name} {b:.2f} s ({total / b:.2f} GB/s) "
                  f"| ratio bigpt/raw {a / b:.2f}  (medians of {args.repeats})")
    destroy_distributed()


if __name__ == "__main__":
    main()
