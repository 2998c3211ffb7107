"""Add a domain's own tokens to a tokenizer, for a continual run that grows the model's vocabulary.

    python tools/extend_vocab.py --tokenizer hf/tokenizer.json --tokens words.txt --out ext/tokenizer.json
    python tools/extend_vocab.py --tokenizer tok.model --learn 500 --text domain.jsonl --out ext/tok.model

New tokens come from a file (one per line, a leading space kept) or are learned from the domain
text (--learn N: the words bigpt's tokenizer trainer finds most worth a token there, that the
tokenizer splits into several pieces). The output is a tokenizer of the same kind (SentencePiece
.model or Hugging Face tokenizer.json) that tokenizes text without the new tokens exactly as
before, and OUTPUT.extension.json: name it in the run's init.extend_vocab, with model.vocab_size
the size it reports, and preprocess the data with the new tokenizer. With --text, it reports how
many tokens the domain text saves.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import Parser, add_overwrite  # noqa: E402
from bigpt.runtime import console  # noqa: E402

parser = Parser(__doc__)
parser.add_argument("--tokenizer", required=True, help="the base tokenizer: a SentencePiece .model or tokenizer.json")
source = parser.add_mutually_exclusive_group(required=True)
source.add_argument("--tokens", help="a text file of new tokens, one per line")
source.add_argument("--learn", type=int, metavar="N", help="learn up to N new tokens from --text")
parser.add_argument("--text", nargs="+", default=[], help="domain text files (one document per line, or .jsonl)")
parser.add_argument("--field", default="text", help="JSONL field holding the text")
parser.add_argument("--out", required=True, help="the extended tokenizer (same kind as --tokenizer)")
add_overwrite(parser, "an existing OUTPUT or OUTPUT.extension.json")


@console.reports_user_errors
def main(argv=None) -> int:
    args = parser.parse_args(argv)
    from bigpt.data.tokenizer import load_tokenizer
    from bigpt.data.vocab_extension import (
        count_tokens,
        extend_tokenizer,
        learn_tokens,
        read_documents,
        write_extension,
    )
    from bigpt.errors import BigptError
    from bigpt.paths import check_output_file, not_a_file

    for path in args.text:
        if why := not_a_file(Path(path)):
            raise BigptError(f"--text {path} {why}")
    if args.learn is not None and not args.text:
        raise BigptError("--learn needs the domain text to learn from: give --text FILE ...")
    for path in (args.out, f"{args.out}.extension.json"):
        check_output_file(path, "--out", args.overwrite)
    base = load_tokenizer(args.tokenizer)
    if args.tokens:
        if why := not_a_file(Path(args.tokens)):
            raise BigptError(f"--tokens {args.tokens} {why}")
        tokens = [line.rstrip("\r\n") for line in Path(args.tokens).read_text().splitlines()]
    else:
        tokens = learn_tokens(base, [Path(path) for path in args.text], args.learn, text_field=args.field)
    extension = extend_tokenizer(args.tokenizer, tokens, args.out)
    if args.text:
        documents = read_documents(args.text, args.field)
        extension.domain_text = {
            "files": list(args.text),
            "tokens_before": count_tokens(base, documents),
            "tokens_after": count_tokens(load_tokenizer(args.out), documents),
        }
    record = write_extension(extension, args.out)
    console.say(
        f"wrote {args.out} ({extension.base_vocab_size} -> {extension.vocab_size} tokens, "
        f"{len(extension.tokens)} new) and {record}; {extension.saving()}. Continue training with "
        f'init.extend_vocab = "{record}" and model.vocab_size = the model\'s rows grown to fit it '
        f"(at least {extension.vocab_size})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
