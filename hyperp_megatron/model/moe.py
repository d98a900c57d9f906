"""HyperP's MoE layer on Megatron-Core (docs/method.md section 4), through the MoE module spec:

- ``MoESubmodules.router``: :class:`~hyperp_megatron.model.router.SqrtGateRouter` (SqrtGate or plain
  combine weights, the global switch load-balancing loss);
- ``MoELayer`` -> :class:`HyperPMoELayer`: with SqrtGate and a shared expert the output is
  ``sqrt(1/2) * routed + sqrt(1/2) * shared`` (plain gates: ``routed + shared``, as in the reference);
- ``MoESubmodules.experts`` (:func:`experts_impl`, ``model.moe.grouped_gemm``): Megatron's ``SequentialMLP``
  (one MLP per expert; the CPU default), Transformer Engine's ``TEGroupedMLP`` or, without TE,
  :class:`~hyperp_megatron.model.experts.TorchGroupedMLP` (``torch._grouped_mm``). Both grouped versions
  keep one ``weight{i}`` parameter per expert, so per-expert init and per-expert spheres are unchanged.

Token dispatch (all-to-all or all-gather, expert parallel, expert tensor parallel) is Megatron's.

Expert parallelism for any routed-expert count (docs/moe.md): Megatron needs EP to divide its expert count,
so ``TransformerConfig.num_moe_experts`` is the routed count rounded up to a multiple of EP
(``MoEConfig.padded_experts``) and the extra experts are phantoms: the router never selects them
(``model/router.py``), and the experts modules (``SequentialExperts``, ``TorchGroupedMLP``) hold them as zero,
frozen weights that the checkpoint leaves out.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from hyperp_megatron.config import MoEConfig
from hyperp_megatron.model.router import SqrtGateRouter

SHARED_EXPERT_MIX = math.sqrt(0.5)
"""SqrtGate with a shared expert: output = sqrt(1/2) * routed + sqrt(1/2) * shared."""


class HyperPMoELayer(MoELayer):
    """Megatron's MoELayer with the routed + shared sum multiplied by ``shared_expert_scale``.

    Megatron adds the shared expert in ``MoELayer.postprocess`` (or, with
    ``moe_shared_expert_overlap``, inside the dispatcher's ``combine_postprocess`` that postprocess
    calls); in both cases ``postprocess`` returns ``routed + shared``, so scaling its result gives
    ``scale * routed + scale * shared``. Without a shared expert the output is unchanged.
    """

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 shared_expert_scale: float = 1.0):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection)
        self.shared_expert_scale = shared_expert_scale
        if self.router.num_real_experts < config.num_moe_experts and not hasattr(self.experts, "num_real_experts"):
            raise ValueError(f"{type(self.experts).__name__} does not support phantom experts (routed experts "
                             "not divisible by parallel.expert): use model.moe.grouped_gemm 'auto' or 'false'")

    def postprocess(self, output: torch.Tensor, shared_expert_output: torch.Tensor | None):
        output = super().postprocess(output, shared_expert_output)
        if self.use_shared_expert and self.shared_expert_scale != 1.0:
            output = output * self.shared_expert_scale
        return output


def te_grouped_gemm_importable() -> bool:
    """Transformer Engine's grouped linear (``TEGroupedMLP``) imports (it needs TE, hence a GPU build)."""
    try:
        from megatron.core.extensions.transformer_engine import TEColumnParallelGroupedLinear
    except ImportError:
        return False
    return TEColumnParallelGroupedLinear is not None


def experts_impl(moe: MoEConfig, device, phantom_experts: int = 0) -> str:
    """Resolve ``model.moe.grouped_gemm`` ('auto' | 'true' | 'false') for a run on ``device``:

    'false' -> 'sequential' (Megatron's SequentialMLP, as :class:`SequentialExperts`); on a GPU ('auto' or
    'true') -> 'te_grouped' when TE's grouped linear imports and there are no phantom experts
    (``phantom_experts``: ``MoEConfig.phantom_experts(EP)``; TEGroupedMLP's checkpoint would store them),
    else 'torch_grouped'; on CPU 'auto' -> 'sequential', 'true' -> 'torch_grouped' (its per-expert loop: the
    same math as SequentialMLP, with the grouped module's parameter layout).
    """
    if moe.grouped_gemm == "false":
        return "sequential"
    if torch.device(device).type == "cuda":
        return "te_grouped" if te_grouped_gemm_importable() and not phantom_experts else "torch_grouped"
    return "torch_grouped" if moe.grouped_gemm == "true" else "sequential"


def _experts_spec(impl: str, num_experts: int, base: ModuleSpec) -> ModuleSpec | type:
    """``num_experts``: the real routed experts (the padded count is the TransformerConfig's)."""
    # Megatron's legacy GroupedMLP (one fused weight for all local experts) is never used: it would
    # merge the experts into one matrix for the optimizer and the initialization.
    if impl == "te_grouped":
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

        return get_moe_module_spec(use_te=True, num_experts=num_experts, moe_grouped_gemm=True).submodules.experts
    from hyperp_megatron.model.experts import SequentialExperts, TorchGroupedMLP

    params = {"num_real_experts": num_experts}
    if impl == "torch_grouped":
        return ModuleSpec(module=TorchGroupedMLP, params=params)
    return ModuleSpec(module=SequentialExperts, submodules=base.submodules.experts.submodules, params=params)


def moe_layer_spec(base: ModuleSpec, moe: MoEConfig, pg_collection=None, experts: str = "sequential") -> ModuleSpec:
    """HyperP's MoE layer spec from Megatron's (``base``, the ``mlp`` of a GPT layer spec); ``experts``: the
    experts module resolved by :func:`experts_impl` ('sequential', 'te_grouped' or 'torch_grouped').

    ``pg_collection`` is passed to the layer through the spec's params: Megatron's TransformerLayer
    hands its process groups only to the exact ``MoELayer`` class (0.16.1, ``transformer_layer.py``),
    and for other classes logs "Unknown MLP type" and lets the layer fall back to the global groups.
    """
    router = functools.partial(SqrtGateRouter, gate=moe.gate, num_real_experts=moe.num_routed_experts)
    submodules = dataclasses.replace(base.submodules, router=router)
    submodules.experts = _experts_spec(experts, moe.num_routed_experts, base)
    params = {"shared_expert_scale": SHARED_EXPERT_MIX if moe.gate == "sqrt" else 1.0}
    if pg_collection is not None:
        params["pg_collection"] = pg_collection
    return ModuleSpec(module=HyperPMoELayer, submodules=submodules, params=params, metainfo=base.metainfo)


def routers(model_chunks) -> list[SqrtGateRouter]:
    """The SqrtGate routers of this rank's model chunks (any wrapper), in layer order."""
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, SqrtGateRouter)]


def pop_local_aux_loss(model_chunks, device: torch.device) -> torch.Tensor:
    """Sum over this rank's MoE layers of their aux-loss shares since the last call (then reset), on
    ``device`` (the one the process group's collectives accept).

    Summed over all ranks (TP x DP x PP) and divided by the data-parallel size and the number of
    micro-batches, this is ``sum over layers of L_aux`` of the step (see ``switch_load_balancing_loss``).
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    for router in routers(model_chunks):
        value = router.pop_aux_loss()
        if value is not None:
            total += value.detach().to(device=device, dtype=torch.float64)
    return total
