"""Curate a raw corpus with a TOML recipe of datatrove stages (filters, keyword/URL selection,
deduplication), before tokenization.

    python tools/curate.py recipes/data/web_quality.toml executor.workers=8
    python tools/preprocess_data.py --input curated/web/curated.jsonl ...

Writes OUTPUT/curated.jsonl, OUTPUT/report.json and OUTPUT/report.png (output.dir in the
recipe). Re-running the same command after an interruption resumes: finished shards are not
redone. Needs the curation extra: pip install -e '.[curate]'.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import recipe_parser  # noqa: E402
from bigpt.errors import EXIT_INTERRUPTED, BigptError  # noqa: E402
from bigpt.runtime import console  # noqa: E402

parser = recipe_parser(
    __doc__, recipe_help="a curation recipe (recipes/data/*.toml)", example="stage.gopher_quality.min_doc_words=30"
)
parser.add_argument("--restart", action="store_true", help="discard the output directory's earlier work and start over")
parser.add_argument(
    "--verbose", action="store_true", help="show datatrove's own log lines and warnings (always in work/logs/)"
)
parser.add_argument(
    "--sample",
    type=int,
    metavar="N",
    help="explain mode: run the stages on the first N documents only and show, per "
    "stage and rule, what it drops with excerpts (written to OUTPUT/explain/)",
)


@console.reports_user_errors
def main(argv=None) -> int:
    args = parser.parse_args(argv)
    from bigpt.curate import load_curation_recipe
    from bigpt.curate.run import curate, explain

    recipe = load_curation_recipe(args.recipe, args.overrides)
    if args.sample is not None and args.sample < 1:
        raise BigptError(f"--sample takes a number of documents, 1 or more; got {args.sample}.")
    if not args.verbose:
        from loguru import logger

        logger.disable("datatrove")  # hundreds of lines a run; forked workers inherit this
        os.environ["TQDM_DISABLE"] = "1"  # and its progress bars of sub-second steps
    started = time.perf_counter()
    try:
        result = explain(recipe, args.sample) if args.sample else curate(recipe, restart=args.restart)
    except KeyboardInterrupt:
        console.note("interrupted; run the same command again to resume (finished shards are kept).")
        return EXIT_INTERRUPTED
    if result.report is None:
        console.say(f"submitted the curation jobs to SLURM; the last one writes {result.output}/curated.jsonl")
        return 0
    for stage in result.report["stages"]:
        console.say(f"{stage['stage']:>20}: {stage['in']['documents']:,} -> {stage['kept']['documents']:,} documents")
        for rule, counts in stage["dropped_by_rule"].items():
            console.say(f"{'':>22}{rule}: {counts['documents']:,} documents, {counts['words']:,} words")
            for excerpt in stage["excerpts"].get(rule, []):
                console.say(f"{'':>24}{excerpt['id']} ({excerpt['words']:,} words): {excerpt['text'][:100]}")
    skipped = result.report["read"]["skipped_lines"]
    if skipped:
        console.say(
            f"skipped {sum(skipped.values()):,} input lines: "
            + ", ".join(f"{reason} {count:,}" for reason, count in skipped.items())
        )
    total = result.report["total"]
    seconds = time.perf_counter() - started
    console.say(
        f"kept {total['kept']['documents']:,} of {total['in']['documents']:,} documents "
        f"({total['kept']['words']:,} of {total['in']['words']:,} words) in {seconds:.1f} s "
        f"({total['in']['documents'] / seconds:,.0f} documents/s): "
        f"{result.output}/curated.jsonl, report.json, report.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
