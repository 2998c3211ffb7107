"""Train a fastText quality classifier from positive and negative example documents, for the
curation stage ``quality_classifier``.

    python tools/train_quality_classifier.py --positive trusted.jsonl --negative web_sample.jsonl \\
        --out models/quality.bin

Positive examples get the label "hq", negative ones "lq"; name the model in a curation recipe:
[stage.quality_classifier] model = "models/quality.bin", label = "hq", min_score = 0.5.
Needs the curation extra: pip install -e '.[curate]'.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import Parser, add_overwrite  # noqa: E402
from bigpt.errors import BigptError  # noqa: E402
from bigpt.runtime import console  # noqa: E402

parser = Parser(__doc__)
parser.add_argument(
    "--positive", required=True, type=Path, help="good documents: JSONL (one object per line) or text (one per line)"
)
parser.add_argument("--negative", required=True, type=Path, help="bad documents, same formats")
parser.add_argument("--out", required=True, type=Path, help="the model file to write")
add_overwrite(parser, "an existing --out file")
parser.add_argument("--field", default="text", help="JSONL field holding the text")
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--lr", type=float, default=0.5, help="learning rate")
parser.add_argument("--ngrams", type=int, default=2, help="word n-gram features")
parser.add_argument("--dim", type=int, default=32, help="embedding size")
parser.add_argument(
    "--buckets",
    type=int,
    default=200_000,
    help="hash buckets of the n-gram features (the model holds buckets x dim floats)",
)
parser.add_argument(
    "--held-out", type=float, default=0.1, help="share of the examples kept out of training to measure the model"
)
parser.add_argument("--seed", type=int, default=0)


def parse_args(argv=None):
    """The options, checked."""
    args = parser.parse_args(argv)
    if not 0 <= args.held_out < 1:
        parser.error("--held-out must be in [0, 1)")
    return args


@console.reports_user_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from bigpt.curate.classifier import train_quality_classifier
    except ImportError as err:
        raise BigptError(f"training a classifier needs {err.name!r}: pip install -e '.[curate]'.") from None
    from bigpt.paths import check_output_file

    check_output_file(args.out, "--out", args.overwrite)
    summary = train_quality_classifier(
        args.positive,
        args.negative,
        args.out,
        text_field=args.field,
        epochs=args.epochs,
        lr=args.lr,
        ngrams=args.ngrams,
        dim=args.dim,
        buckets=args.buckets,
        held_out=args.held_out,
        seed=args.seed,
    )
    console.say(summary.line(str(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
