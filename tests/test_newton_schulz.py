"""Newton-Schulz (NS5) properties on one process; the tensor-parallel modes are in test_sphere_muon_dist."""

import pytest
import torch

from hyperp_megatron.optim.newton_schulz import (
    NS5_COEFFICIENTS,
    _quintic_iterations,
    newton_schulz5,
    orthogonalize,
    supports_distributed_mode,
)

pytestmark = [pytest.mark.tier("unit"), pytest.mark.usefixtures("one_thread")]

BAND = (0.7, 1.2)


def _matrix_with_spectrum(rows: int, cols: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=generator))
    return left @ torch.diag(singular_values) @ right.T


def test_scalar_map_sends_every_singular_value_above_threshold_into_band():
    # NS acts on each singular value of X / ||X|| through the same odd quintic polynomials.
    normalized = torch.logspace(-2.8, 0, 4000, dtype=torch.float64)  # 1.6e-3 .. 1
    values = normalized.clone()
    for a, b, c in NS5_COEFFICIENTS:
        values = a * values + b * values**3 + c * values**5
    assert BAND[0] <= values.min().item() and values.max().item() <= BAND[1]


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 128), (128, 64), (48, 48)])
def test_singular_values_of_random_matrices_in_band(shape):
    torch.manual_seed(0)
    if shape[0] == shape[1]:
        # A square Gaussian has singular values near 0 (below the 1.6e-3 threshold after
        # normalization), so the square case uses a spectrum spanning two decades instead.
        update = _matrix_with_spectrum(*shape, torch.logspace(-2, 0, shape[0]), seed=1)
    else:
        update = torch.randn(shape)
    singular_values = torch.linalg.svdvals(newton_schulz5(update))
    assert singular_values.min() >= BAND[0] and singular_values.max() <= BAND[1]


def test_tall_input_is_transposed_to_wide():
    update = torch.randn(80, 24)
    torch.testing.assert_close(newton_schulz5(update), newton_schulz5(update.T).T, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_iterations_run_row_major_on_a_transposed_view(dtype):
    """A tall stack arrives as a transposed (column-major) view: the iterations must still write row-major
    buffers. Writing a bf16 batched GEMM into a transposed output takes oneDNN's reference kernel on the
    CPU (a batched bf16 step of the 32 matrices of bench/sphere_muon_bench.py took 311 s)."""
    tall = torch.randn(3, 96, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = _quintic_iterations(tall.mT)
    assert out.is_contiguous(), out.stride()
    torch.testing.assert_close(out.float(), newton_schulz5(tall.float()).mT, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-6)


def test_batched_equals_loop():
    torch.manual_seed(0)
    batch = torch.randn(5, 24, 40)
    batched = newton_schulz5(batch)
    looped = torch.stack([newton_schulz5(matrix) for matrix in batch])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
    assert batched.shape == batch.shape


def test_scale_invariance_and_zero_input():
    torch.manual_seed(0)
    update = torch.randn(16, 48)
    torch.testing.assert_close(newton_schulz5(update), newton_schulz5(1e3 * update), rtol=1e-4, atol=1e-5)
    zero = newton_schulz5(torch.zeros(8, 8))
    assert torch.equal(zero, torch.zeros(8, 8))


def test_bf16_compute_close_to_fp32():
    torch.manual_seed(0)
    update = torch.randn(32, 96)
    fp32 = newton_schulz5(update)
    bf16 = newton_schulz5(update, compute_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32  # the output keeps the input dtype
    assert (bf16 - fp32).norm() / fp32.norm() < 5e-2
    singular_values = torch.linalg.svdvals(bf16)
    assert singular_values.min() >= 0.6 and singular_values.max() <= 1.3


def test_orthogonalize_without_group_is_newton_schulz5():
    update = torch.randn(3, 16, 24)
    for mode in ("gather", "distributed", "blockwise"):
        assert torch.equal(orthogonalize(update, mode=mode, partition_dim=0), newton_schulz5(update))


def test_supports_distributed_mode_needs_the_long_side_sharded():
    assert supports_distributed_mode((64, 32), partition_dim=0)
    assert not supports_distributed_mode((64, 32), partition_dim=1)
    assert supports_distributed_mode((32, 64), partition_dim=1)
    assert supports_distributed_mode((32, 32), partition_dim=0)


def test_invalid_inputs_raise_value_error():
    with pytest.raises(ValueError, match="expects"):
        newton_schulz5(torch.randn(8))
    with pytest.raises(ValueError, match="mode"):
        orthogonalize(torch.randn(4, 4), mode="duplicated")
    with pytest.raises(ValueError, match="partition_dim"):
        orthogonalize(torch.randn(4, 4), partition_dim=2)
