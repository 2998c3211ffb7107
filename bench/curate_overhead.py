"""tools/curate.py against the same datatrove pipeline written by hand, in one invocation.

    OMP_NUM_THREADS=1 python bench/curate_overhead.py [--clean 300] [--files 4] [--tasks N]

Both run the stages of recipes/data/web_quality.toml (Gopher repetition and quality, C4,
FineWeb quality, exact and MinHash dedup) on the same generated corpus (tests/curate_corpus.py,
planted defects included) with datatrove's local executor; the hand-written pipeline is plain
datatrove (no recipe, no per-stage counting, no report). Runs go hand, bigpt, bigpt, hand at 1
worker, then the same at 2 workers; the spaCy word tokenizer is loaded once before timing.
Prints documents/s per worker, the ratio bigpt/hand (bigpt's overhead: counting, report,
merge), the CPU seconds bigpt's processes used per second of wall time (what the machine gave
them: 2 workers can only be faster where it gives more than one core) and the speed-up from 1
to 2 workers, next to the machine's own: a busy loop in 1 process, then in 2 at once.

``--files 1 --tasks 2``: one large JSONL in two tasks (bigpt splits the file by bytes;
datatrove by hand gives the file to one task and the other idles), what a user with one big
file gets from a second worker.
"""

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.dedup import (  # noqa: E402
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import (  # noqa: E402
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402
from datatrove.utils.hashing import HashConfig  # noqa: E402
from datatrove.utils.word_tokenizers import load_word_tokenizer  # noqa: E402

from bigpt.curate import load_curation_recipe  # noqa: E402
from bigpt.curate.run import curate  # noqa: E402
from curate_corpus import planted_corpus, write_corpus  # noqa: E402

RECIPE = REPO / "recipes/data/web_quality.toml"


def text(doc) -> str:
    return " ".join(doc.text.lower().split())


def by_hand(raw: Path, work: Path, tasks: int, workers: int) -> int:
    """The pipeline as a datatrove user would write it; returns the documents kept."""
    hashing = HashConfig(precision=64, hash_fc="sha1")
    exact = ExactDedupConfig(content_getter=text, hash_config=hashing)
    minhash = MinhashConfig(hash_config=hashing)

    def run(name, pipeline, job_tasks):
        LocalPipelineExecutor(
            pipeline,
            tasks=job_tasks,
            workers=min(workers, job_tasks),
            logging_dir=str(work / "logs" / name),
            start_method="fork",
        ).run()

    def docs(folder):
        return JsonlReader(str(work / folder), glob_pattern="*.jsonl", compression=None)

    def writer(folder):
        return JsonlWriter(str(work / folder), output_filename="${rank}.jsonl", compression=None)

    run(
        "filters",
        [
            JsonlReader(str(raw)),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            C4QualityFilter(),
            FineWebQualityFilter(),
            writer("filtered"),
        ],
        tasks,
    )
    run(
        "exact_sigs",
        [docs("filtered"), ExactDedupSignature(str(work / "exact/sigs"), exact, finder_workers=tasks)],
        tasks,
    )
    run("exact_find", [ExactFindDedups(str(work / "exact/sigs"), str(work / "exact/dups"), exact)], tasks)
    run("exact_filter", [docs("filtered"), ExactDedupFilter(str(work / "exact/dups"), exact), writer("exact")], tasks)
    run("mh_sigs", [docs("exact"), MinhashDedupSignature(str(work / "mh/sigs"), minhash)], tasks)
    run(
        "mh_buckets",
        [MinhashDedupBuckets(str(work / "mh/sigs"), str(work / "mh/buckets"), config=minhash)],
        minhash.num_buckets,
    )
    run("mh_cluster", [MinhashDedupCluster(str(work / "mh/buckets"), str(work / "mh/remove"), config=minhash)], 1)
    run("mh_filter", [docs("exact"), MinhashDedupFilter(str(work / "mh/remove")), writer("final")], tasks)
    return sum(1 for path in (work / "final").glob("*.jsonl") for _ in path.open())


def with_bigpt(raw: Path, out: Path, tasks: int, workers: int) -> int:
    recipe = load_curation_recipe(
        RECIPE,
        [
            f"input.path={raw}",
            f"output.dir={out}",
            f"executor.tasks={tasks}",
            f"executor.workers={workers}",
            "report.png=false",
        ],
    )
    return curate(recipe).report["total"]["kept"]["documents"]


def timed(function, *args) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of this process and its (finished) workers, documents kept."""
    started, cpu = time.perf_counter(), _cpu_seconds()
    kept = function(*args)
    return time.perf_counter() - started, _cpu_seconds() - cpu, kept


def busy(_=None) -> None:
    total = 0
    for number in range(3_000_000):
        total += number * number


def machine_speedup() -> float:
    """Work done per second by 2 processes at once over 1 process, for a pure-Python loop."""
    from multiprocessing import get_context

    pool = get_context("fork").Pool(2)
    pool.map(busy, range(2))  # warm: the processes exist
    one = timed(pool.map, busy, range(1))[0]
    two = timed(pool.map, busy, range(2))[0]
    pool.close()
    return 2 * one / two


def _cpu_seconds() -> float:
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean", type=int, default=300, help="clean documents to generate")
    parser.add_argument("--files", type=int, default=4, help="input files")
    parser.add_argument("--tasks", type=int, help="tasks per step (default: one per input file)")
    args = parser.parse_args(argv)
    tasks = args.tasks or args.files
    scratch = Path(tempfile.mkdtemp(prefix="curate_bench_"))
    try:
        documents = planted_corpus(
            clean=args.clean, copies=args.clean // 8, junk=args.clean // 10, offtopic=args.clean // 8
        )
        write_corpus(scratch / "raw", documents, args.files)
        load_word_tokenizer("en").word_tokenize("warm up")
        before = machine_speedup()
        print(
            f"curate overhead: {len(documents)} documents in {args.files} files, {tasks} tasks "
            f"({sum(len(d['text'].split()) for d in documents):,} words), stages of {RECIPE.relative_to(REPO)}"
        )
        print(
            f"{'workers':>7} {'hand docs/s/worker':>19} {'bigpt docs/s/worker':>20} {'ratio':>6} "
            f"{'bigpt cpu/wall':>14}  kept"
        )
        rates = {}
        for workers in (1, 2):
            times = {"hand": [], "bigpt": []}
            kept, cpu = {}, []
            for run, who in enumerate(("hand", "bigpt", "bigpt", "hand")):
                folder = scratch / f"{who}_{workers}_{run}"
                seconds, cpu_seconds, kept[who] = timed(
                    by_hand if who == "hand" else with_bigpt, scratch / "raw", folder, tasks, workers
                )
                times[who].append(seconds)
                if who == "bigpt":
                    cpu.append(cpu_seconds / seconds)
            rate = {who: len(documents) / statistics.mean(t) / workers for who, t in times.items()}
            rates[workers] = rate
            print(
                f"{workers:>7} {rate['hand']:>19.1f} {rate['bigpt']:>20.1f} "
                f"{rate['bigpt'] / rate['hand']:>6.3f} {statistics.mean(cpu):>14.2f}  "
                f"hand {kept['hand']}, bigpt {kept['bigpt']}"
            )
        for who in ("hand", "bigpt"):
            print(f"speed-up 1 -> 2 workers, {who}: {2 * rates[2][who] / rates[1][who]:.2f}x")
        print(
            f"speed-up 1 -> 2 processes, a busy loop on this machine: {before:.2f}x before, "
            f"{machine_speedup():.2f}x after"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
