"""Train a SentencePiece BPE tokenizer on text or JSONL files.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 32000 --output-prefix data/tokenizer

writes data/tokenizer.model (name it in a recipe's data.tokenizer) and data/tokenizer.vocab.
Defaults suit prose and code: byte fallback, split digits, whitespace kept, no normalisation;
eos (id 2) ends every document. --mask-tokens adds <pad> and <mask> for a masked-LM encoder,
--sentinels N <pad> and T5's <extra_id_0> ... <extra_id_{N-1}> for span corruption.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import Parser, add_overwrite  # noqa: E402
from bigpt.runtime import console  # noqa: E402

parser = Parser(__doc__)
parser.add_argument(
    "--input", required=True, nargs="+", help="text files (one document per line) or .jsonl/.json/.ndjson files"
)
parser.add_argument("--vocab-size", required=True, type=int)
parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
add_overwrite(parser, "an existing PREFIX.model or PREFIX.vocab")
parser.add_argument("--field", default="text", help="JSONL field holding the text")
parser.add_argument(
    "--mask-tokens",
    action="store_true",
    help="also <pad> (id 3) and <mask> (id 4), which a masked-LM encoder (model.family = 'encoder') needs; "
    "<s> and </s> frame its samples",
)
parser.add_argument(
    "--sentinels",
    type=int,
    default=0,
    help="also <pad> (id 3) and this many of T5's sentinels <extra_id_0>, <extra_id_1>, ... after it (and "
    "<mask>), which span corruption (model.family = 'encoder_decoder') needs; T5 has 100",
)
parser.add_argument("--verbose", action="store_true", help="show SentencePiece's log")


@console.reports_user_errors
def main(argv=None) -> int:
    args = parser.parse_args(argv)
    from bigpt.data.tokenizer_training import train_tokenizer
    from bigpt.errors import BigptError
    from bigpt.paths import check_output_file

    if args.sentinels < 0:
        raise BigptError(f"--sentinels {args.sentinels}: the number of T5 sentinels must be 0 or more.")
    for suffix in (".model", ".vocab"):
        check_output_file(f"{args.output_prefix}{suffix}", "--output-prefix", args.overwrite)

    model = train_tokenizer(
        args.input,
        args.vocab_size,
        args.output_prefix,
        text_field=args.field,
        verbose=args.verbose,
        mask_tokens=args.mask_tokens,
        sentinels=args.sentinels,
    )
    console.say(f"wrote {model} ({args.vocab_size} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
