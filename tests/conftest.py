"""Shared fixtures, and the test tiers.

Every test belongs to exactly one tier, named by ``pytest.mark.tier(...)``: per module (``pytestmark``), and a
test may name another. The closest one counts, and becomes the plain marker that ``-m`` selects:

- ``unit``: one process, seconds each;
- ``parallel``: multi-process gloo runs (``_dist.run_distributed``) against a single-process reference;
- ``system``: real torchrun / SLURM / MPI jobs, trainers in subprocesses, long end-to-end runs.

``pytest -m "not system"`` is the quick suite; ``pytest tests`` (``.ci/run``) runs every tier. A test without a
tier fails collection, so a new test file cannot escape its tier.
"""

import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TIERS = ("unit", "parallel", "system")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers added here
def pytest_collection_modifyitems(config, items):
    unassigned, wrong = set(), set()
    for item in items:
        direct = [name for name in TIERS if item.get_closest_marker(name) is not None]
        tier = item.get_closest_marker("tier")
        if direct:
            wrong.add(f"{item.nodeid}: uses pytest.mark.{direct[0]} directly (name the tier with pytest.mark.tier)")
        elif tier is None:
            unassigned.add(item.location[0])
        elif len(tier.args) != 1 or tier.args[0] not in TIERS:
            wrong.add(f"{item.nodeid}: pytest.mark.tier({', '.join(map(repr, tier.args))}) names no tier of {TIERS}")
        else:
            item.add_marker(tier.args[0])
    if unassigned or wrong:
        lines = [f"{path}: no tier (add pytestmark = pytest.mark.tier('unit' | 'parallel' | 'system'))"
                 for path in sorted(unassigned)] + sorted(wrong)
        raise pytest.UsageError("test tiers (tests/conftest.py):\n  " + "\n  ".join(lines))


@pytest.fixture
def one_thread():
    """One torch thread for the test: small matrices only spin on a shared 2-core machine, and the thread
    count changes Newton-Schulz's rounding."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def embedded_corpus():
    """The embedded corpus in the repo's data/ cache (prepared once, idempotent)."""
    from hyperp_megatron.data.corpus import prepare_embedded_corpus

    return prepare_embedded_corpus(os.path.join(REPO, "data"), 8192)


@pytest.fixture(scope="module")
def pg_collection():
    """A gloo world of one process and Megatron's parallel state, in this process."""
    import torch.distributed as dist

    from _dist import free_port
    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import ParallelConfig
    from hyperp_megatron.parallel import init_model_parallel

    apply_cpu_patches()
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield init_model_parallel(ParallelConfig(), seed=1234)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


MEASURED_OUT = "HYPERP_MEASURED_OUT"
"""Environment variable: a JSON file to write the numbers recorded through ``measured`` into (set by
``bench/parity.py``; unset, the numbers are only asserted)."""


@pytest.fixture(scope="session")
def measured():
    """``measured(section, name, value)``: record a measured number (a parity maximum, a control's
    error) next to the assertion on it; written to ``$HYPERP_MEASURED_OUT`` at the end of the session."""
    records: dict[str, dict] = {}

    def record(section: str, name: str, value) -> None:
        records.setdefault(section, {})[name] = value

    yield record
    path = os.environ.get(MEASURED_OUT)
    if path and records:
        with open(path, "w") as handle:
            json.dump(records, handle, indent=1, sort_keys=True)
