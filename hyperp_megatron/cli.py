"""What the command-line entry points share (``hyperp-train``, ``hyperp-sweep``, ...). Imports nothing heavy: the
entry points call it before megatron-core is first imported."""

from __future__ import annotations

import warnings


def quiet_megatron_import_warnings() -> None:
    """megatron-core warns at import about every optional GPU package it does not find (Transformer Engine,
    apex); the trainer prints one line instead. Process-wide, so only entry points call it, never at import."""
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*(Apex|Transformer Engine|apex).*")
