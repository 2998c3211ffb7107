"""Write the two demo multiple-choice tasks in recipes/tasks/ from text every Python installation
carries (the standard library's docstrings), in the format of docs/evaluation.md.

    python tools/make_demo_tasks.py recipes/tasks --overwrite

stdlib_continuation: the start of a docstring sentence; which of four endings is its own (the
others end other functions' sentences): HellaSwag's shape.
stdlib_function: a function's one-line summary; which of four names is the function's: ARC's shape.
Deterministic for one Python version; the shipped files were written with Python 3.11.
"""

import inspect
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import Parser, add_overwrite  # noqa: E402
from bigpt.runtime import console  # noqa: E402

parser = Parser(__doc__)
parser.add_argument("out", metavar="OUT_DIR", nargs="?", default="recipes/tasks", help="where the two task files go")
add_overwrite(parser, "task files already in OUT_DIR")

MODULES = (
    "os",
    "os.path",
    "shutil",
    "json",
    "string",
    "textwrap",
    "itertools",
    "functools",
    "math",
    "statistics",
    "random",
    "re",
    "heapq",
    "bisect",
    "datetime",
    "calendar",
    "fnmatch",
    "glob",
    "base64",
    "binascii",
)
EXAMPLES = 60


def summaries() -> list[tuple[str, str]]:
    """(function name, first sentence of its docstring) of the public functions of MODULES."""
    import importlib

    found, seen = [], set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, member in sorted(vars(module).items()):
            if name.startswith("_") or not callable(member) or inspect.isclass(member):
                continue
            doc = inspect.getdoc(member) or ""
            sentence = re.split(r"(?<=\.)\s", " ".join(doc.split("\n\n")[0].split()))[0]
            words = sentence.split()
            if 6 <= len(words) <= 24 and sentence.endswith(".") and sentence not in seen and name not in dict(found):
                seen.add(sentence)
                found.append((name, sentence))
    return found


def second_half(sentence: str) -> str:
    words = sentence.split()
    return " ".join(words[len(words) // 2 :])


@console.reports_user_errors
def main(argv=None) -> int:
    from bigpt.paths import check_output_file, write_atomically

    args = parser.parse_args(argv)
    files = ("stdlib_continuation.jsonl", "stdlib_function.jsonl")
    for file_name in files:
        check_output_file(Path(args.out) / file_name, "OUT_DIR", args.overwrite)
    rows = summaries()
    rng = random.Random(0)
    rng.shuffle(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    continuation, function = [], []
    for index, (name, sentence) in enumerate(rows[:EXAMPLES]):
        words = sentence.split()
        cut = len(words) // 2
        ending = " ".join(words[cut:])
        endings = sorted({second_half(other) for _, other in rows} - {ending})
        distractors = rng.sample(endings, 3)
        others = [row for row in rows if row[0] != name]
        gold = index % 4
        choices = distractors[:gold] + [ending] + distractors[gold:]
        continuation.append({"context": " ".join(words[:cut]), "choices": choices, "gold": gold})
        names = [other for other, _ in rng.sample(others, 3)]
        choices = names[:gold] + [name] + names[gold:]
        function.append({"context": f'"{sentence}" This describes the function', "choices": choices, "gold": gold})
    for file_name, examples in zip(files, (continuation, function), strict=True):
        write_atomically(out / file_name, "".join(json.dumps(example) + "\n" for example in examples))
        console.say(f"{out / file_name}: {len(examples)} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
