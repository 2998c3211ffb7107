"""Preprocessing throughput against the tokenizer alone, on the same text, in one run.

    python bench/preprocess_throughput.py [--input data/demo/demo.jsonl] [--workers 2]

Prints tokens/s of bare ``encode`` over the documents (one process), of tools/preprocess_data's
pipeline (read, parse, encode, write .bin/.idx) per worker, and their ratio; the pipeline's
overhead is what the ratio misses (target: ratio >= 0.8).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bigpt.data.encode import JSONL_SUFFIXES, document_text  # noqa: E402
from bigpt.data.preprocess import preprocess  # noqa: E402
from bigpt.data.tokenizer import load_tokenizer  # noqa: E402


def bare_encode_tokens_per_second(corpus: Path, tokenizer_path: Path, field: str) -> float:
    tokenizer = load_tokenizer(tokenizer_path)
    jsonl = corpus.suffix in JSONL_SUFFIXES
    texts = [document_text(line, jsonl=jsonl, text_field=field) for line in corpus.open("rb")]
    started = time.perf_counter()
    tokens = sum(len(tokenizer.encode(text)) + 1 for text in texts if text)  # + EOD
    return tokens / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=REPO / "data" / "demo" / "demo.jsonl")
    parser.add_argument("--tokenizer", type=Path, default=REPO / "data" / "demo" / "tokenizer.model")
    parser.add_argument("--field", default="text")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--repeat", type=int, default=3, help="use the input this many times over, for a longer measurement"
    )
    args = parser.parse_args(argv)
    if not (args.input.is_file() and args.tokenizer.is_file()):
        print(
            "bench: no demo data; run `python tools/prepare_demo.py` or pass --input and --tokenizer", file=sys.stderr
        )
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / f"corpus{args.input.suffix}"
        corpus.write_bytes(args.input.read_bytes() * args.repeat)
        bare = bare_encode_tokens_per_second(corpus, args.tokenizer, args.field)
        summary = preprocess(
            corpus, str(Path(scratch) / "out"), args.tokenizer, text_field=args.field, workers=args.workers
        )
    per_worker = summary.tokens / summary.seconds / args.workers
    print(f"tokens: {summary.tokens:,}")
    print(f"bare encode:        {bare:12,.0f} tokens/s")
    print(f"preprocess/worker:  {per_worker:12,.0f} tokens/s  ({args.workers} workers)")
    print(f"ratio:              {per_worker / bare:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
