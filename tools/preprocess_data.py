"""Tokenize a JSONL or plain-text corpus into a megatron-core indexed dataset (.bin + .idx).

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer data/tokenizer.model \\
        --output-prefix data/corpus_text_document --workers 8

One document per line; each gets the tokenizer's end-of-document token appended. Name the
output prefix (without .bin/.idx) in a recipe's data.blend. For a masked-LM encoder
(model.family = "encoder") or an encoder-decoder ("encoder_decoder", T5), --split-sentences writes
each sentence of a document as a sequence.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import Parser, add_overwrite  # noqa: E402
from bigpt.runtime import console  # noqa: E402

parser = Parser(__doc__)
parser.add_argument(
    "--input",
    required=True,
    help="a .jsonl/.json/.ndjson file (one JSON object per line) or a text file (one document per line)",
)
parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
add_overwrite(parser, "an existing PREFIX.bin or PREFIX.idx")
parser.add_argument("--tokenizer", required=True, help="SentencePiece .model or Hugging Face tokenizer.json")
parser.add_argument("--field", default="text", help="JSONL field holding the text")
parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
parser.add_argument(
    "--split-sentences",
    action="store_true",
    help="one sequence per sentence, no end-of-document token: data for model.family = 'encoder' or "
    "'encoder_decoder', whose "
    "samples pack whole sentences of one document (one sequence per document: one truncated sample each)",
)
parser.add_argument(
    "--on-bad-line",
    choices=("stop", "skip"),
    default="stop",
    help="what to do with a JSONL line that is not a JSON object with --field",
)


def parse_args(argv=None):
    """The options, checked."""
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be 1 or more")
    return args


@console.reports_user_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from bigpt.data.preprocess import preprocess
    from bigpt.paths import check_output_file

    for suffix in (".bin", ".idx"):
        check_output_file(f"{args.output_prefix}{suffix}", "--output-prefix", args.overwrite)

    summary = preprocess(
        args.input,
        args.output_prefix,
        args.tokenizer,
        text_field=args.field,
        workers=args.workers,
        on_bad_line=args.on_bad_line,
        sentences=args.split_sentences,
        progress=sys.stderr,
    )
    console.say(summary.line(args.output_prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
