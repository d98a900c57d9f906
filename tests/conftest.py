import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
