"""Curate a raw corpus with a TOML recipe of datatrove stages (filters, keyword/URL selection,
deduplication), before tokenization.

    python tools/curate.py recipes/data/web_quality.toml executor.workers=8
    python tools/preprocess_data.py --input curated/web/curated.jsonl ...

Writes OUTPUT/curated.jsonl, OUTPUT/report.json and OUTPUT/report.png (output.dir in the
recipe). Re-running the same command after an interruption resumes: finished shards are not
redone. Needs the curation extra: pip install -e '.[curate]'.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.errors import reports_user_errors  # noqa: E402

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a curation recipe (recipes/data/*.toml)")
    parser.add_argument("overrides", nargs="*", metavar="table.key=value",
                        help="dotted overrides, e.g. stage.gopher_quality.min_doc_words=30")
    parser.add_argument("--restart", action="store_true",
                        help="discard the output directory's earlier work and start over")
    return parser.parse_args(argv)


@reports_user_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from bigpt.curate import load_curation_recipe
    from bigpt.curate.run import curate

    recipe = load_curation_recipe(args.recipe, args.overrides)
    try:
        result = curate(recipe, restart=args.restart)
    except KeyboardInterrupt:
        print("bigpt: interrupted; run the same command again to resume (finished shards are kept).",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.report is None:
        print(f"submitted the curation jobs to SLURM; the last one writes {result.output}/curated.jsonl")
        return 0
    for stage in result.report["stages"]:
        rules = ", ".join(f"{rule} {counts['documents']:,}" for rule, counts in stage["dropped_by_rule"].items())
        print(f"{stage['stage']:>20}: {stage['in']['documents']:,} -> {stage['kept']['documents']:,} "
              f"documents" + (f" (dropped: {rules})" if rules else ""))
    skipped = result.report["read"]["skipped_lines"]
    if skipped:
        print(f"skipped {sum(skipped.values()):,} input lines: "
              + ", ".join(f"{reason} {count:,}" for reason, count in skipped.items()))
    total = result.report["total"]
    print(f"kept {total['kept']['documents']:,} of {total['in']['documents']:,} documents "
          f"({total['kept']['words']:,} of {total['in']['words']:,} words): "
          f"{result.output}/curated.jsonl, report.json, report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
