"""The optimizer of a run inside Megatron's optimizer wrappers: global grad clipping, bf16 master weights, dist
checkpoints; the LR setter and the lookups the monitors use.

``build_optimizer`` builds ``optim.name``: AdamW is Megatron's own (``get_megatron_optimizer``); sphere Muon and
the Muon baseline (``build_sphere_optimizer``) mirror Megatron's ``get_megatron_muon_optimizer``:

- the parameters of this rank (roles and layouts from ``param_groups.assign_parameters``) go into two
  ``SphereMuon`` instances, dense and routed-expert, each wrapped in ``FP32Optimizer`` (fp32) or
  ``Float16OptimizerWithFloat16Params`` (bf16: fp32 master weights and fp32 state) and combined by a
  ``ChainedOptimizer``. Megatron then clips by the global gradient norm: the dense norm is reduced
  over the model-parallel group (TP x PP), the expert norm over TP x EP x PP, and the two are combined.
- layer-wise data parallelism (``parallel.distributed_optimizer`` under sphere_muon / muon): dense
  matrices are split over the data-parallel group, routed experts over the expert-data-parallel
  group; Megatron's DDP keeps replicated gradients (its distributed optimizer is AdamW-only).

Checkpoints (``dist_checkpointing``) reuse the model's sharding: momentum and Adam moments are
parameter-shaped and saved like the parameter (``optimizer.state.<name>.<model key>``). Two entries are
not parameter-shaped and are handled here:

- ``radius``, one fp32 value per sphere (3 for a fused QKV): saved as ``optimizer.radius.<model key>``
  of global shape ``(prepended model axes..., num_pieces)``, e.g. ``(layers, experts, 1)``, replicated
  over the group that shards the matrix (only its rank 0 writes), so it reshards over TP/PP/DP/EP.
- the Adam ``step`` (an int shared by every Adam-rule parameter): one common value, ``common_step``.

Layer-wise mode: only the owner of a matrix holds its state; it saves it as the main replica (DP
component of Megatron's (PP, TP, DP) replica id set to 0) and, on load, every rank asks only for the
state of the matrices it owns under the new layout (re-owning after a DP resize).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
)
from megatron.core.optimizer import (
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    OptimizerConfig,
    get_megatron_optimizer,
)

from hyperp_megatron.config import Config
from hyperp_megatron.derived import DerivedRun
from hyperp_megatron.optim.param_groups import ParamAssignment, assign_parameters, role_table
from hyperp_megatron.optim.sphere_muon import SphereMuon

logger = logging.getLogger(__name__)

ADAM_DIRECTION_RULES = ("sphere_adam", "adamw")  # rules whose state holds the Adam step
NOT_PARAM_SHAPED = ("step", "radius")


def _init_state(optimizer: SphereMuon, config=None) -> None:
    """Megatron's ``init_state_fn``: state tensors to load a checkpoint into."""
    optimizer.init_state()


class _SphereCheckpointing:
    """Sharded state dict and loading for a Megatron wrapper around ``SphereMuon`` (a mixin)."""

    optimizer: SphereMuon

    def _has_master_params(self) -> bool:
        return isinstance(self, Float16OptimizerWithFloat16Params)

    def _model_params(self) -> list[torch.Tensor]:
        """The model's tensors in optimizer order (bf16 model params, not the fp32 masters)."""
        if self._has_master_params():
            assert not any(self.fp32_from_fp32_groups), "bf16 wrapper with fp32 model params"
            return [param for group in self.float16_groups for param in group]
        return self.get_parameters()

    def _optimizer_params(self) -> list[torch.Tensor]:
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        if is_loading:
            self.optimizer.init_state()
        id_to_model = get_param_id_to_sharded_param_map(model_sharded_state_dict, self._model_params())
        params = self._optimizer_params()
        torch_state = self.optimizer.state_dict()
        state = {}
        for index, param_state in torch_state["state"].items():
            param = params[index]
            model_tensor = self._replica_of_state(id_to_model[index], param)
            state[index] = {
                key: make_sharded_optimizer_tensor(model_tensor, value, prefix=f"optimizer.state.{key}")
                for key, value in param_state.items() if key not in NOT_PARAM_SHAPED
            }
            if "radius" in param_state:
                state[index]["radius"] = _radius_sharded_tensor(model_tensor, param_state["radius"],
                                                                self.optimizer.layout(param).group)
        step = self._common_adam_step(torch_state["state"], params)
        if step:
            state["common_step"] = step
        # Groups are rebuilt from the config at start-up (and the LR set each step): never loaded.
        optimizer_sd = {"state": state, "param_groups": LocalNonpersistentObject(torch_state["param_groups"])}
        if not self._has_master_params():
            return optimizer_sd
        masters = [
            make_sharded_optimizer_tensor(id_to_model[index], master, prefix="optimizer.state.fp32_param")
            for index, master in enumerate(params)
        ]
        return {"optimizer": optimizer_sd, "fp32_from_fp16_params": masters}

    def _replica_of_state(self, model_tensor, param: torch.Tensor):
        """The model's sharding; in layer-wise mode the owner (the only holder) is the DP main replica."""
        if not self.optimizer.is_layer_wise(param):
            return model_tensor
        replica = model_tensor.replica_id
        assert isinstance(replica, tuple) and len(replica) == 3, f"expected a (PP, TP, DP) replica id: {replica}"
        return dataclasses.replace(model_tensor, replica_id=(replica[0], replica[1], 0))

    def _common_adam_step(self, state: dict, params: list[torch.Tensor]) -> int | None:
        steps = {value["step"] for index, value in state.items()
                 if self.optimizer.layout(params[index]).rule in ADAM_DIRECTION_RULES}
        assert len(steps) <= 1, f"Adam-rule parameters disagree on the step: {steps}"
        step = steps.pop() if steps else None
        sphere = self.optimizer
        groups = [sphere.layer_wise_dp_group, sphere.layer_wise_expert_dp_group]
        device = params[0].device  # the model's: NCCL reduces GPU tensors only
        for group in [g for i, g in enumerate(groups) if g is not None and g not in groups[:i]]:
            # Layer-wise DP group: a rank owning no Adam-rule parameter has no step, but the common
            # value is written by global rank 0 only, so every DP rank must know it.
            value = torch.tensor([-1 if step is None else step], dtype=torch.int64, device=device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
            step = None if value.item() < 0 else int(value.item())
        return step

    def load_state_dict(self, state_dict) -> None:
        optimizer_sd = state_dict["optimizer"] if self._has_master_params() else state_dict
        state = dict(optimizer_sd["state"])
        step = state.pop("common_step", None)
        params = self._optimizer_params()
        for index, param_state in state.items():
            if self.optimizer.layout(params[index]).rule in ADAM_DIRECTION_RULES:
                assert step is not None, "checkpoint has Adam moments but no common_step"
                param_state["step"] = step
        self.optimizer.load_state_dict({"state": state, "param_groups": optimizer_sd["param_groups"]})
        if self._has_master_params():
            for master, saved in zip(params, state_dict["fp32_from_fp16_params"]):
                master.data.copy_(saved)


class SphereFP32Optimizer(_SphereCheckpointing, FP32Optimizer):
    """Megatron's FP32Optimizer around SphereMuon, with SphereMuon's checkpoint format."""


class SphereFloat16Optimizer(_SphereCheckpointing, Float16OptimizerWithFloat16Params):
    """Megatron's bf16 wrapper (fp32 master weights) around SphereMuon, with its checkpoint format."""


def _radius_sharded_tensor(model_tensor, radius: torch.Tensor, shard_group) -> ShardedTensor:
    """``(num_pieces,)`` radius keyed by the model parameter, with the parameter's prepended axes
    (layer, expert) and replicated over ``shard_group`` (TP / expert-TP) instead of sharded."""
    base = model_tensor.build()[0] if isinstance(model_tensor, ShardedTensorFactory) else model_tensor
    prepend = base.prepend_axis_num
    pp_replica, tp_replica, dp_replica = model_tensor.replica_id
    if shard_group is not None and shard_group.size() > 1:
        tp_replica = shard_group.rank()  # every shard holds the whole radius: rank 0 writes it
    return ShardedTensor(
        key=f"optimizer.radius.{model_tensor.key}",
        data=radius,
        dtype=radius.dtype,
        local_shape=tuple(radius.shape),
        global_shape=tuple(base.global_shape[:prepend]) + tuple(radius.shape),
        global_offset=tuple(base.global_offset[:prepend]) + (0,),
        axis_fragmentations=tuple(base.axis_fragmentations[:prepend]) + (1,),
        replica_id=(pp_replica, tp_replica, dp_replica),
        prepend_axis_num=prepend,
    )


# ---------------------------------------------------------------------- building


def megatron_optimizer_config(cfg: Config, derived: DerivedRun) -> OptimizerConfig:
    """Megatron's optimizer settings; the LR and weight decay are the run's derived values."""
    o = cfg.optim
    return OptimizerConfig(
        optimizer="adam",
        lr=derived.lr,
        min_lr=derived.min_lr,
        weight_decay=derived.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.train.precision == "bf16",
        params_dtype=torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


def build_optimizer(cfg: Config, model_chunks: list, pg_collection, derived: DerivedRun):
    """The optimizer of ``optim.name`` for this rank's model chunks, as a Megatron optimizer (grad clipping over
    all parallel groups, checkpointable state). ``derived``: the run's derived values (``derived.derive``:
    peak LR, matrix weight decay, the Muon baseline's decay reference)."""
    if cfg.optim.name == "adamw":
        return get_megatron_optimizer(megatron_optimizer_config(cfg, derived), model_chunks,
                                      use_gloo_process_groups=False, pg_collection=pg_collection)
    return build_sphere_optimizer(cfg, model_chunks, pg_collection, derived)


def set_learning_rate(optimizer, lr: float) -> None:
    """All groups share one LR from the schedule (docs/method.md section 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def torch_param_groups(assignments: list[ParamAssignment], weight_decay: float,
                       decay_peak_lr: float | None = None) -> list[dict]:
    """One torch param group per rule (in first-seen order); elementwise AdamW has weight decay 0.

    The Muon baseline's matrices (rule 'muon') decay by ``(eta(t) / decay_peak_lr) * weight_decay`` per step
    ("independent" weight decay as the HyperP reference's baseline); the sphere rules by ``eta(t) * wd``.
    """
    groups: dict[str, dict] = {}
    for a in assignments:
        group = groups.setdefault(a.rule, {"params": [], "rule": a.rule,
                                           "weight_decay": 0.0 if a.rule == "adamw" else weight_decay,
                                           "decay_peak_lr": decay_peak_lr if a.rule == "muon" else None})
        group["params"].append(a.param)
    return list(groups.values())


def ns_compute_dtype(ns_dtype: str, device: torch.device) -> torch.dtype:
    """``optim.ns_dtype`` -> the dtype of the Newton-Schulz iterations ('auto': bf16 on a GPU, fp32 on the
    CPU, where the parity tests compare with the fp32 reference)."""
    if ns_dtype == "auto":
        ns_dtype = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[ns_dtype]


def _wrap(inner: SphereMuon, config, grad_stats_group, tp_group):
    if config.bf16:
        wrapped = SphereFloat16Optimizer(inner, config, None, _init_state)
        # The wrapper put fp32 master copies into the param groups in place of the bf16 params.
        pairs = zip(wrapped.float16_groups, wrapped.fp32_from_float16_groups)
        inner.replace_params({model: master for models, masters in pairs for model, master in zip(models, masters)})
    else:
        wrapped = SphereFP32Optimizer(inner, config, _init_state)
    wrapped.grad_stats_parallel_group = grad_stats_group
    wrapped.tp_group = tp_group  # TP duplicates (e.g. norms, router) count once in the grad norm
    return wrapped


def build_sphere_optimizer(cfg: Config, model_chunks: list, pg_collection, derived: DerivedRun) -> ChainedOptimizer:
    """SphereMuon (optim.name 'sphere_muon' or the 'muon' baseline) for this rank's model chunks."""
    o = cfg.optim
    if o.name not in ("sphere_muon", "muon"):
        raise ValueError(f"build_sphere_optimizer handles optim.name sphere_muon / muon, got {o.name!r}")
    # Megatron's distributed optimizer shards flat buffers; SphereMuon needs whole matrices: its own
    # layer-wise split replaces it (Megatron's DDP keeps plain all-reduced gradients).
    config = dataclasses.replace(megatron_optimizer_config(cfg, derived), use_distributed_optimizer=False)
    layer_wise = cfg.parallel.distributed_optimizer
    assignments = assign_parameters(model_chunks, o.name, pg_collection, o.expert_sphere)
    logger.info("optimizer roles: %s", role_table(assignments))
    ns_dtype = ns_compute_dtype(o.ns_dtype, next(model_chunks[0].parameters()).device)
    optimizers = []
    for is_expert in (False, True):
        members = [a for a in assignments if a.layout.is_expert == is_expert]
        if not members:
            continue
        inner = SphereMuon(
            torch_param_groups(members, derived.weight_decay, derived.decay_peak_lr),
            {a.param: a.layout for a in members},
            lr=derived.lr, momentum=o.momentum, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
            weight_decay=derived.weight_decay, ns_mode=o.ns_mode, ns_compute_dtype=ns_dtype,
            # Layer-wise groups: the DP group that holds replicas of these parameters (dense: DP x CP
            # as Megatron's DDP reduces them; routed experts: the expert-data-parallel group).
            layer_wise_dp_group=pg_collection.dp_cp if layer_wise and not is_expert else None,
            layer_wise_expert_dp_group=pg_collection.expt_dp if layer_wise and is_expert else None,
        )
        # Grad-norm groups: dense grads differ over TP x PP (the model-parallel group), expert grads
        # over expert-TP x EP x PP; DP replicas are identical (reduced by DDP) and are not summed.
        grad_stats_group = pg_collection.tp_ep_pp if is_expert else pg_collection.mp
        optimizers.append(_wrap(inner, config, grad_stats_group,
                                pg_collection.expt_tp if is_expert else pg_collection.tp))
    return ChainedOptimizer(optimizers)
