"""LR sweeps over scale ladders (plan, run locally, one SLURM array task, status): the ``hyperp-sweep``
console script, kept here with the other tools. ``python tools/lr_sweep.py --help``; see
``hyperp_megatron/science/__main__.py``."""

from hyperp_megatron.science.__main__ import sweep_main

if __name__ == "__main__":
    raise SystemExit(sweep_main())
