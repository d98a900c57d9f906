#!/usr/bin/env bash
# Single-node pretraining with torchrun: one process per GPU, or NPROC_PER_NODE processes on CPU.
#
# Usage:
#   launch/torchrun.sh [--config FILE] [--section.key value ...]
#
#   All arguments go to the trainer unchanged; --config $CONFIG is prepended unless they have --config.
#
# Examples:
#   launch/torchrun.sh                                    # configs/tiny.yaml, one process per visible GPU
#   NPROC_PER_NODE=2 launch/torchrun.sh --train.steps 20 --logging.run_dir runs/x --parallel.tensor 2
#   CUDA_VISIBLE_DEVICES=0,1 launch/torchrun.sh --config configs/tiny.yaml --optim.lr 0.01
#   TRAIN_SCRIPT=tests/cluster/stand_in.py NPROC_PER_NODE=2 launch/torchrun.sh --logging.run_dir /tmp/x
#
# Environment [default]:
#   CONFIG [configs/tiny.yaml]        config file, used unless the arguments contain --config
#   NPROC_PER_NODE [visible GPUs, or 1 without GPUs]
#   PYTHON [python]                   interpreter; torchrun runs as `$PYTHON -m torch.distributed.run`
#   TRAIN_MODULE [hyperp_megatron.train]   entry point, run as `-m $TRAIN_MODULE` ...
#   TRAIN_SCRIPT []                   ... or this script path instead (tests: tests/cluster/stand_in.py)
#   TORCHRUN_EXTRA_ARGS []            extra torchrun flags, word-split, e.g. "--max-restarts 2"
#   OMP_NUM_THREADS [1]
set -euo pipefail

CONFIG=${CONFIG:-configs/tiny.yaml}
PYTHON=${PYTHON:-python}
TRAIN_MODULE=${TRAIN_MODULE:-hyperp_megatron.train}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-}
TORCHRUN_EXTRA_ARGS=${TORCHRUN_EXTRA_ARGS:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

count_visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
NUM_GPUS=$(count_visible_gpus)
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))}

# --standalone: a local c10d rendezvous on a free port, so two runs on one machine do not collide.
torchrun_args=(
    --standalone
    --nnodes=1
    --nproc-per-node="$NPROC_PER_NODE"
)
# shellcheck disable=SC2206  # word-splitting the extra flags is intended
torchrun_args+=($TORCHRUN_EXTRA_ARGS)

if [[ -n "$TRAIN_SCRIPT" ]]; then
    entry=("$TRAIN_SCRIPT")
else
    entry=(-m "$TRAIN_MODULE")
fi

train_args=("$@")
if [[ " $* " != *" --config "* && " $* " != *" --config="* ]]; then
    train_args=(--config "$CONFIG" "${train_args[@]}")
fi

echo "torchrun.sh: $NPROC_PER_NODE processes: ${entry[*]} ${train_args[*]}"
exec "$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" "${entry[@]}" "${train_args[@]}"
