"""What the command-line entry points share (``hyperp-train``, ``hyperp-sweep``, ...). Imports nothing heavy: the
entry points call it before megatron-core is first imported."""

from __future__ import annotations

import warnings


def quiet_megatron_import_warnings() -> None:
    """megatron-core warns at import about every optional GPU package it does not find (Transformer Engine,
    apex); the trainer prints one line instead. Process-wide, so only entry points call it, never at import."""
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*(Apex|Transformer Engine|apex).*")


def split_config_arg(argv: list[str], strict: bool = True) -> tuple[str | None, list[str]]:
    """The trainer's arguments: ``--config FILE`` (or ``--config=FILE``) and the rest (dotted overrides).
    ``strict``: a ``--config`` without a path is a ValueError (else it is passed on with the rest)."""
    config_path, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            config_path, i = argv[i + 1], i + 2
        elif argv[i] == "--config" and strict:
            raise ValueError("--config needs a path")
        elif argv[i].startswith("--config="):
            config_path, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return config_path, rest
