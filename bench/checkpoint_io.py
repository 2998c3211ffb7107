"""What does a checkpoint save and load cost, per optimizer format, as data parallelism grows?

    OMP_NUM_THREADS=1 python bench/checkpoint_io.py [--dp 1 2 4] [--sizes small large] [--repeats 3]
        [--formats ...] [--dir DIR] [key=value ...]

Weak scaling: for each model size and each DP size, one torchrun of DP ranks builds the trainer
of ``--recipe`` (default bench/checkpoint_mock.toml: fp32, data parallel over the ranks, so the
distributed optimizer shards its state) with ``2 × DP`` layers of the size's width, so that every
rank holds the same bytes of checkpoint at every DP (small ≈ 27 MB, large ≈ 105 MB per rank),
takes one training step (so the optimizer has state to save), then for each
``checkpoint.optimizer_format``, ``--repeats`` times: a synchronous save with bigpt's
``CheckpointWriter`` (the time a step is held up), a full ``load_checkpoint``, and a plain
write+fsync and read of as many bytes per rank as the checkpoint's average share per rank, as
one file per rank in the same directory. Times are the slowest rank's, medians of the repeats.
Memory is the resident memory a save adds to a rank's process (its peak during the save, sampled
every millisecond, minus its size before), the largest over the ranks; "busiest" is the largest
share of the checkpoint one rank's files hold, against the average share. Reads come from the
page cache for both sides, as a resume right after a save would.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import typing
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import psutil  # noqa: E402

CHUNK = 64 << 20
SIZES = {"small": 256, "large": 512}  # hidden size; ffn 4x, 2 layers per DP rank
RESULT = "checkpoint_io result: "


def parse_args(argv=None):
    from bigpt.recipe.tables import CheckpointConfig

    formats = typing.get_args(CheckpointConfig.__annotations__["optimizer_format"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "bench" / "checkpoint_mock.toml"), help="TOML recipe")
    parser.add_argument("--dir", default="/tmp/bigpt-bench/checkpoint-io", help="directory to write into")
    parser.add_argument("--repeats", type=int, default=3, help="save/load/raw rounds per format")
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4], help="data-parallel sizes (ranks)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="model widths")
    parser.add_argument(
        "--formats",
        nargs="+",
        default=list(formats),
        choices=formats,
        help="checkpoint.optimizer_format values to compare",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one torchrun's ranks
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. precision.dtype=bf16")
    return parser.parse_args(argv)


def size_overrides(size: str, dp: int) -> list[str]:
    hidden = SIZES[size]
    return [
        f"model.hidden_size={hidden}",
        f"model.ffn_hidden_size={4 * hidden}",
        f"model.num_layers={2 * dp}",
        "model.num_attention_heads=4",
        "model.num_query_groups=4",
        "model.vocab_size=256",
        f"train.global_batch_size={dp}",
    ]


def timed(action) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    action()
    dist.barrier()
    return time.perf_counter() - start


class PeakRss:
    """The most resident memory this process had while the block ran, above what it had before."""

    def __enter__(self):
        self.process, self.stop = psutil.Process(), threading.Event()
        self.before = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.added = self.peak - self.before


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


def bytes_per_rank(checkpoint: Path, world: int) -> list[int]:
    """What each rank's files hold (torch's distributed checkpoint names them ``__<rank>_<n>.distcp``)."""
    sizes = [0] * world
    for path in checkpoint.glob("__*.distcp"):
        sizes[int(path.name[2:].split("_")[0])] += path.stat().st_size
    return sizes


def worker(args) -> None:
    """Every format at one size and DP, on the ranks of one torchrun; rank 0 prints a JSON line per format."""
    import torch
    import torch.distributed as dist

    from bigpt.checkpoint import CheckpointWriter, load_checkpoint
    from bigpt.layout import Layout
    from bigpt.recipe import load_recipe
    from bigpt.runtime.distributed import destroy_distributed, init_distributed
    from bigpt.train.checkpointing import checkpointed
    from bigpt.train.main import build_trainer

    root = Path(args.dir)
    recipe = load_recipe(
        args.recipe, [f'run_dir="{root / "run"}"', f'checkpoint.dir="{root / "checkpoints"}"', *args.overrides]
    )
    layout = Layout.from_recipe(recipe, int(os.environ["WORLD_SIZE"]))
    init_distributed(layout)
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = build_trainer(recipe, layout)
    trainer.train_step(trainer.data_iterator(lambda: trainer.batches(0)))  # the optimizer has state from now on
    parameters = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    raw_file = root / f"raw.{rank}"
    for optimizer_format in args.formats:
        training = dataclasses.replace(
            checkpointed(trainer),
            recipe=dataclasses.replace(
                recipe, checkpoint=dataclasses.replace(recipe.checkpoint, optimizer_format=optimizer_format)
            ),
        )
        writer = CheckpointWriter(root / "checkpoints", asynchronous=False)
        checkpoint = root / "checkpoints" / "iter_0000001"
        figures = {key: [] for key in ("save", "load", "raw_write", "raw_read", "save_rss")}

        def save():
            with PeakRss() as rss:
                writer.save(training)
            figures["save_rss"].append(rss.added)

        for _ in range(args.repeats):
            figures["save"].append(timed(save))
            figures["load"].append(timed(lambda: load_checkpoint(training, checkpoint)))
            shares = bytes_per_rank(checkpoint, world)
            size = sum(f.stat().st_size for f in checkpoint.iterdir()) // world
            figures["raw_write"].append(timed(lambda: raw_write(raw_file, size)))
            figures["raw_read"].append(timed(lambda: raw_read(raw_file)))
        raw_file.unlink()
        rss = torch.tensor([max(figures["save_rss"])], dtype=torch.float64)
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        if rank == 0:
            result = {key: statistics.median(values) for key, values in figures.items() if key != "save_rss"}
            print(
                RESULT
                + json.dumps(
                    dict(
                        result,
                        format=optimizer_format,
                        dp=world,
                        parameters=parameters,
                        bytes_per_rank=size,
                        busiest=max(shares) / (sum(shares) / world),
                        save_rss=rss.item(),
                    )
                ),
                flush=True,
            )
    destroy_distributed()


def run_all(args) -> None:
    """One torchrun per size and DP; the table of their results."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    rows = []
    for size in args.sizes:
        for dp in args.dp:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={dp}",
                __file__,
                "--worker",
                "--recipe",
                args.recipe,
                "--dir",
                args.dir,
                "--repeats",
                str(args.repeats),
                "--formats",
                *args.formats,
                "--",
                *args.overrides,
                *size_overrides(size, dp),
            ]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
            rows += [
                dict(json.loads(line.removeprefix(RESULT)), size=size)
                for line in done.stdout.splitlines()
                if line.startswith(RESULT)
            ]
    print(
        f"checkpoint i/o, weak scaling: {args.recipe} with {' '.join(args.overrides) or 'no overrides'} | "
        f"fp32, 2 layers per DP rank | medians of {args.repeats} | times are the slowest rank's"
    )
    print(
        f"{'format':26} {'size':5} {'dp':>2} {'MB/rank':>7} {'busiest':>7} {'save s':>7} {'GB/s':>5} "
        f"{'raw w s':>7} {'save/raw':>8} {'load s':>6} {'raw r s':>7} {'load/raw':>8} {'save +RSS MB':>12}"
    )
    for row in sorted(rows, key=lambda r: (r["format"], list(SIZES).index(r["size"]), r["dp"])):
        total = row["bytes_per_rank"] * row["dp"] / 1e9
        print(
            f"{row['format']:26} {row['size']:5} {row['dp']:>2} {row['bytes_per_rank'] / 1e6:7.1f} "
            f"{row['busiest']:7.2f} {row['save']:7.2f} {total / row['save']:5.2f} {row['raw_write']:7.2f} "
            f"{row['save'] / row['raw_write']:8.2f} {row['load']:6.2f} {row['raw_read']:7.2f} "
            f"{row['load'] / row['raw_read']:8.2f} {row['save_rss'] / 1e6:12.1f}"
        )


def main() -> None:
    args = parse_args()
    worker(args) if args.worker else run_all(args)


if __name__ == "__main__":
    main()
