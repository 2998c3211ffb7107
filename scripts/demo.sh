#!/usr/bin/env bash
# The demo: build the demo corpus, tokenizer and dataset (once), then train recipes/tiny.toml
# with tensor parallel 2 x pipeline parallel 2 on 4 CPU processes. Extra arguments are recipe
# overrides, e.g. `bash scripts/demo.sh train.train_iters=60`.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python tools/prepare_demo.py
export OMP_NUM_THREADS=1  # one thread per rank: more oversubscribes the cores and crawls
exec .venv/bin/torchrun --standalone --nproc_per_node 4 launchers/run.py recipes/tiny.toml "$@"
