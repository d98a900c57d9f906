"""hyperp-megatron: HyperP (Hypersphere Parameterization) pretraining on Megatron-Core."""

__version__ = "0.1.0"
