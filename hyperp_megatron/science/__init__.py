"""Reproducing HyperP's claims: LR sweeps over scale ladders (``sweep``), the fits (``fit``) and the report
(``report``). Entry points: ``hyperp-sweep`` and ``hyperp-fit``
(``__main__.py``)."""
