"""The GPT model: Megatron-Core GPTModel with HyperP's layer spec and initialization.

``gpt.build_model`` builds it; ``params`` names its parameters' roles and layouts (no megatron import, so
light modules can use it). Import the submodules directly.
"""
