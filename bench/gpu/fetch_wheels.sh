#!/usr/bin/env bash
# On a machine with internet: the wheels bench/gpu/run.sh installs on a GPU machine that has none
# and has only torch. Into bench/gpu/wheels/py<VERSION>/ (ignored by git), for each Python version
# given (default: this Python's), Linux x86-64 binaries:
#   bash bench/gpu/fetch_wheels.sh [3.11 3.12 ...]
# What a mock-data training run and tests/test_gpu.py import besides torch (and torch's own
# dependencies), each without its dependencies: megatron-core (its cp311 wheel too, whose metadata
# says Python >= 3.12), emerging-optimizers, numpy, ... About 30 MB per version.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')")
requirements=(
    "megatron-core>=0.19.2,<0.20" "emerging-optimizers>=0.3,<0.4" absl-py "packaging>=24.2"
    numpy psutil safetensors pyyaml tqdm dill
    tensorboard tensorboard-data-server protobuf markdown werkzeug markupsafe
    pytest iniconfig pluggy pygments
)
for version in "${versions[@]}"; do
    dest="wheels/py$version"
    mkdir -p "$dest"
    "$PYTHON" -m pip download -q --no-deps --ignore-requires-python --only-binary=:all: \
        --python-version "$version" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d "$dest" "${requirements[@]}"
    echo "$dest: $(ls "$dest" | wc -l) wheels, $(du -sh "$dest" | cut -f1)"
done
