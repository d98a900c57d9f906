"""Preemption handling and run fingerprints.

On SIGTERM / SIGUSR1 (SLURM's preemption and ``--signal`` warnings) a handler only sets a flag. At
the next step boundary every rank takes part in one MAX all-reduce of its flag, so all ranks agree
to stop after the same step; the trainer then writes a checkpoint and exits with
:data:`EXIT_REQUEUE`, which the sbatch scripts in ``launch/`` turn into ``scontrol requeue``.
"""

from __future__ import annotations

import hashlib
import signal

import torch.distributed as dist

EXIT_REQUEUE = 75
"""Exit status of a run stopped by a preemption signal after checkpointing (EX_TEMPFAIL)."""

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set by a signal handler; read collectively once per training step: ``StepRunner.train_step`` folds
    ``signum`` into the step's one all-reduce, so every rank stops at the same step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self, signals=PREEMPTION_SIGNALS) -> "PreemptionFlag":
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = signum


def weights_digest(model_chunks: list) -> str:
    """SHA-256 over every rank's parameters (in rank order): equal digests mean bit-identical weights
    in the same layout. Collective."""
    digest = hashlib.sha256()
    for chunk in model_chunks:
        for name, param in sorted(chunk.named_parameters()):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    local = digest.hexdigest()
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [local]
    if dist.is_initialized():
        dist.all_gather_object(gathered, local)
    return hashlib.sha256("".join(gathered).encode()).hexdigest()
