#!/usr/bin/env bash
# The CPU demos: build the demo corpus, tokenizers and datasets (once), then train one family's
# tiny recipe on it, recipes/tiny_<demo>.toml, on as many processes as its "# intended world
# size" comment says:
#   bash scripts/demo.sh            # decoder (recipes/tiny.toml): TP 2 × PP 2 on 4 processes
#   bash scripts/demo.sh moe        # Mixture-of-Experts decoder: 8 experts a layer over EP 2, 2 processes
#   bash scripts/demo.sh encoder    # masked-LM encoder (BERT's shape) on the corpus's sentences: TP 2 × PP 2
#   bash scripts/demo.sh t5         # span-corruption encoder-decoder (T5 v1.1's shape) at TP 2, 2 processes
# Extra arguments are recipe overrides, e.g. `bash scripts/demo.sh train.train_iters=60` or
# `bash scripts/demo.sh encoder train.train_iters=60`.
set -euo pipefail
cd "$(dirname "$0")/.."
demo=decoder
if [[ $# -gt 0 && $1 != *=* && $1 != -* ]]; then
    demo=$1
    shift
fi
case $demo in
    decoder) recipe=recipes/tiny.toml ;;
    moe | encoder | t5) recipe=recipes/tiny_$demo.toml ;;
    *)
        echo "scripts/demo.sh: no demo '$demo'; the demos are decoder (the default), moe, encoder and t5" >&2
        exit 2
        ;;
esac
nproc=$(sed -n 's/^# intended world size: \([0-9][0-9]*\).*/\1/p' "$recipe")
.venv/bin/python tools/prepare_demo.py
export OMP_NUM_THREADS=1  # one thread per rank: more oversubscribes the cores and crawls
exec .venv/bin/torchrun --standalone --nproc_per_node "$nproc" launchers/run.py "$recipe" "$@"
