"""Write a few-MB real-text JSONL corpus from the Python standard library's docstrings.

    python tools/make_demo_corpus.py --out data/demo        # writes data/demo/demo.jsonl

Offline and deterministic for a given Python: nothing is downloaded.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.data.demo_corpus import write_demo_corpus  # noqa: E402
from bigpt.runtime import console  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write demo.jsonl into")
    args = parser.parse_args(argv)
    path, documents, size = write_demo_corpus(args.out)
    console.say(f"wrote {path}: {documents:,} documents, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
