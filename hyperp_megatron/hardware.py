"""What a GPU can do, by its name: the dense bf16 peak that MFU is measured against, and the memory a plan
must fit (``hyperp-plan --gpu-memory``, the trainer's start-up check). Pure: the caller passes the device's
name and memory (``parallel.describe_gpu``); nothing here asks CUDA.

MFU convention (``budget.model_flops_per_token``, the trainer's progress line and ``metrics.jsonl``):

    MFU = tokens/s per GPU * model FLOPs per token / dense bf16 peak of the GPU

The peak is the spec sheet's dense (no 2:4 sparsity) bf16 tensor-core number, also for fp32 (TF32) and fp8
runs, so MFU compares runs on one scale; a GPU not in the table gets no MFU (and the reason says so).
"""

from __future__ import annotations

from dataclasses import dataclass

BF16_DENSE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    # Order matters: the first name fragment found in the device name wins ("GH200" before "H200",
    # "H100 PCIe" before "H100").
    ("GH200", 989.0),       # Grace Hopper superchip: the H100/H200 SXM tensor cores
    ("H200 NVL", 835.0),    # PCIe card, lower clocks and power
    ("H200", 989.0),        # SXM (141 GB HBM3e)
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),        # SXM (80 GB HBM3): "NVIDIA H100 80GB HBM3"
    ("H800", 989.0),
    ("B200", 2250.0),       # HGX B200 (1000 W)
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)
"""(fragment of ``torch.cuda.get_device_name``, dense bf16 peak in TFLOP/s from NVIDIA's data sheets)."""

MEMORY_HEADROOM = 0.9
"""A plan fits when its estimate is at most this fraction of the GPU's memory: the estimate
(``budget.memory_per_gpu``) leaves out the CUDA context, NCCL buffers and allocator fragmentation."""


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``device_name`` (TFLOP/s), or None when it is not in the table."""
    for fragment, tflops in BF16_DENSE_PEAK_TFLOPS:
        if fragment in device_name:
            return tflops
    return None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as the trainer and the tools describe it (``parallel.describe_gpu``)."""

    name: str
    memory_gib: float
    compute_capability: tuple[int, int]

    @property
    def peak_tflops(self) -> float | None:
        return bf16_peak_tflops(self.name)


def mfu_peak(gpu: GpuInfo | None) -> tuple[float | None, str]:
    """(peak FLOP/s per GPU for MFU, or None; a short phrase saying where it came from or why there is none)."""
    if gpu is None:
        return None, "no GPU: MFU is reported against a GPU's bf16 peak only"
    tflops = gpu.peak_tflops
    if tflops is None:
        return None, (f"no bf16 peak known for {gpu.name!r} (hardware.BF16_DENSE_PEAK_TFLOPS): "
                      "tokens/s only")
    return tflops * 1e12, f"{gpu.name}: dense bf16 peak {tflops:g} TFLOP/s"
