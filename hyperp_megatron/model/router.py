"""SqrtGate router and the switch load-balancing loss over the global batch (docs/method.md section 4).

:class:`SqrtGateRouter` is a Megatron ``TopKRouter`` that overrides ``routing()`` only; it is plugged
into ``MoESubmodules.router`` by :func:`hyperp_megatron.model.moe.moe_layer_spec`.

Routing of a token with router logits ``z = x W_r^T`` (``W_r`` is ``(E, C)``, no bias, no multiplier):

    S = top-k indices of z            g_i = softmax_{j in S}(z_j)_i  (so g_i >= 0, sum g_i = 1)
    combine weight of expert i in S:  sqrt(g_i + 1e-30)  ('sqrt', SqrtGate)  or  g_i  ('plain')

Since ``sum_i (sqrt g_i)^2 = 1``, nearly uncorrelated expert outputs of equal RMS combine to the same
RMS for every k; plain gates lose up to a factor ``sqrt(k)``.

Load balancing, per MoE layer: ``L_aux = gamma * E * sum_e P_e f_e`` with ``P_e`` the full softmax over
the ``E`` routed experts averaged over the global batch and ``f_e`` the fraction of top-k assignments
that went to expert ``e`` in the global batch (all tensor-, data-, expert- and context-parallel ranks).
No z-loss.

Phantom experts (docs/moe.md): when the expert-parallel size does not divide the ``E`` routed experts,
Megatron holds ``E_pad`` (the next multiple of EP; ``TransformerConfig.num_moe_experts``). The router
keeps ``W_r`` at ``(E, C)``: its logits, top-k, softmax, aux loss and load statistics cover the real experts
only, and ``probs`` / ``routing_map`` get ``E_pad - E`` zero columns for the dispatcher, so a phantom expert
can never be selected (as a ``-inf`` logit, without computing one).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter

GATES = ("sqrt", "plain")
GATE_EPS = 1e-30
"""Added inside the square root so the gradient stays finite for vanishing gates."""
AUX_LOSS_TYPE = "global_aux_loss"
"""``TransformerConfig.moe_router_load_balancing_type`` this router implements (see SqrtGateRouter)."""


def topk_gates(logits: torch.Tensor, topk: int, gate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine weights and routing map from router logits.

    logits: [T, E] -> (probs [T, E] float32, zero outside the top-k; routing_map [T, E] bool).
    """
    top_logits, top_indices = torch.topk(logits, k=topk, dim=-1)  # [T, k]
    weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32)  # softmax over the k selected
    if gate == "sqrt":
        weights = torch.sqrt(weights + GATE_EPS)
    probs = torch.zeros_like(logits, dtype=torch.float32).scatter(1, top_indices, weights)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_indices, True)
    return probs, routing_map


def switch_load_balancing_loss(
    scores: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    num_global_tokens: float,
    num_replica_tokens: float,
    topk: int,
    coeff: float,
) -> torch.Tensor:
    """This rank's share of ``gamma * E * sum_e P_e f_e``.

    scores: [T_local, E] full softmax over the routed experts (this rank's tokens).
    tokens_per_expert: [E] top-k assignments per expert over the global batch (``num_global_tokens``
    tokens, so ``f_e = tokens_per_expert / (num_global_tokens * topk)`` sums to 1).
    num_replica_tokens: tokens of this rank's data-parallel replica (local tokens x TP x CP under
    sequence parallelism).

    The share normalizes ``P`` by the replica's tokens: summed over the TP/CP ranks of a replica it is
    the loss with the replica's ``P``; Megatron's DDP then averages gradients over data-parallel
    replicas, which averages ``P`` over the global batch, so the gradient is that of ``L_aux`` for any
    layout. On a single rank the value is ``L_aux`` itself (``gamma`` at perfect balance).
    """
    num_experts = scores.shape[-1]
    fraction = tokens_per_expert.float() / (num_global_tokens * topk)  # f_e, global
    prob_share = scores.sum(dim=0) / num_replica_tokens  # this rank's part of P_e
    return coeff * num_experts * torch.sum(fraction * prob_share)


def max_violation(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_e f_e - mean_e f_e) / mean_e f_e of a load vector [..., E] (counts or fractions).

    0 at perfect balance, ``E - 1`` when one expert takes everything; 0 for an empty load.
    """
    load = tokens_per_expert.float()
    mean = load.mean(dim=-1)
    return (load.amax(dim=-1) - mean) / mean.clamp(min=torch.finfo(torch.float32).tiny)


class SqrtGateRouter(TopKRouter):
    """Top-k router with SqrtGate (or plain) combine weights and the global switch balancing loss.

    Reuses ``TopKRouter``'s gating GEMM (``W_r`` in fp32 via ``moe_router_dtype``), its running
    global token counts (``global_tokens_per_expert`` / ``ga_steps``, reset after every optimizer step
    by Megatron's ``finalize_model_grads``) and ``MoEAuxLossAutoScaler`` (which scales the aux-loss
    gradient like the LM loss, i.e. by 1 / micro-batches).

    Why not Megatron's ``global_aux_loss`` as is (megatron-core 0.16.1, ``_apply_global_aux_loss``):
    it normalizes this rank's ``P`` by the tokens of *all* TP x DP x CP ranks, and DDP then averages
    the gradients over DP, so the effective coefficient is ``gamma / DP`` (NVIDIA/Megatron-LM#3672)
    and results change with the data-parallel size. Its ``f`` (top-k counts summed over TP x DP x CP,
    running mean over the micro-batches of the step) is kept.

    The gradient of micro-batch ``m`` uses ``f`` averaged over micro-batches ``1..m`` of the step (its
    backward runs before later micro-batches are routed), so with several micro-batches per replica
    the gradient depends on how the global batch is split (DP=1 x 4 micro-batches vs DP=2 x 2). The
    logged value does not: :meth:`pop_aux_loss` evaluates the loss with ``f`` of all the micro-batches
    since the last call (the global batch of the step) and ``P`` summed over them, from detached
    statistics accumulated here; :func:`hyperp_megatron.model.moe.pop_local_aux_loss` collects it.
    """

    def __init__(self, config, pg_collection=None, gate: str = "sqrt", num_real_experts: int | None = None):
        if gate not in GATES:
            raise ValueError(f"model.moe.gate must be one of {', '.join(GATES)}; got {gate!r}")
        super().__init__(config=config, pg_collection=pg_collection)
        self.gate = gate
        self._logged: dict | None = None  # detached counts and P shares since the last pop_aux_loss
        self._check_config(config)
        # The real routed experts; the rest of config.num_moe_experts are phantoms (module docstring).
        self.num_real_experts = num_real_experts or config.num_moe_experts
        if not 0 < self.num_real_experts <= config.num_moe_experts or self.topk > self.num_real_experts:
            raise ValueError(f"{self.num_real_experts} real routed experts do not fit {config.num_moe_experts} "
                             f"padded ones with top-{self.topk}")
        if self.num_real_experts < config.num_moe_experts:
            self.weight = torch.nn.Parameter(torch.empty((self.num_real_experts, config.hidden_size),
                                                         dtype=torch.float32))
            self.reset_parameters()  # dtype and sequence-parallel attribute, as TopKRouter's own weight
            if self.global_tokens_per_expert is not None:
                self.global_tokens_per_expert = torch.zeros_like(self.global_tokens_per_expert[:self.num_real_experts])

    @staticmethod
    def _check_config(config) -> None:
        """Router options this subclass does not implement must stay at their defaults."""
        unsupported = {
            "moe_router_load_balancing_type": config.moe_router_load_balancing_type != AUX_LOSS_TYPE,
            "moe_router_score_function": config.moe_router_score_function != "softmax",
            # Set at k = 1 only to pass Megatron's config check; ignored (softmax over the k selected).
            "moe_router_pre_softmax": config.moe_router_pre_softmax and config.moe_router_topk > 1,
            "moe_z_loss_coeff": bool(config.moe_z_loss_coeff),
            "moe_expert_capacity_factor": config.moe_expert_capacity_factor is not None,
            "moe_router_enable_expert_bias": config.moe_router_enable_expert_bias,
            "moe_router_group_topk": bool(config.moe_router_group_topk),
            "moe_router_topk_scaling_factor": bool(config.moe_router_topk_scaling_factor),
            "moe_input_jitter_eps": bool(config.moe_input_jitter_eps),
            "moe_router_force_load_balancing": config.moe_router_force_load_balancing,
            "calculate_per_token_loss": config.calculate_per_token_loss,
        }
        bad = [name for name, is_set in unsupported.items() if is_set]
        if bad:
            raise ValueError(f"SqrtGateRouter does not support these TransformerConfig settings: {bad}")

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """logits [s, b, E] -> (probs [s*b, E], routing_map [s*b, E]), with the aux loss attached."""
        if padding_mask is not None:
            raise ValueError("SqrtGateRouter does not support padding masks")
        logits = logits.view(-1, self.num_real_experts)
        probs, routing_map = topk_gates(logits, self.topk, self.gate)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            probs = self._attach_load_balancing_loss(probs, logits, routing_map)
        phantoms = self.config.num_moe_experts - self.num_real_experts
        if phantoms:  # zero gate, never selected: the dispatcher sends no token to a phantom expert
            probs = torch.nn.functional.pad(probs, (0, phantoms))
            routing_map = torch.nn.functional.pad(routing_map, (0, phantoms))
        return probs, routing_map

    def _attach_load_balancing_loss(self, probs, logits, routing_map):
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)  # P: all routed experts
        counts = routing_map.sum(dim=0).float()
        # f over the global batch: every token of this micro-batch sits on exactly one rank of the
        # TP x DP x CP group (sequence parallel splits tokens over TP; EP ranks are DP ranks).
        dist.all_reduce(counts, group=self.tp_dp_cp_group)
        if self.global_tokens_per_expert.dtype != torch.float32:  # Float16Module casts buffers
            self.global_tokens_per_expert.data = self.global_tokens_per_expert.data.float()
            self.ga_steps.data = self.ga_steps.data.float()
        # With gradient accumulation f is the running mean over this step's micro-batches so far.
        self.global_tokens_per_expert += counts
        self.ga_steps += 1
        num_local = logits.shape[0]
        loss = switch_load_balancing_loss(
            scores,
            self.global_tokens_per_expert / self.ga_steps,
            num_global_tokens=num_local * self.tp_dp_cp_group.size(),
            num_replica_tokens=num_local * self.tp_cp_group.size(),
            topk=self.topk,
            coeff=self.get_aux_loss_coeff(AUX_LOSS_TYPE),
        )
        self._accumulate_logged(counts, scores.detach().sum(dim=0) / (num_local * self.tp_cp_group.size()),
                                num_local * self.tp_dp_cp_group.size())
        return MoEAuxLossAutoScaler.apply(probs, loss)

    def _accumulate_logged(self, counts: torch.Tensor, prob_share: torch.Tensor, num_global_tokens: int) -> None:
        if self._logged is None:
            self._logged = {"counts": counts.clone(), "prob_share": prob_share, "num_global_tokens": 0,
                            "coeff": self.get_aux_loss_coeff(AUX_LOSS_TYPE)}
        else:
            self._logged["counts"] += counts
            self._logged["prob_share"] += prob_share
        self._logged["num_global_tokens"] += num_global_tokens

    def pop_aux_loss(self) -> torch.Tensor | None:
        """This rank's aux-loss share of the micro-batches since the last call, summed over them, with ``f``
        over all of them (global); resets. Summed over the TP/CP ranks of a replica and the replicas and
        divided by (replicas x micro-batches): ``gamma E sum_e f_e P_e`` of the whole step."""
        logged, self._logged = self._logged, None
        if logged is None:
            return None
        return switch_load_balancing_loss(logged["prob_share"][None, :], logged["counts"], logged["num_global_tokens"],
                                          1.0, self.topk, logged["coeff"])
