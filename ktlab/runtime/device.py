"""Accelerators: a real CUDA GPU through torch, or a simulated one from a named profile.

``make_accelerator("cuda")`` needs a CUDA GPU (torch.cuda); ``make_accelerator(
"simulated:rtx4090-24g")`` models one from its spec sheet (:data:`ktlab.sched.cost.PROFILES`):
its work is computed on the CPU so outputs are right, and its *time* comes from the cost
model, so every figure derived from it is labeled "simulated".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ktlab.sched.cost import PROFILES, GpuProfile, get_profile


@dataclass(frozen=True)
class Accelerator:
    """Where GPU-resident experts run: ``device`` for torch, ``profile`` for the cost model."""

    name: str
    device: torch.device
    profile: GpuProfile
    simulated: bool

    @property
    def label(self) -> str:
        """How figures derived from it are labeled ("simulated rtx4090-24g", "cuda H200")."""
        return f"simulated {self.profile.name}" if self.simulated else f"cuda {self.name}"


def make_accelerator(spec: str) -> Accelerator:
    """``cuda`` (a real GPU, measured) or ``simulated:PROFILE`` (one of the named profiles)."""
    if spec.startswith("simulated:") or spec in PROFILES:
        profile = get_profile(spec)
        return Accelerator(profile.name, torch.device("cpu"), profile, simulated=True)
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--accelerator cuda: no CUDA GPU is visible here (torch.cuda.is_available() is "
                             f"False); use simulated:PROFILE with one of {', '.join(PROFILES)}")
        return Accelerator(torch.cuda.get_device_name(0), torch.device("cuda"), measure_cuda_profile(), False)
    raise ValueError(f"unknown accelerator {spec!r}: use cuda or simulated:PROFILE ({', '.join(PROFILES)})")


def measure_cuda_profile(nbytes: int = 256 << 20) -> GpuProfile:  # pragma: no cover - needs a GPU
    """Measure the visible GPU: host-to-device copy rate (pinned), device memory bandwidth
    (a copy kernel) and VRAM; TFLOP/s from a bf16 matmul."""
    dev = torch.device("cuda")
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)

    def timed(fn, repeat: int = 5) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeat

    pcie = nbytes / timed(lambda: buf.copy_(host, non_blocking=True)) / 1e9
    other = torch.empty_like(buf)
    mem = 2 * nbytes / timed(lambda: other.copy_(buf)) / 1e9
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    tflops = 2 * 8192**3 / timed(lambda: a @ a) / 1e12
    vram = torch.cuda.get_device_properties(0).total_memory / 1e9
    return GpuProfile(f"measured {torch.cuda.get_device_name(0)}", vram, mem, tflops, pcie, mem_efficiency=1.0,
                      compute_efficiency=1.0)
