"""How well the shipped curation recipes keep good text and remove bad text, on a labelled set.

    OMP_NUM_THREADS=1 python bench/curate_quality.py [--workers 2] [--per-genre 100] [--per-defect 60] [--set FILE]

Builds the evaluation set of bench/quality_corpus.py (clean prose of five genres found on this
machine, plus planted defects), runs every recipe of recipes/data/ on it with tools/curate.py's
code, and prints per genre the clean documents lost (a clean document counts as kept when it or
one of its copies survives) with the rules that dropped them (the first filter rule that drops
the document, by running the recipe's filter stages on it), and per defect class the recall:
the share removed (for copies: removed while one of their group survives). Recipes that need a
model file are skipped. Targets for web_quality.toml: clean false drops <= 5% in every genre,
recall >= 95% on spam, gibberish, exact and near duplicates.
"""

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from quality_corpus import DEFECTS, GENRES, evaluation_set, genre, kind, original  # noqa: E402

from bigpt.curate import load_curation_recipe  # noqa: E402
from bigpt.curate.recipe import MODEL_FILES  # noqa: E402
from bigpt.curate.run import curate  # noqa: E402
from bigpt.curate.stages import first_drop  # noqa: E402
from curate_corpus import write_corpus  # noqa: E402

TARGETS = {"false_drops": 0.05, "recall": 0.95, "targeted": ("spam", "gibberish", "exact", "near")}


def measure(recipe, documents: list[dict], kept: set[str]) -> tuple[dict, dict]:
    """Per genre: clean documents, lost, reasons; per defect: planted, removed."""
    texts = {doc["id"]: doc["text"] for doc in documents}
    survivors = Counter(original(i) for i in kept if kind(i) in ("clean", "exact", "near"))
    genres = {g: {"clean": 0, "lost": 0, "reasons": Counter()} for g in GENRES}
    for doc_id in texts:
        if kind(doc_id) == "clean":
            row = genres[genre(doc_id)]
            row["clean"] += 1
            if not survivors[doc_id]:
                row["lost"] += 1
                row["reasons"][first_drop(recipe, texts[doc_id]) or "dedup or selection"] += 1
    defects = {d: {"planted": 0, "removed": 0} for d in DEFECTS}
    for doc_id in texts:
        if kind(doc_id) in defects:
            row = defects[kind(doc_id)]
            row["planted"] += 1
            copy = kind(doc_id) in ("exact", "near")
            # a copy kept as its group's only survivor is no miss: the text is kept once
            row["removed"] += doc_id not in kept or (copy and survivors[original(doc_id)] == 1)
    return genres, defects


def print_tables(name: str, genres: dict, defects: dict) -> bool:
    met = True
    print(f"\n{name}")
    print(f"  {'genre':<11} {'clean':>5} {'lost':>5} {'false drops':>11}  first rule that drops them")
    for g, row in genres.items():
        rate = row["lost"] / max(row["clean"], 1)
        met &= rate <= TARGETS["false_drops"]
        reasons = ", ".join(f"{r} {n}" for r, n in row["reasons"].most_common(3))
        print(f"  {g:<11} {row['clean']:>5} {row['lost']:>5} {rate:>10.1%}  {reasons}")
    print(f"  {'defect':<11} {'planted':>7} {'removed':>7} {'recall':>7}")
    for d, row in defects.items():
        recall = row["removed"] / max(row["planted"], 1)
        if d in TARGETS["targeted"]:
            met &= recall >= TARGETS["recall"]
        print(f"  {d:<11} {row['planted']:>7} {row['removed']:>7} {recall:>7.1%}")
    return met


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-genre", type=int, default=100)
    parser.add_argument("--per-defect", type=int, default=60)
    parser.add_argument(
        "--set",
        type=Path,
        help="a JSONL file of the evaluation set: read when it exists, else "
        "built and written there (the machine's man pages and READMEs change as packages do)",
    )
    parser.add_argument("--recipes", nargs="*", default=sorted(str(p) for p in (REPO / "recipes/data").glob("*.toml")))
    args = parser.parse_args(argv)
    if args.set and args.set.exists():
        documents = [json.loads(line) for line in args.set.open()]
    else:
        documents = evaluation_set(per_genre=args.per_genre, per_defect=args.per_defect)
        if args.set:
            args.set.write_text("".join(json.dumps(doc) + "\n" for doc in documents))
    counts = Counter(kind(doc["id"]) for doc in documents)
    print(
        f"curate quality: {len(documents)} documents ({counts['clean']} clean in {len(GENRES)} genres, "
        f"{args.per_defect} of each of {len(DEFECTS)} defects), "
        f"{sum(len(doc['text'].split()) for doc in documents):,} words"
    )
    scratch = Path(tempfile.mkdtemp(prefix="curate_quality_"))
    results = {}
    try:
        write_corpus(scratch / "raw", documents, files=4)
        for path in args.recipes:
            recipe = load_curation_recipe(
                path,
                [
                    f"input.path={scratch / 'raw'}",
                    f"output.dir={scratch / Path(path).stem}",
                    f"executor.workers={args.workers}",
                    "report.png=false",
                ],
            )
            needs = [stage for stage in recipe.stages if stage in MODEL_FILES]
            if needs:
                print(f"\n{Path(path).name}: skipped, {', '.join(needs)} needs a model file")
                continue
            curate(recipe)
            kept = {json.loads(line)["id"] for line in (Path(recipe.output.dir) / "curated.jsonl").open()}
            genres, defects = measure(recipe, documents, kept)
            results[Path(path).name] = print_tables(Path(path).name, genres, defects)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if "web_quality.toml" in results:
        print(
            f"\nweb_quality.toml targets (false drops <= {TARGETS['false_drops']:.0%} per genre, recall >= "
            f"{TARGETS['recall']:.0%} on {', '.join(TARGETS['targeted'])}): "
            f"{'met' if results['web_quality.toml'] else 'NOT met'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
