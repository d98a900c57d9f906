"""Index of the negative controls: every mutation in ``tests/mutants.py`` is applied by a test that
asserts its check fails on it (and passes the real code).

| property | mutation | control test |
|---|---|---|
| resume actually resumes | resume_restarts_from_step_0 | test_resilience.py (kill -9, sphere Muon) |
| the sphere radius is the whole matrix's | sphere_radius_per_shard | test_sphere_muon_dist.py, test_sphere_trainer.py |
| data-parallel gradients are all-reduced | dp_grad_sync_skips_embedding_and_output | test_sphere_trainer.py |
| Newton-Schulz is TP-invariant | newton_schulz_per_shard | test_sphere_trainer.py (+ blockwise NS, raw shards) |
| MoE load statistics are global | moe_load_statistics_local | test_moe.py |
| sequence-parallel norm gradients are reduced | sequence_parallel_norm_grads_not_reduced | test_trunk_parallel.py |
| resharding loads the optimizer state | reshard_without_optimizer_state | test_trunk_parallel.py, test_sphere_trainer.py |
| the monitors' TP / EP / DP reductions | monitor_reductions_skipped | test_monitors.py |
| phantom experts are never routed | phantom_experts_routable | test_expert_padding.py |
| checkpoints load across expert kinds | sequential_experts_save_empty_extra_state | test_experts_checkpoint.py |
| a resume across expert kinds puts each expert in place | experts_checkpoint_permuted | test_experts_checkpoint.py |

Other controls live beside their features without a mutation: blockwise Newton-Schulz on raw shards,
standard parameterization (coordinate check, softmax scale), plain gates (MoE RMS).
"""

import os
import re

import pytest

from mutants import MUTATIONS

pytestmark = pytest.mark.tier("unit")

TESTS = os.path.dirname(os.path.abspath(__file__))


def _sources() -> dict[str, str]:
    return {name: open(os.path.join(TESTS, name)).read() for name in os.listdir(TESTS)
            if name.startswith("test_") and name.endswith(".py") and name != "test_controls.py"}


def test_every_mutation_has_a_control_test():
    sources = _sources()
    for mutation in MUTATIONS:
        users = [name for name, text in sources.items() if f'"{mutation}"' in text]
        assert users, f"mutation {mutation!r} is applied by no test"
        assert any(re.search(r"def test_\w*control\w*", sources[name]) for name in users), (mutation, users)


def test_index_lists_every_mutation():
    assert {row for row in re.findall(r"\| (\w+) \| test_", __doc__)} == set(MUTATIONS)
