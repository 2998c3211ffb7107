"""A model ladder on CPU, end to end: the demo corpus (the standard library's documents) with a
512-token SentencePiece tokenizer, five widths × five budgets of tiny models planned, run one after
another in this process and fitted, as tools/ladder.py does it.

    OMP_NUM_THREADS=1 python bench/ladder.py --out /tmp/ladder-bench     # a few minutes on 2 cores

The fit's text and plot (OUT/ladder/fit.png) are recorded in bench/README.md and docs/ladder.md.
A second call reuses the data and skips the finished runs.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bigpt.cli import Parser  # noqa: E402

WIDTHS, BUDGETS, TOKENS_PER_PARAMETER = "8,16,24,32,48", "1e9,3e9,1e10,3e10,1e11", "2,100"
BASE = f"""name = "ladder-bench"
base = "{REPO / "recipes/base/ladder_tiny.toml"}"
[data]
source = "indexed"
tokenizer = "tokenizer.model"
blend = [{{ path = "demo_text_document" }}]
split = "98,2,0"
"""

parser = Parser(__doc__)
parser.add_argument("--out", type=Path, required=True, help="directory for the data, the ladder and its fit")


def main(argv=None) -> int:
    args = parser.parse_args(argv)
    from bigpt.data.demo_corpus import write_demo_corpus
    from bigpt.data.preprocess import preprocess
    from bigpt.data.tokenizer_training import train_tokenizer
    from tools import ladder

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "demo_text_document.idx").exists():
        corpus, _, _ = write_demo_corpus(out)
        train_tokenizer([corpus], 512, out / "tokenizer")
        preprocess(corpus, str(out / "demo_text_document"), out / "tokenizer.model")
    (out / "base.toml").write_text(BASE)
    steps = [
        ["plan", str(out / "base.toml"), "--out", str(out / "ladder"), "--widths", WIDTHS, "--budgets", BUDGETS]
        + ["--tokens-per-parameter", TOKENS_PER_PARAMETER, "--gpus", "1"],
        ["run", str(out / "ladder")],
        ["fit", str(out / "ladder"), "--budget", "1e12"],
    ]
    for step in steps:
        if code := ladder.main(step):
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
