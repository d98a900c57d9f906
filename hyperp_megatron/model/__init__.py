"""The GPT model: Megatron-Core GPTModel with HyperP's layer spec and initialization."""

from hyperp_megatron.model.gpt import build_model, padded_vocab_size, transformer_config

__all__ = ["build_model", "padded_vocab_size", "transformer_config"]
