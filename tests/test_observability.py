"""The optional sinks beside metrics.jsonl / TensorBoard: Weights & Biases (``logging.wandb_project``, offline
mode) and the profiler hook (``train.profile_steps``), with real trainer runs on the CPU.

- profiler: a 4-step run profiling steps 2-3 writes ``profile/trace_rank0.json``, a Chrome trace whose
  ``step N`` ranges are exactly steps 2 and 3; bad ranges are refused in one line;
- W&B: a run in offline mode writes its run under ``<run_dir>/wandb`` (the run's files, the logged loss in the
  summary equal to the last metrics.jsonl loss, the config attached); without wandb installed a run that asks for
  it is refused at start-up (the import is hidden), and one that does not ask never imports it.
"""

import json
import subprocess
import sys

import pytest

from _dist import run_distributed
from trainer_utils import REPO, TINY, merge, train_worker

pytestmark = pytest.mark.tier("parallel")


@pytest.mark.tier("unit")
@pytest.mark.parametrize("text, window", [("5-7", (5, 7)), ("3", (3, 3)), ("1-1", (1, 1))])
def test_parse_profile_steps(text, window):
    from hyperp_megatron.profiling import parse_profile_steps

    assert parse_profile_steps(text) == window


@pytest.mark.tier("unit")
@pytest.mark.parametrize("text", ["0-2", "7-5", "a-b", "1-2-3", "", "-3"])
def test_profile_steps_refused(text):
    from hyperp_megatron.config import TrainConfig

    with pytest.raises(ValueError, match="train.profile_steps must be 'first-last' or one step"):
        TrainConfig(profile_steps=text)


def _train(rank, world_size, overrides):
    return train_worker(rank, world_size, overrides)


def test_profiler_trace_names_the_steps(tmp_path):
    run_distributed(_train, 1, {"train": {"profile_steps": "2-3"}, "logging": {"run_dir": str(tmp_path)}})
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"step 2", "step 3"} <= names and not {"step 1", "step 4"} & names
    steps = [e for e in trace["traceEvents"] if str(e.get("name")).startswith("step ")]
    assert all(e.get("dur", 0) > 0 for e in steps)
    # the optimizer step's work is inside the profiled ranges (aten ops recorded)
    assert any(str(e.get("name")).startswith("aten::") for e in trace["traceEvents"])


# ----------------------------------------------------------------------------------------------
# Weights & Biases


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in the test extra (pyproject.toml); install it to run this test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # logging.wandb_mode decides (default offline)
    run_distributed(_train, 1, {"logging": {"run_dir": str(tmp_path), "wandb_project": "hyperp-test"}})
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (records,) = run.glob("run-*.wandb")  # wandb's record log (protobuf; its strings are stored as they are)
    data = records.read_bytes()
    assert data.startswith(b":W&B")
    # every step's loss (JSON-encoded floats, as in metrics.jsonl) and the run's config
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        loss = json.loads(line).get("loss")
        if loss is not None:
            assert json.dumps(loss).encode() in data, loss
    assert b"hyperp-test" in data and b"wandb_project" in data and tmp_path.name.encode() in data


_HIDE_WANDB = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
import importlib.util
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "wandb" else _find_spec(name, *a)
"""


def test_wandb_refused_without_the_package(tmp_path):
    """Asked for and not installed: one error line before any model is built (exit 2)."""
    code = _HIDE_WANDB + (
        "from hyperp_megatron.config import load_config, validate\n"
        "try:\n"
        f"    validate(load_config(None, {{'logging': {{'wandb_project': 'p', 'run_dir': {str(tmp_path)!r}}}}}), 1)\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
        "validate(load_config(None, {'logging': {'wandb_project': 'p', 'wandb_mode': 'disabled'}}), 1)\n"
        "validate(load_config(None, {}), 1)\n"
        "print('wandb' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == ("refused: logging.wandb_project is set but wandb is not installed: pip install wandb (the "
                        "package's [wandb] extra), or unset logging.wandb_project")
    assert lines[-1] == "False"


@pytest.mark.tier("unit")
def test_wandb_settings_checked():
    from hyperp_megatron.config import LoggingConfig

    with pytest.raises(ValueError, match="logging.wandb_mode must be one of offline, online, disabled"):
        LoggingConfig(wandb_mode="cloud")
    with pytest.raises(ValueError, match="logging.wandb_project must be a non-empty project name"):
        LoggingConfig(wandb_project=" ")
