"""The path to a GPU cluster (issue 23 items 1-4), checked on the CPU: the --system install never asks for torch,
hyperp-env reports and refuses as the trainer would, MFU has one stated convention and a peak table, and the memory
planner / the trainer's start-up check propose what fits; a vocabulary override says what it changes."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hyperp_megatron import budget, memory_fit, plan
from hyperp_megatron.config import ConfigError, ModelConfig, load_config
from hyperp_megatron.derived import derive, vocab_change_line
from hyperp_megatron.hardware import GpuInfo, bf16_peak_tflops, mfu_peak

pytestmark = pytest.mark.tier("unit")

REPO = Path(__file__).resolve().parents[1]
D8, D24 = REPO / "configs/hyperp/dense_d8.yaml", REPO / "configs/hyperp/dense_d24.yaml"
H100 = GpuInfo("NVIDIA H100 80GB HBM3", 79.1, (9, 0))


def _names_torch(arg: str) -> bool:
    return re.split(r"[<>=!~\[;]", arg, maxsplit=1)[0].strip().lower() == "torch"


# ---------------------------------------------------------------------- install


def test_setup_system_never_requests_torch_and_pins_the_installed_one():
    proc = subprocess.run(["bash", "tools/setup.sh", "--system", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"torch=={torch.__version__}" in lines[0]  # the constraints file every pip call uses
    pip_calls = [shlex.split(line) for line in lines if " -m pip install " in line]
    assert len(pip_calls) == 4
    for call in pip_calls:
        assert "-c" in call, call
        assert not [arg for arg in call if _names_torch(arg)], call
    assert any(call[-3:] == ["--no-deps", "--no-build-isolation", "-e"] or call[-4:-1] == ["--no-deps",
               "--no-build-isolation", "-e"] for call in pip_calls), pip_calls
    requested = {arg for call in pip_calls for arg in call[call.index("-c") + 2:] if not arg.startswith("-")}
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(declared) - {"torch"} <= requested


def test_setup_system_refuses_a_python_without_torch(tmp_path):
    no_site = tmp_path / "python"
    no_site.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # -S: no site-packages, so no torch
    no_site.chmod(0o755)
    proc = subprocess.run(["bash", "tools/setup.sh", "--system", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": str(no_site)})
    assert proc.returncode == 2 and "never installs one" in proc.stderr and not proc.stdout


def test_no_extra_requests_torch():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"te", "mpi"} <= set(extras)
    assert not [dep for deps in extras.values() for dep in deps if _names_torch(dep)]


# ---------------------------------------------------------------------- hyperp-env


def test_env_check_reports_versions_and_the_runs_choices(capsys):
    from hyperp_megatron import env_check

    assert env_check.main(["--config", str(REPO / "configs/hyperp/moe_d8.yaml"), "--parallel.backend", "auto",
                           "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__.split("+")[0] or report["versions"]["torch"] == \
        torch.__version__
    assert report["versions"]["megatron-core"] == "0.16.1" and report["gpus"] == []
    run = {row["what"].split(" (")[0]: row for row in report["run"]}
    assert run["device"]["use"] == "cpu (gloo)"
    assert run["core attention"]["use"] == "torch scaled_dot_product_attention"
    assert run["Newton-Schulz dtype"]["use"] == "auto: float32"
    assert "SequentialMLP" in run["routed experts"]["use"]
    assert run["MFU"]["use"].startswith("no GPU") and "not checked on the CPU" in run["memory"]["use"]
    assert not any(row["refused"] for row in report["run"])


def test_env_check_refuses_what_the_trainer_refuses(capsys):
    from hyperp_megatron import env_check

    assert env_check.main(["--config", str(D8), "--parallel.backend", "auto", "--train.fp8", "hybrid",
                           "--model.transformer_impl", "transformer_engine"]) == 2
    out = capsys.readouterr().out
    assert "fp8 (train.fp8): REFUSED: train.fp8 'hybrid'" in out
    assert "layers (model.transformer_impl): REFUSED: model.transformer_impl is 'transformer_engine'" in out


# ---------------------------------------------------------------------- MFU


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0),
                                        ("NVIDIA B200", 2250.0), ("NVIDIA GeForce RTX 4090", None)])
def test_bf16_peak_by_device_name(name, peak):
    assert bf16_peak_tflops(name) == peak


def test_mfu_peak_and_reason():
    assert mfu_peak(None)[0] is None and "no GPU" in mfu_peak(None)[1]
    assert mfu_peak(GpuInfo("Some GPU", 10.0, (8, 0))) == (None, mfu_peak(GpuInfo("Some GPU", 10.0, (8, 0)))[1])
    assert mfu_peak(H100)[0] == 989e12


def test_model_flops_per_token_convention():
    shape = budget.ModelShape(depth=8, width=1024, num_heads=16, num_kv_heads=4, head_dim=128, ffn=4096,
                              vocab_size=32000, seq_length=2048)
    non_embedding = budget.num_params(shape) - 32000 * 1024
    causal_attention = 6 * 8 * 2048 * 2048
    assert budget.model_flops_per_token(shape) == 6 * non_embedding + causal_attention
    assert budget.model_flops_per_token(shape) == pytest.approx(1.2535e9, rel=1e-4)
    # the reference's budget convention counts the input embedding and the full s x s square
    assert budget.flops_per_token(shape) - budget.model_flops_per_token(shape) == 6 * 32000 * 1024 + causal_attention


def test_throughput_and_the_progress_line(tmp_path, capsys):
    from hyperp_megatron.metrics import MetricsLogger
    from hyperp_megatron.train import throughput

    assert throughput(8000.0, 8, 1e9, None) == {"tokens_per_s_per_gpu": 1000.0}
    values = throughput(8e5, 8, 1.2535e9, 989e12)
    assert values["mfu"] == pytest.approx(1e5 * 1.2535e9 / 989e12)
    logger = MetricsLogger(tmp_path, 10, enabled=True, tensorboard=False, progress=True)
    logger.log(1, values)
    logger.print_progress(1, {"loss": 3.0, "tokens_per_s": 8e5, **values})
    logger.close()
    line = capsys.readouterr().out
    assert "tokens_per_s_per_gpu 100,000" in line and f"mfu {100 * values['mfu']:.1f}%" in line
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["mfu"] == values["mfu"]


# ---------------------------------------------------------------------- memory


def test_recompute_memory():
    shape = budget.ModelShape.from_model_config(load_config(D24).model, 32000)
    layout = budget.Layout()
    mem = {(backend, mode): budget.memory_per_gpu(shape, layout, micro_batch_size=4, attention_backend=backend,
                                                  recompute=budget.Recompute(mode))
           for backend in ("sdpa", "megatron_local") for mode in budget.RECOMPUTE}
    assert mem["sdpa", "selective"] == mem["sdpa", "none"]  # flash / SDPA keep no scores to free
    assert mem["megatron_local", "selective"].activations == pytest.approx(mem["sdpa", "selective"].activations)
    assert mem["megatron_local", "none"].activations > mem["megatron_local", "selective"].activations
    tokens, per_layer = 4 * 4096, budget.activation_bytes_per_token_layer(shape, layout, "bf16")
    full = 24 * 4 * 3072 * tokens + per_layer * tokens + tokens * 6 * 32000  # inputs, one layer again, logits
    assert mem["sdpa", "full"].activations == pytest.approx(full / 2**30)
    block = budget.stage_activation_bytes(shape, layout, "bf16", "sdpa", 24, budget.Recompute("full", "block", 6))
    assert block == (6 * 4 * 3072 + 18 * per_layer, per_layer)
    with pytest.raises(ValueError, match="recompute must be one of"):
        budget.Recompute("some")


@dataclasses.dataclass
class _ModelWithRecompute(ModelConfig):
    """ModelConfig with the recompute fields of issue 23 item 5 (added by another change)."""

    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1


def test_memory_fit_proposals():
    cfg = plan.config_at_depth(load_config(D24), 24, tp=1, pp=1, ep=1)
    run = derive(cfg, 1)
    assert run.memory.total > 0.9 * 80 and not memory_fit.fits(run, 80)
    layout = memory_fit.smallest_layout(cfg, 80, data=1)
    assert layout.overrides == {"parallel.tensor": 2, "parallel.sequence_parallel": True}
    assert layout.world_size == 2 and layout.memory_gib <= 72
    assert memory_fit.less_activation_memory(cfg, 80, 1).overrides == {"train.micro_batch_size": 1}
    # with the recompute field (at micro-batch 1, so only recompute is left): selective recompute first, which frees
    # Megatron's unfused attention scores but nothing under SDPA, where full recompute is the change that fits
    model = _ModelWithRecompute(**{f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model)})
    with_field = dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, micro_batch_size=1))
    assert memory_fit.less_activation_memory(with_field, 64, 1).overrides == {"model.recompute": "full"}
    unfused = dataclasses.replace(with_field, model=dataclasses.replace(model, attention_backend="megatron_local"))
    assert memory_fit.less_activation_memory(unfused, 80, 1).overrides == {"model.recompute": "selective"}
    # a fixed world size (a launched job): the data-parallel size follows, the distributed optimizer is proposed
    replicated = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, distributed_optimizer=False))
    fixed = memory_fit.smallest_layout(replicated, 40, world_size=8)
    assert fixed.world_size == 8 and fixed.overrides["parallel.distributed_optimizer"] is True
    assert memory_fit.smallest_layout(cfg, 1, data=1) is None


def test_trainer_refuses_a_run_that_does_not_fit_with_one_line(tmp_path):
    from hyperp_megatron.train import _check_before_model

    cfg = plan.config_at_depth(load_config(D24, [f"--logging.run_dir={tmp_path}"]), 24, tp=1, pp=1, ep=1)
    run, tokenizer = derive(cfg, 1), SimpleNamespace(vocab_size=32000)
    import torch.distributed as dist

    # the start decision after the memory check broadcasts its verdict: a one-rank gloo group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        _refusal_checks(cfg, run, tokenizer)
    finally:
        dist.destroy_process_group()


def _refusal_checks(cfg, run, tokenizer):
    from hyperp_megatron.train import _check_before_model

    with pytest.raises(ConfigError) as refused:
        _check_before_model(cfg, run, tokenizer, [], H100, 1)
    message = str(refused.value)
    assert "\n" not in message and f"estimated memory {run.memory.total:.1f} GiB" in message
    # one GPU: only the same-layout change; on 8 GPUs also the smallest layout (DP follows the world size)
    assert "fits: --train.micro_batch_size 1 (66.0 GiB) (" in message and "of NVIDIA H100 80GB HBM3" in message
    with pytest.raises(ConfigError, match=r"fits: --parallel.tensor 2 --parallel.sequence_parallel true \(\d+\.\d GiB\) "
                                          r"or --train.micro_batch_size 2"):
        _check_before_model(cfg, derive(cfg, 8), tokenizer, [], H100, 8)
    _check_before_model(cfg, run, tokenizer, [], None, 1)  # the CPU: not checked
    unchecked = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, memory_check=False))
    _check_before_model(unchecked, run, tokenizer, [], H100, 1)
    fits = plan.config_at_depth(cfg, 24, tp=2, pp=1, ep=1)
    _check_before_model(fits, derive(fits, 2), tokenizer, [], H100, 2)


def test_plan_checks_the_gpu_memory(capsys):
    assert plan.main(["--config", str(D24), "--tp", "1", "--gpu-memory", "80"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"\s+NO\s+1\s+1\s+1\s+1\s+0$", table.splitlines()[2])  # ..., fits, tp, pp, dp, ep, phantoms
    assert "# depth 24 does not fit" in table and "--parallel.tensor 2" in table
    assert plan.main(["--config", str(D24), "--gpu-memory", "80", "--dp", "32", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["fits"] is True and "proposals" not in row
    assert plan.main(["--config", str(D24), "--gpu-memory", "0"]) == 2


# ---------------------------------------------------------------------- vocabulary


def test_a_vocabulary_override_says_what_it_changes(capsys):
    cfg = load_config(D24, ["--model.vocab_size", "50304"])
    run = derive(cfg, 2, use_default_tokens=True)
    base = derive(load_config(D24), 2, use_default_tokens=True)
    assert run.at_base_vocab == {"vocab_size": 32000, "num_params": base.num_params, "tokens": base.tokens,
                                 "steps": base.steps, "lr": base.lr}
    line = vocab_change_line(run)
    assert f"peak LR {base.lr:.4g} -> {run.lr:.4g}" in line and f"steps {base.steps} -> {run.steps}" in line
    assert run.lr != base.lr and vocab_change_line(base) is None
    accepted = load_config(D24, ["--model.vocab_size", "50304", "--hyperp.base_vocab_size", "50304"])
    assert vocab_change_line(derive(accepted, 2)) is None
    assert plan.main(["--config", str(D24), "--model.vocab_size", "50304"]) == 0
    assert "# warning: vocabulary 50304 differs from hyperp.base_vocab_size 32000" in capsys.readouterr().out
