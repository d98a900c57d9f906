"""Run megatron-core 0.16.1 on the CPU (CPU tensors, gloo collectives): applied only when the decided
device is the CPU (what it needs without TE/apex on any device is in :mod:`.without_te`).

megatron-core assumes CUDA in a handful of ways (measured on megatron-core 0.16.1):

1. ``torch.cuda.current_device()`` as the allocation device (tensor_parallel layers and mappings,
   param/grad buffers, DDP, p2p, the optimizer), ``torch.cuda`` RNG state in the RNG tracker, and
   CUDA streams / events / ``synchronize`` in DDP and the MoE dispatcher.
2. Literal ``device="cuda"`` allocations (optimizer, clip_grads, param buffers, the default causal
   mask in ``transformer.utils``), ``.cuda()`` moves and ``param.type() == "torch.cuda.FloatTensor"`` checks.
3. MoE all-to-all split sizes stay tensors (gloo wants lists).

Rather than copying Megatron functions, two small mechanisms cover (1) and (2):

- :class:`_TorchOnCpu`, a stand-in for the ``torch`` module *inside the listed Megatron modules
  only*: its ``torch.cuda`` maps devices, RNG state and streams onto the CPU, and its tensor
  factories turn ``device="cuda"`` into the CPU. Everything else is the real ``torch``.
- :class:`_CudaToCpuMode`, a ``TorchFunctionMode`` entered only around the few listed functions
  that call ``.cuda()`` or compare ``.type()`` strings.

:func:`apply` applies everything once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_CUDA_DEVICES = ("cuda",)


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] in _CUDA_DEVICES
    return isinstance(device, int)  # a CUDA ordinal from torch.cuda.current_device()


def _cpu_device_kwargs(kwargs: dict) -> dict:
    if "device" in kwargs and _is_cuda_device(kwargs["device"]):
        kwargs = dict(kwargs, device="cpu")
    return kwargs


class _NullStream:
    """Stands for torch.cuda.Stream / Event on the CPU: every operation completes immediately."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _make_cpu_cuda_namespace() -> types.SimpleNamespace:
    """What ``torch.cuda`` means inside the patched Megatron modules."""
    real = torch.cuda

    def _stream_context(stream=None):
        return contextlib.nullcontext()

    namespace = types.SimpleNamespace(
        is_available=lambda: False,
        device_count=lambda: 0,
        current_device=lambda: "cpu",
        set_device=lambda *args, **kwargs: None,
        synchronize=lambda *args, **kwargs: None,
        Stream=_NullStream,
        Event=_NullStream,
        current_stream=lambda *args, **kwargs: _NullStream(),
        default_stream=lambda *args, **kwargs: _NullStream(),
        stream=_stream_context,
        is_current_stream_capturing=lambda: False,
        # The RNG tracker keeps named generator states; on CPU they are CPU generator states.
        get_rng_state=lambda *args, **kwargs: torch.get_rng_state(),
        set_rng_state=lambda state, *args, **kwargs: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        random=types.SimpleNamespace(
            get_rng_state=lambda *args, **kwargs: torch.get_rng_state(),
            set_rng_state=lambda state, *args, **kwargs: torch.set_rng_state(state),
        ),
        nvtx=types.SimpleNamespace(
            range_push=lambda *args, **kwargs: None,
            range_pop=lambda *args, **kwargs: None,
            range=lambda *args, **kwargs: contextlib.nullcontext(),
        ),
        memory_allocated=lambda *args, **kwargs: 0,
        max_memory_allocated=lambda *args, **kwargs: 0,
        empty_cache=lambda: None,
    )
    # Anything not listed (e.g. torch.cuda.amp, CUDAGraph, FloatTensor) falls through to the real one.
    return types.SimpleNamespace(**{**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")},
                                    **vars(namespace)})


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "zeros_like",
              "empty_like", "ones_like", "full_like", "as_tensor", "randint")


class _TorchOnCpu(types.ModuleType):
    """The real ``torch`` module, except ``torch.cuda`` and ``device="cuda"`` mean the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _make_cpu_cuda_namespace()
        for name in _FACTORIES:
            real_fn = getattr(torch, name)
            setattr(self, name, self._on_cpu(real_fn))

    @staticmethod
    def _on_cpu(real_fn):
        @functools.wraps(real_fn)
        def factory(*args, **kwargs):
            return real_fn(*args, **_cpu_device_kwargs(kwargs))

        return factory

    def __getattr__(self, name):
        return getattr(torch, name)


class _CudaToCpuMode(TorchFunctionMode):
    """Inside this mode ``t.cuda()`` is a no-op and ``t.type()`` reports ``torch.cuda.*Tensor``."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)  # nested modes (a wrapped function calling another) rename only once
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) and not isinstance(a, int) else a for a in args)
        return func(*args, **_cpu_device_kwargs(kwargs))


def _under_cpu_mode(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaToCpuMode():
            return fn(*args, **kwargs)

    wrapper.__hyperp_cpu_wrapped__ = True
    return wrapper


# Megatron modules whose global name ``torch`` is replaced by _TorchOnCpu.
_MODULES_USING_CUDA = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.layer_wise_optimizer",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.rerun_state_machine",
)

# (module, qualified name) of functions that call ``.cuda()`` or compare ``.type()`` strings.
_FUNCTIONS_USING_CUDA_TYPES = (
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.load_state_dict"),
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer._get_state_dict_to_load"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
)


def _wrap_function(module, qualname: str) -> None:
    owner = module
    *parents, name = qualname.split(".")
    for part in parents:
        owner = getattr(owner, part)
    fn = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if fn is None or getattr(fn, "__hyperp_cpu_wrapped__", False):
        return  # not present in this megatron-core version
    if isinstance(fn, (classmethod, staticmethod)):
        wrapped = type(fn)(_under_cpu_mode(fn.__func__))
        wrapped.__hyperp_cpu_wrapped__ = True
    else:
        wrapped = _under_cpu_mode(fn)
    setattr(owner, name, wrapped)
    if owner is module:  # module-level functions are also imported by name elsewhere in megatron
        for other in list(sys.modules.values()):
            if getattr(other, "__name__", "").startswith("megatron.") and getattr(other, name, None) is fn:
                setattr(other, name, wrapped)


def _patch_moe() -> None:
    """``moe_utils.maybe_move_tensor_to_cpu`` (also imported by ``token_dispatcher``) converts only CUDA
    tensors to host arrays, so on the CPU the all-to-all split sizes reach gloo as tensors (TypeError):
    return numpy arrays (gloo takes lists / arrays)."""
    from megatron.core.transformer.moe import moe_utils

    original_move = moe_utils.maybe_move_tensor_to_cpu

    def move_to_host(tensor, as_numpy=False, record_stream=False):
        if isinstance(tensor, torch.Tensor):
            return tensor.numpy() if as_numpy else tensor
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move_to_host
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    if hasattr(dispatcher, "maybe_move_tensor_to_cpu"):
        dispatcher.maybe_move_tensor_to_cpu = move_to_host


def _patch_rng_tracker_set_state() -> None:
    """``tensor_parallel.random._set_cuda_rng_state`` sets the CUDA generator through ``torch._C`` or
    ``torch.cuda._lazy_call``, which on a CPU-only build queues the call forever: the tracker's ``fork()``
    would not switch streams. On the CPU the tracker's streams are CPU generator states (the stand-in
    ``torch.cuda`` above), so set the CPU generator."""
    from megatron.core.tensor_parallel import random as tp_random

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    tp_random._set_cuda_rng_state = set_state


def apply() -> None:
    """Make megatron-core run on the CPU with gloo (idempotent). Only for a process whose device is the
    CPU: inside the listed modules ``torch.cuda`` then means the CPU. Selected by
    :func:`hyperp_megatron.compat.apply_patches`."""
    global _APPLIED
    if _APPLIED:
        return
    cpu_torch = _TorchOnCpu()
    for name in _MODULES_USING_CUDA:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = cpu_torch
    for module_name, qualname in _FUNCTIONS_USING_CUDA_TYPES:
        _wrap_function(importlib.import_module(module_name), qualname)
    _patch_rng_tracker_set_state()
    _patch_moe()
    _APPLIED = True
