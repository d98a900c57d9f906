"""HyperP's MoE layer on Megatron-Core (HYPERP.md section 4), through the MoE module spec:

- ``MoESubmodules.router``: :class:`~hyperp_megatron.model.router.SqrtGateRouter` (SqrtGate or plain
  combine weights, the global switch load-balancing loss);
- ``MoELayer`` -> :class:`HyperPMoELayer`: with SqrtGate and a shared expert the output is
  ``sqrt(1/2) * routed + sqrt(1/2) * shared`` (plain gates: ``routed + shared``, as in the reference);
- ``MoESubmodules.experts``: Megatron's ``SequentialMLP`` (one MLP per expert; the CPU default) or, with
  ``model.moe.grouped_gemm`` on a GPU with Transformer Engine, ``TEGroupedMLP`` (grouped GEMM, still
  one ``weight{i}`` parameter per expert, so per-expert init and per-expert spheres are unchanged).

Token dispatch (all-to-all or all-gather, expert parallel, expert tensor parallel) is Megatron's.
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

    def postprocess(self, output: torch.Tensor, shared_expert_output: torch.Tensor | None):
        output = super().postprocess(output, shared_expert_output)
        if self.use_shared_expert and self.shared_expert_scale != 1.0:
            output = output * self.shared_expert_scale
        return output


def grouped_gemm_available(device: torch.device) -> bool:
    """Transformer Engine's grouped linear (``TEGroupedMLP``) is importable and ``device`` is a GPU."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from megatron.core.extensions.transformer_engine import TEColumnParallelGroupedLinear
    except ImportError:
        return False
    return TEColumnParallelGroupedLinear is not None


def use_grouped_gemm(moe: MoEConfig, device: torch.device) -> bool:
    """Resolve ``model.moe.grouped_gemm`` ('auto' | 'true' | 'false') for ``device``."""
    if moe.grouped_gemm == "false":
        return False
    available = grouped_gemm_available(device)
    if moe.grouped_gemm == "true" and not available:
        raise ValueError("model.moe.grouped_gemm is true but Transformer Engine's grouped GEMM or a GPU is "
                         "unavailable; use 'auto' (grouped GEMM when available) or 'false'")
    return available


def _grouped_experts_spec(num_experts: int) -> ModuleSpec:
    # Megatron's legacy GroupedMLP (one fused weight for all local experts) is never used: it would
    # merge the experts into one matrix for the optimizer and the initialization.
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    spec = get_moe_module_spec(use_te=True, num_experts=num_experts, moe_grouped_gemm=True)
    return spec.submodules.experts


def moe_layer_spec(base: ModuleSpec, moe: MoEConfig, pg_collection=None, grouped_gemm: bool = False) -> ModuleSpec:
    """HyperP's MoE layer spec from Megatron's (``base``, the ``mlp`` of a GPT layer spec); ``grouped_gemm``:
    TE's grouped-GEMM experts (resolved by :func:`use_grouped_gemm`).

    ``pg_collection`` is passed to the layer through the spec's params: Megatron's TransformerLayer
    hands its process groups only to the exact ``MoELayer`` class (0.16.1, ``transformer_layer.py``),
    and for other classes logs "Unknown MLP type" and lets the layer fall back to the global groups.
    """
    router = functools.partial(SqrtGateRouter, gate=moe.gate)
    submodules = dataclasses.replace(base.submodules, router=router)
    if grouped_gemm:
        submodules.experts = _grouped_experts_spec(moe.num_routed_experts)
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
