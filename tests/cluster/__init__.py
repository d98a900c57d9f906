"""Test harness for launchers: a real local SLURM cluster (``slurm.py``) and a stand-in trainer
(``stand_in.py``) that discovers its rank the way ``hyperp_megatron.train`` does."""
