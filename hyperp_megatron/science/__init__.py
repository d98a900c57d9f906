"""Reproducing HyperP's claims: LR sweeps over scale ladders (``sweep``), the fits (``fit``) and the report
(``report``). Entry points: ``tools/lr_sweep.py`` and ``tools/fit_transfer.py``."""
