"""Build the CPU demos' data: corpus → 4096-token SentencePiece tokenizers → indexed datasets.

    python tools/prepare_demo.py            # writes data/demo/ at the repository root

recipes/tiny.toml and tiny_moe.toml read data/demo/tokenizer.model and
data/demo/demo_text_document.{bin,idx} (one sequence per document); recipes/tiny_encoder.toml
reads data/demo/masked_tokenizer.model (the same with <pad>, <mask> and T5's sentinels) and
data/demo/demo_text_sentence.{bin,idx} (one sequence per sentence, as masked samples pack them).
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
T5_SENTINELS = 100  # as T5's tokenizer: more than a sample of the demo's length drops spans


def prepare(out: Path, overwrite: bool) -> None:
    from bigpt.data.demo_corpus import write_demo_corpus
    from bigpt.data.tokenizer_training import train_tokenizer

    corpus, tokenizer, masked_tokenizer = out / "demo.jsonl", out / "tokenizer.model", out / "masked_tokenizer.model"

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

    step(
        "masked tokenizer",
        masked_tokenizer,
        lambda: train_tokenizer(
            [corpus], DEMO_VOCAB_SIZE, out / "masked_tokenizer", key="--out", mask_tokens=True, sentinels=T5_SENTINELS
        ),
        also_writes=(out / "masked_tokenizer.vocab",),
    )

    def dataset(name: str, prefix: Path, tokenizer: Path, sentences: bool) -> None:
        from bigpt.data.preprocess import preprocess

        def run():
            written = preprocess(corpus, str(prefix), tokenizer, workers=os.cpu_count() or 1, sentences=sentences)
            console.say(written.line(str(prefix)))

        step(name, Path(f"{prefix}.idx"), run, also_writes=(Path(f"{prefix}.bin"),))

    dataset("dataset", out / "demo_text_document", tokenizer, sentences=False)
    dataset("sentences", out / "demo_text_sentence", masked_tokenizer, sentences=True)


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
