#!/usr/bin/env bash
# Pretraining under MPI: `mpiexec -n N python -m hyperp_megatron.train ...`, or one Slurm task per rank
# with `srun --mpi=...` inside an allocation. The trainer takes rank and world size from mpi4py's
# COMM_WORLD and has rank 0 broadcast the master address; MPI only starts the processes, the
# collectives still run on torch.distributed.
#
# Usage:
#   launch/mpi.sh [--config FILE] [--section.key value ...]
#
#   All arguments go to the trainer unchanged; --config $CONFIG is prepended unless they have --config.
#
# Examples:
#   NUM_PROCS=2 launch/mpi.sh --train.steps 20 --logging.run_dir runs/x      # mpiexec -n 2, this machine
#   NUM_PROCS=8 MPIEXEC_ARGS="-hosts n1,n2" launch/mpi.sh                     # MPICH hydra over two hosts
#   # Inside an allocation (salloc / sbatch): one Slurm task per rank, spread over the allocated nodes.
#   LAUNCHER=srun SRUN_MPI=pmi2 launch/mpi.sh --train.steps 20   # MPICH (the venv's `mpich` wheel)
#   LAUNCHER=srun SRUN_MPI=pmix launch/mpi.sh --train.steps 20   # OpenMPI (Slurm needs libpmix-dev)
#   # mpiexec inside an allocation works too: MPICH's hydra and OpenMPI start their daemons with srun.
#
# Environment [default]:
#   CONFIG [configs/tiny.yaml]        config file, used unless the arguments contain --config
#   LAUNCHER [mpiexec]                mpiexec or srun
#   NUM_PROCS [2 for mpiexec; for srun the allocation's task count]
#   MPIEXEC [mpiexec]                 use the venv's own mpiexec; do not mix MPI implementations
#   MPIEXEC_ARGS []                   extra mpiexec flags, word-split (OpenMPI: "--oversubscribe")
#   SRUN_MPI [pmi2]                   srun --mpi plugin: pmi2 for MPICH, pmix for OpenMPI 4/5
#   PYTHON [python]   TRAIN_MODULE [hyperp_megatron.train]   TRAIN_SCRIPT [] (script path instead)
#   OMP_NUM_THREADS [1]
#   OpenMPI as root also needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
set -euo pipefail

CONFIG=${CONFIG:-configs/tiny.yaml}
LAUNCHER=${LAUNCHER:-mpiexec}
MPIEXEC=${MPIEXEC:-mpiexec}
MPIEXEC_ARGS=${MPIEXEC_ARGS:-}
SRUN_MPI=${SRUN_MPI:-pmi2}
PYTHON=${PYTHON:-python}
TRAIN_MODULE=${TRAIN_MODULE:-hyperp_megatron.train}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

case "$LAUNCHER" in
    mpiexec)
        # shellcheck disable=SC2206  # word-splitting the extra flags is intended
        launcher_args=("$MPIEXEC" -n "${NUM_PROCS:-2}" $MPIEXEC_ARGS)
        ;;
    srun)
        launcher_args=(srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1)
        if [[ -n "${NUM_PROCS:-}" ]]; then
            launcher_args+=(--ntasks="$NUM_PROCS")
        fi
        ;;
    *) echo "LAUNCHER must be mpiexec or srun, got '$LAUNCHER'" >&2; exit 2 ;;
esac

if [[ -n "$TRAIN_SCRIPT" ]]; then
    entry=("$TRAIN_SCRIPT")
else
    entry=(-m "$TRAIN_MODULE")
fi

train_args=("$@")
if [[ " $* " != *" --config "* && " $* " != *" --config="* ]]; then
    train_args=(--config "$CONFIG" "${train_args[@]}")
fi

echo "mpi.sh: ${launcher_args[*]} $PYTHON ${entry[*]} ${train_args[*]}"
exec "${launcher_args[@]}" "$PYTHON" "${entry[@]}" "${train_args[@]}"
