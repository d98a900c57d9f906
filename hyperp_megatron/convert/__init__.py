"""Checkpoint conversion between this project and Hugging Face transformers (torchtitan style).

One CPU process loads our checkpoint (any TP / PP / EP layout reshards on load) or an HF directory,
maps it through a small adapter per target family, and writes the other format:

- :mod:`~hyperp_megatron.convert.ours`: our checkpoint <-> unfused, layout-free pieces;
- :mod:`~hyperp_megatron.convert.folds`: multipliers folded into weights for standard classes;
- :mod:`~hyperp_megatron.convert.targets` (the interface), :mod:`~hyperp_megatron.convert.registry` and the adapters :mod:`~hyperp_megatron.convert.llama`
  (Qwen3, Llama), :mod:`~hyperp_megatron.convert.qwen3_next`, :mod:`~hyperp_megatron.convert.hyperp`
  (custom code, ``hf_modeling/modeling_hyperp.py``);
- :mod:`~hyperp_megatron.convert.export`, :mod:`~hyperp_megatron.convert.importer`,
  :mod:`~hyperp_megatron.convert.verify`; the command is ``python -m hyperp_megatron.convert``.
"""


__all__ = ["export", "import_hf", "verify"]


def __getattr__(name: str):
    # Lazy: ``python -m hyperp_megatron.convert`` hides GPUs before torch is first imported.
    if name == "export":
        from hyperp_megatron.convert.export import export

        return export
    if name == "import_hf":
        from hyperp_megatron.convert.importer import import_hf

        return import_hf
    if name == "verify":
        from hyperp_megatron.convert.verify import verify

        return verify
    raise AttributeError(name)
