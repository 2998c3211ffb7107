#!/usr/bin/env bash
# Set up bigpt in ./.venv from nothing: torch (the CPU build unless a GPU is present), megatron-core 0.19
# with emerging-optimizers (Lion, Muon), bigpt itself (editable), the test tools, and on a GPU machine
# (nvidia-smi present) Transformer Engine (the gpu extra). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    # Pin the CPU build: an unpinned torch pulls a multi-GB CUDA build.
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    # megatron-core 0.19 says Python >= 3.12, yet ships a tested cp311 wheel: take it as it is.
    .venv/bin/python -m pip install -q --no-deps --ignore-requires-python "megatron-core>=0.19.2,<0.20" "packaging>=24.2" \
        "emerging-optimizers>=0.3,<0.4" absl-py
    # emerging-optimizers (megatron-core's Lion and Muon) uses one 3.12 name, typing.override, which
    # typing_extensions has: a .pth line gives it to every process of .venv, before megatron-core imports it.
    echo 'import typing, typing_extensions; typing.override = getattr(typing, "override", typing_extensions.override)' \
        > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bigpt_typing_override.pth"
fi
.venv/bin/python -m pip install -q -e ".[test,curate,ray]"
if command -v nvidia-smi >/dev/null 2>&1; then
    # The gpu extra, Transformer Engine: its torch extension (transformer_engine_torch) compiles at
    # install time against the torch installed above, which pip's build isolation would hide from
    # it; without isolation its build tools must be here already. Needs the CUDA toolkit and cuDNN
    # (CUDA_HOME, or NVTE_CUDA_INCLUDE_PATH for the headers).
    .venv/bin/python -m pip install -q "pybind11[global]" ninja setuptools wheel
    .venv/bin/python -m pip install -q --no-build-isolation "transformer-engine[pytorch]>=2.17,<2.18"
fi

# SLURM and munge for the tests on a real two-node cluster on this machine (tests/slurm_cluster.py):
# installed where this runs as root with apt, as on CI; elsewhere those tests are skipped, saying why.
slurm_installed() {
    for command in slurmctld slurmd sbatch munged; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$command" >/dev/null || return 1
    done
}
if ! slurm_installed; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    else
        echo "SLURM is not installed (and this is not root with apt): the tests on a real SLURM cluster" \
             "will be skipped; as root: apt-get install slurm-wlm munge"
    fi
fi
echo "bigpt is set up in .venv ($(.venv/bin/python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "+ megatron-core", m.__version__)'))"
