"""Fits, verdicts and the report of a (partial) science sweep: the ``hyperp-fit`` console script, kept here
with the other tools. ``python tools/fit_transfer.py --help``; see ``hyperp_megatron/science/__main__.py``."""

from hyperp_megatron.science.__main__ import fit_main

if __name__ == "__main__":
    raise SystemExit(fit_main())
