"""The curation report: per stage and per rule, documents and words kept and dropped.

Built from the per-task counts under ``work/audit`` (see audit.py). "words" are
whitespace-separated words, a tokenizer-independent stand-in for tokens; words a stage cut from
documents it kept (C4 removes lines) are counted under the rule "edited_lines".
"""

import json
from pathlib import Path

from bigpt.curate.audit import LENGTH_BINS, SKIPPED_LINES
from bigpt.curate.plan import stage_folder
from bigpt.curate.recipe import CurationRecipe
from bigpt.errors import BigptError
from bigpt.paths import replacing_atomically


def build_report(recipe: CurationRecipe, work: Path, tasks: int) -> dict:
    stages = []
    for index, name in enumerate(recipe.stages):
        folder = work / "audit" / stage_folder(index, name)
        records = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
        if len(records) != tasks:
            raise BigptError(
                f"{folder} has counts of {len(records)} of {tasks} tasks: the run did not "
                f"finish; re-run the same command to resume it."
            )
        stage = _stage(name, records, recipe.report.excerpts)
        band = work / "stages" / stage_folder(index, name) / "band.json"
        if band.is_file():  # the perplexity stage: the scores that bound the kept band
            stage["band"] = json.loads(band.read_text())
        stages.append(stage)
    first, last = stages[0], stages[-1]
    return {
        "name": recipe.name,
        "input": recipe.input.path,
        "output": str(Path(recipe.output.dir) / "curated.jsonl"),
        "word_unit": "whitespace-separated words",
        "read": {"documents": first["in"]["documents"], "skipped_lines": _skipped_lines(work)},
        "total": {
            "in": first["in"],
            "kept": last["kept"],
            "dropped": {key: first["in"][key] - last["kept"][key] for key in ("documents", "words")},
        },
        "stages": [{key: value for key, value in stage.items() if not key.startswith("hist")} for stage in stages],
        "length_histogram": {
            "bin_lower_edges_words": [0] + [2 ** (b - 1) for b in range(1, LENGTH_BINS)],
            "before": first["hist_in"],
            "after": last["hist_kept"],
        },
    }


def _skipped_lines(work: Path) -> dict:
    """Input lines not read as documents, by reason (JSONL input only)."""
    skipped: dict[str, int] = {}
    for path in sorted((work / SKIPPED_LINES).glob("*.json")):
        for reason, count in json.loads(path.read_text()).items():
            skipped[reason] = skipped.get(reason, 0) + count
    return dict(sorted(skipped.items()))


def _stage(name: str, records: list[dict], limit: int) -> dict:
    def total(key):
        return [sum(record[key][i] for record in records) for i in range(2)]

    reasons = sorted({reason for record in records for reason in record["dropped"]})
    dropped = {
        reason: [sum(r["dropped"].get(reason, [0, 0])[i] for r in records) for i in range(2)] for reason in reasons
    }
    return {
        "stage": name,
        "in": _counts(total("in")),
        "kept": _counts(total("kept")),
        "dropped": _counts([sum(counts[i] for counts in dropped.values()) for i in range(2)]),
        "dropped_by_rule": {reason: _counts(counts) for reason, counts in dropped.items()},
        "excerpts": {
            reason: [quote for record in records for quote in record["excerpts"].get(reason, [])][:limit]
            for reason in reasons
            if limit
        },
        "hist_in": [sum(column) for column in zip(*(record["hist_in"] for record in records))],
        "hist_kept": [sum(column) for column in zip(*(record["hist_kept"] for record in records))],
    }


def _counts(pair) -> dict:
    return {"documents": pair[0], "words": pair[1]}


def draw_report(report: dict, path: Path) -> None:
    """Two panels: documents (and words) dropped per stage and rule, stages that dropped nothing
    included; document lengths before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []  # (label, documents, words): each stage's total, then its rules
    for stage in report["stages"]:
        dropped, rules = stage["dropped"], stage["dropped_by_rule"]
        names = "all rules" if len(rules) > 1 else next(iter(rules), "nothing dropped")
        rows.append((f"{stage['stage']}: {names}", dropped["documents"], dropped["words"]))
        if len(rules) > 1:
            rows += [(f"    {reason}", counts["documents"], counts["words"]) for reason, counts in rules.items()]
    figure, (left, right) = plt.subplots(1, 2, figsize=(15, max(4, 0.35 * len(rows) + 1.5)))
    total = report["total"]
    figure.suptitle(
        f"{report['name']}: kept {total['kept']['documents']:,} of "
        f"{total['in']['documents']:,} documents, {total['kept']['words']:,} of "
        f"{total['in']['words']:,} words"
    )
    rows = rows[::-1]
    bars = left.barh(
        [label for label, _, _ in rows],
        [documents for _, documents, _ in rows],
        color=["tab:red" if label.startswith(" ") else "tab:purple" for label, _, _ in rows],
    )
    left.bar_label(bars, [f"{documents:,} docs, {words:,} words" for _, documents, words in rows], padding=3)
    left.margins(x=0.35)
    left.set_xlabel("documents dropped")
    left.set_title("dropped per stage (purple) and rule (red), in run order")
    histogram = report["length_histogram"]
    edges = histogram["bin_lower_edges_words"]
    used = [i for i in range(len(edges)) if histogram["before"][i] or histogram["after"][i]]
    span = range(used[0], used[-1] + 1) if used else range(0)
    names = [f"{edges[i]}+" for i in span]
    positions = list(range(len(names)))
    right.bar([p - 0.2 for p in positions], [histogram["before"][i] for i in span], 0.4, label="before")
    right.bar([p + 0.2 for p in positions], [histogram["after"][i] for i in span], 0.4, label="after")
    right.set_xticks(positions, names, rotation=45)
    right.set_xlabel("document length (words, log2 bins)")
    right.set_ylabel("documents")
    right.set_title("document length before and after curation")
    right.legend()
    figure.tight_layout()
    with replacing_atomically(path, "output.dir's report.png") as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
