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
    from hyperp_megatron.data import prepare_embedded_corpus

    return prepare_embedded_corpus(os.path.join(REPO, "data"), 8192)
