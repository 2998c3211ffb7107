"""Build the CPU demo's data: corpus → 4096-token SentencePiece tokenizer → indexed dataset.

    python tools/prepare_demo.py            # writes data/demo/ at the repository root

recipes/tiny.toml reads data/demo/tokenizer.model and data/demo/demo_text_document.{bin,idx}.
Steps whose outputs exist are skipped; --overwrite redoes them all. A step never replaces a
file it did not write (a tokenizer.vocab without its tokenizer.model, say) unless --overwrite.
"""

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bigpt.cli import Parser, add_overwrite  # noqa: E402
from bigpt.paths import check_output_file, check_writable  # noqa: E402
from bigpt.runtime import console  # noqa: E402

DEMO_VOCAB_SIZE = 4096


def prepare(out: Path, overwrite: bool) -> None:
    from bigpt.data.demo_corpus import write_demo_corpus
    from bigpt.data.tokenizer_training import train_tokenizer

    corpus, tokenizer = out / "demo.jsonl", out / "tokenizer.model"
    prefix = out / "demo_text_document"

    def step(name: str, output: Path, run, also_writes: tuple[Path, ...] = ()) -> None:
        if output.exists() and not overwrite:
            console.say(f"{name}: {output} exists, skipped")
            return
        for path in (output, *also_writes):
            check_output_file(path, "--out", overwrite)
        started = time.monotonic()
        run()
        console.say(f"{name}: wrote {output} in {time.monotonic() - started:.1f} s")

    step("corpus", corpus, lambda: write_demo_corpus(out, corpus.name))
    step(
        "tokenizer",
        tokenizer,
        lambda: train_tokenizer([corpus], DEMO_VOCAB_SIZE, out / "tokenizer", key="--out"),
        also_writes=(out / "tokenizer.vocab",),
    )

    def preprocess_corpus():
        from bigpt.data.preprocess import preprocess

        console.say(preprocess(corpus, str(prefix), tokenizer, workers=os.cpu_count() or 1).line(str(prefix)))

    step("dataset", Path(f"{prefix}.idx"), preprocess_corpus, also_writes=(Path(f"{prefix}.bin"),))


parser = Parser(__doc__)
parser.add_argument("--out", type=Path, default=REPO / "data" / "demo", help="directory to write (default data/demo)")
add_overwrite(parser, "every step's outputs: redo them all")


@console.reports_user_errors
def main(argv=None) -> int:
    args = parser.parse_args(argv)
    check_writable(args.out, "--out")
    prepare(args.out, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
