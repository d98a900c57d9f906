"""The device is decided once (parallel.py) and threaded through; megatron-core's compatibility patches
are chosen by it; fused-kernel flags follow importable kernels; FP8 is refused without TE.

Everything here runs on the CPU: a fake device ("meta", or "cuda" objects that are never used to
allocate) is enough to catch a hard-coded "cpu", and ``torch.cuda.is_available`` is patched where the
GPU branch of a decision is tested.
"""

from __future__ import annotations

import ast
import importlib.util
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.tier("unit")

PACKAGE = Path(__file__).resolve().parent.parent / "hyperp_megatron"
META = torch.device("meta")
GPU = torch.device("cuda", 0)


# ---------------------------------------------------------------------- the decision


def test_device_decided_from_backend_and_local_rank(monkeypatch):
    from hyperp_megatron.config import ParallelConfig
    from hyperp_megatron.parallel import backend_for, decide_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert decide_device(ParallelConfig(), 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="parallel.backend is 'nccl' but CUDA is unavailable"):
        decide_device(ParallelConfig(backend="nccl"), 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # SLURM: one visible GPU per task
    assert decide_device(ParallelConfig(), 5) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert decide_device(ParallelConfig(), 5) == torch.device("cuda", 5)
    assert decide_device(ParallelConfig(backend="gloo"), 5) == torch.device("cpu")
    assert backend_for(torch.device("cuda", 5)) == "nccl" and backend_for(torch.device("cpu")) == "gloo"


# ---------------------------------------------------------------------- threading


class _Collective(Exception):
    """Raised by the stand-in collective after recording the device of its tensor."""


@pytest.fixture
def collective_devices(monkeypatch):
    """Replace every collective the loop uses by one that records its tensor's device and stops."""
    seen: list[torch.device] = []

    def record(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Collective

    monkeypatch.setattr(dist, "all_reduce", record)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    return seen


def test_loop_collectives_use_the_passed_device(collective_devices):
    from hyperp_megatron import checkpoint, step

    one_rank = types.SimpleNamespace(rank=lambda: 0, size=lambda: 1)
    pg_collection = types.SimpleNamespace(tp=one_rank, dp=one_rank)
    meta_model = [torch.nn.Linear(2, 2, device=META)]
    calls = [
        lambda: step.agree_on_step(torch.zeros(2, device=META), torch.ones((), device=META), False,
                                   torch.zeros((), device=META), False, META),
        lambda: step._mean_loss_over_world([], pg_collection, True, META),
        lambda: checkpoint._check_finite_weights(meta_model, 1, META),
    ]
    for call in calls:
        with pytest.raises(_Collective):
            call()
    assert collective_devices == [META] * len(calls)


def test_batches_go_to_the_passed_device():
    from hyperp_megatron.data.datasets import get_batch

    batch = {"tokens": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long),
             "loss_mask": torch.ones(2, 4), "position_ids": torch.arange(4).expand(2, 4)}
    moved = get_batch(iter([batch]), META)
    assert moved["attention_mask"] is None
    assert {name: t.device for name, t in moved.items() if t is not None} == dict.fromkeys(batch, META)


def test_train_iterators_pin_memory_for_a_gpu(monkeypatch):
    from hyperp_megatron import train
    from hyperp_megatron.data import datasets

    seen = []
    monkeypatch.setattr(datasets, "build_data_iterator", lambda dataset, **kwargs: seen.append(kwargs["pin_memory"]))
    for device in (GPU, torch.device("cpu")):
        session = types.SimpleNamespace(
            device=device, datasets=types.SimpleNamespace(train=None, valid=None),
            pg_collection=types.SimpleNamespace(dp=types.SimpleNamespace(rank=lambda: 0, size=lambda: 1)),
            cfg=types.SimpleNamespace(train=types.SimpleNamespace(micro_batch_size=1, eval_iters=1)),
            runner=types.SimpleNamespace(num_microbatches=1, evaluate=lambda iterator, n: 0.0))
        train._train_iterator(session, 0)
        train.evaluate(session)
    assert seen == [True, True, False, False]


def _tiny_cfg(**sections):
    from hyperp_megatron.config import load_config

    base = {"model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                      "seq_length": 32}, "train": {"micro_batch_size": 1, "global_batch_size": 1}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return load_config(None, base)


def test_model_is_built_on_the_passed_device(pg_collection):
    from hyperp_megatron.model.gpt import build_model

    cfg = _tiny_cfg(model={"moe": {"sparsity": 2, "granularity": 2}})
    (model,) = build_model(cfg, pg_collection, 256, device=META)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert tensors and {name: t.device for name, t in tensors.items()} == dict.fromkeys(tensors, META)
    assert model.config.use_cpu_initialization  # only a GPU allocates in Megatron's own constructors


def test_gpu_transformer_config(pg_collection):
    from hyperp_megatron.compat import fused_kernel_flags
    from hyperp_megatron.model.gpt import transformer_config

    config = transformer_config(_tiny_cfg(), pg_collection, device=GPU)
    assert not config.use_cpu_initialization and not config.deterministic_mode
    assert all(getattr(config, flag) == on for flag, on in fused_kernel_flags(GPU).items())
    assert transformer_config(_tiny_cfg(train={"deterministic": True}), pg_collection, device=GPU).deterministic_mode
    cpu_config = transformer_config(_tiny_cfg(), pg_collection, device=torch.device("cpu"))
    assert cpu_config.use_cpu_initialization and cpu_config.deterministic_mode
    assert not any(getattr(cpu_config, flag) for flag in fused_kernel_flags(GPU))


# ---------------------------------------------------------------------- fused kernels


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # "apex.contrib..." without apex
        return False


def test_each_fused_flag_follows_its_kernel_module(monkeypatch, pg_collection):
    from hyperp_megatron.compat import without_te
    from hyperp_megatron.model.gpt import transformer_config

    assert "scaled_masked_softmax_cuda" in without_te.FUSED_KERNEL_MODULES["masked_softmax_fusion"]
    on_gpu = without_te.fused_kernel_flags(GPU)
    for flag, modules in without_te.FUSED_KERNEL_MODULES.items():
        assert on_gpu[flag] == all(_importable(module) for module in modules), flag
    assert not any(without_te.fused_kernel_flags(torch.device("cpu")).values())
    # Every fusion flag the config could turn on has a kernel entry (a new one must be added above).
    config = transformer_config(_tiny_cfg(), pg_collection, device=GPU)
    fusion_fields = {name for name in vars(config) if name.endswith("_fusion") or name == "persist_layer_norm"}
    assert {name for name in fusion_fields if getattr(config, name)} <= set(without_te.FUSED_KERNEL_MODULES)
    # With the kernels present the flags turn on (GPU only).
    monkeypatch.setattr(without_te, "module_available", lambda name: True)
    assert all(without_te.fused_kernel_flags(GPU).values())
    assert not any(without_te.fused_kernel_flags(torch.device("cpu")).values())


# ---------------------------------------------------------------------- compat selection


def test_patch_groups_follow_the_device(monkeypatch):
    from hyperp_megatron import compat

    assert compat.patch_groups(torch.device("cpu")) == ("without_te", "cpu")
    assert compat.patch_groups(GPU) == ("without_te",)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compat.apply_cpu_patches() is False


def test_router_and_sp_norm_without_te_when_cuda_is_present(monkeypatch):
    """On a GPU without TE: the device decision selects only the without_te group, and that group alone
    makes the router GEMM and sequence-parallel torch norms work."""
    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.moe import moe_utils

    from hyperp_megatron import compat
    from hyperp_megatron.config import ParallelConfig
    from hyperp_megatron.parallel import decide_device

    monkeypatch.delattr(moe_utils, "te_general_gemm", raising=False)  # as on a fresh GPU process
    x = torch.randn(5, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(NameError, match="te_general_gemm"):  # the measured crash (control)
        moe_utils.router_gating_linear(x, weight, None, torch.float32)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    device = decide_device(ParallelConfig(), local_rank=0)
    assert device.type == "cuda"
    assert compat.apply_patches(device) == ("without_te",)
    logits = moe_utils.router_gating_linear(x, weight, None, torch.float32)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ weight.float().t())
    logits.square().sum().backward()
    expected_grad = (2 * logits @ weight.float()).to(torch.bfloat16)
    torch.testing.assert_close(x.grad, expected_grad, rtol=2e-2, atol=2e-2)

    sp_config = types.SimpleNamespace(sequence_parallel=True, layernorm_zero_centered_gamma=False,
                                      persist_layer_norm=False, memory_efficient_layer_norm=False,
                                      normalization="RMSNorm")
    norm = torch_norm.WrappedTorchNorm(sp_config, 8)
    assert isinstance(norm, torch.nn.RMSNorm) and all(p.sequence_parallel for p in norm.parameters())


# ---------------------------------------------------------------------- FP8 and TE requests


def test_fp8_refused_with_one_line():
    from hyperp_megatron.config import TrainConfig
    from hyperp_megatron.model.fp8 import check_fp8, fp8_config_kwargs

    fp8 = TrainConfig(fp8="e4m3")
    cases = [(torch.device("cpu"), False, False, "device is cpu and Transformer Engine is not installed"),
             (GPU, False, False, "Transformer Engine is not installed"),
             (GPU, False, True, "model.transformer_impl is 'local'")]
    for device, use_te, have_te, reason in cases:
        with pytest.raises(ValueError, match="train.fp8 'e4m3'") as error:
            check_fp8(fp8, use_te, have_te, device)
        assert reason in str(error.value) and "\n" not in str(error.value)
    check_fp8(TrainConfig(), False, False, torch.device("cpu"))  # no FP8: nothing to refuse
    assert fp8_config_kwargs(TrainConfig()) == {}
    assert fp8_config_kwargs(TrainConfig(fp8="hybrid", fp8_recipe="delayed")) == {
        "fp8": "hybrid", "fp8_recipe": "delayed", "fp8_margin": 0, "fp8_amax_history_len": 1024,
        "fp8_amax_compute_algo": "max"}


def test_fp8_needs_a_capable_gpu(monkeypatch):
    from hyperp_megatron.config import TrainConfig
    from hyperp_megatron.model.fp8 import check_fp8

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="NVIDIA A100 has compute capability 8.0"):
        check_fp8(TrainConfig(fp8="e4m3"), True, True, GPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8(TrainConfig(fp8="e4m3", fp8_recipe="blockwise"), True, True, GPU)
    with pytest.raises(ValueError, match=r"capability >= 10.0"):
        check_fp8(TrainConfig(fp8="e4m3", fp8_recipe="mxfp8"), True, True, GPU)


@pytest.mark.parametrize("override, message", [
    (["--train.fp8", "e4m3"], "error: train.fp8 'e4m3'"),
    (["--model.transformer_impl", "transformer_engine"], "error: model.transformer_impl is 'transformer_engine'"),
])
def test_trainer_refuses_fp8_and_te_on_cpu_in_one_line(capsys, monkeypatch, override, message):
    from hyperp_megatron import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main(["--config", "configs/tiny.yaml", "--parallel.tensor", "1", *override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


# ---------------------------------------------------------------------- memory metrics


def test_peak_memory_only_on_a_gpu(monkeypatch):
    from hyperp_megatron.metrics import peak_memory_gib

    assert peak_memory_gib(torch.device("cpu")) == {}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 << 30)
    assert peak_memory_gib(GPU) == {"mem_peak_alloc_gib": 3.0, "mem_peak_reserved_gib": 4.0}


# ---------------------------------------------------------------------- static checks over the package

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv"}
FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "linspace", "eye",
             "as_tensor"}


def _factory_without_device(node) -> bool:
    """``torch.<factory>(...)`` with no ``device=``: a CPU tensor, whatever the run's device."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            and not any(keyword.arg == "device" for keyword in node.keywords))


def collectives_on_deviceless_tensors(source: str) -> list[int]:
    """Lines of collectives (``dist.<op>``) whose tensor argument is, or is assigned in the same function
    from, a torch factory call without ``device=``."""
    tree = ast.parse(source)
    bad = []
    for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module))]:
        created = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and _factory_without_device(node.value):
                created.update({target.id: node.lineno for target in node.targets if isinstance(target, ast.Name)})
        for node in ast.walk(function):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in COLLECTIVES and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "dist"):
                continue
            for arg in node.args[:2]:
                if _factory_without_device(arg) or (isinstance(arg, ast.Name) and arg.id in created):
                    bad.append(node.lineno)
    return sorted(set(bad))


def _package_sources():
    return {path.relative_to(PACKAGE).as_posix(): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_the_static_check_catches_a_cpu_tensor_collective():  # control for the test below
    source = ("def f(group, device):\n"
              "    value = torch.tensor([1], dtype=torch.int64)\n"
              "    dist.all_reduce(value, group=group)\n"
              "    ok = torch.zeros(2, device=device)\n"
              "    dist.all_reduce(ok)\n"
              "    dist.broadcast(torch.ones(3), 0)\n")
    assert collectives_on_deviceless_tensors(source) == [3, 6]


def test_no_collective_on_a_tensor_created_without_device():
    found = {name: lines for name, source in _package_sources().items()
             if (lines := collectives_on_deviceless_tensors(source))}
    assert not found, f"collectives on tensors created without device= (NCCL rejects CPU tensors): {found}"


def test_only_parallel_and_compat_ask_for_cuda():
    allowed = lambda name: name == "parallel.py" or name.startswith("compat/")  # noqa: E731
    asking = [name for name, source in _package_sources().items()
              if "cuda.is_available" in source and not allowed(name)]
    assert not asking, f"modules deciding the device for themselves: {asking}"


def test_no_cpu_device_defaults():
    """A parameter ``device="cpu"`` is how batches stayed on the CPU on a GPU (issue 11, crash 1)."""
    found = []
    for name, source in _package_sources().items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                found += [f"{name}:{node.name}" for arg, default in zip(args, defaults)
                          if arg.arg == "device" and isinstance(default, ast.Constant) and default.value == "cpu"]
    assert not found, found


@pytest.mark.parametrize("tf32, deterministic, expected", [(True, False, True), (True, True, False),
                                                          (False, False, False)])
def test_tf32_decided_once_with_the_device(tf32, deterministic, expected):
    """configure_numerics: TF32 (matmul precision 'high', cuDNN) on a GPU with train.tf32, off under
    train.deterministic; nothing changes on the CPU."""
    from hyperp_megatron.config import Config
    from hyperp_megatron.train import configure_numerics

    cfg = Config()
    cfg.train.tf32, cfg.train.deterministic = tf32, deterministic
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    try:
        configure_numerics(cfg, torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == saved[0]
        configure_numerics(cfg, torch.device("cuda", 0))  # sets flags only; no CUDA call
        assert (torch.get_float32_matmul_precision() == "high") is expected
        assert torch.backends.cudnn.allow_tf32 is expected
        assert torch.are_deterministic_algorithms_enabled() is deterministic
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
        torch.use_deterministic_algorithms(saved[2])
        torch.backends.cudnn.deterministic = saved[3]
