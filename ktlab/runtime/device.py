"""Accelerators: a real CUDA GPU through torch, the CPU standing in for one, or a simulated one.

``make_accelerator("cuda")`` needs a CUDA GPU (torch.cuda); ``make_accelerator("torch:cpu")``
runs the very code a GPU runs (the dense part and the resident experts as plain torch on
``device``) on the CPU, so the device half is tested anywhere: its figures are measured and
labeled "torch:cpu", never passed off as a GPU's. ``make_accelerator("simulated:rtx4090-24g")``
models a GPU from its spec sheet (:data:`ktlab.sched.cost.PROFILES`): its work is computed by the
CPU's C++ engine so outputs are right, and its *time* comes from the cost model, so every figure
derived from it is labeled "simulated".
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
        """How figures derived from it are labeled ("simulated rtx4090-24g", "cuda H200",
        "torch:cpu (the CPU as the device)")."""
        if self.simulated:
            return f"simulated {self.profile.name}"
        return "torch:cpu (the CPU as the device)" if self.device.type == "cpu" else f"cuda {self.name}"

    @property
    def runs_dense(self) -> bool:
        """Whether the model's dense part and KV cache live on ``device`` (every real accelerator;
        a simulated one prices GPU work, the model stays on the CPU)."""
        return not self.simulated


#: Accelerator specs beside ``simulated:PROFILE``.
REAL_ACCELERATORS = ("cuda", "torch:cpu")


def make_accelerator(spec: str) -> Accelerator:
    """``cuda`` (a real GPU, measured), ``torch:cpu`` (the CPU running the device code, measured) or
    ``simulated:PROFILE`` (one of the named profiles)."""
    if spec.startswith("simulated:") or spec in PROFILES:
        profile = get_profile(spec)
        return Accelerator(profile.name, torch.device("cpu"), profile, simulated=True)
    if spec == "torch:cpu":
        return Accelerator("torch:cpu", torch.device("cpu"), measure_cpu_as_device(), simulated=False)
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--accelerator cuda: no CUDA GPU is visible here (torch.cuda.is_available() is "
                             f"False); use simulated:PROFILE with one of {', '.join(PROFILES)}")
        return Accelerator(torch.cuda.get_device_name(0), torch.device("cuda"), measure_cuda_profile(), False)
    raise ValueError(f"unknown accelerator {spec!r}: use cuda, torch:cpu or simulated:PROFILE "
                     f"({', '.join(PROFILES)})")


def measure_cpu_as_device(nbytes: int = 32 << 20, vram_gb: float = 8.0) -> GpuProfile:
    """A profile of the CPU as ``torch:cpu``'s device, measured in a fraction of a second: its copy
    rate stands for PCIe and for memory bandwidth, a float32 matmul for the TFLOP/s; ``vram_gb``
    is nominal (the budget flags set what the device may hold)."""
    import time

    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def best(fn, repeat: int = 3) -> float:
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    copy_gbps = nbytes / best(lambda: dst.copy_(src)) / 1e9
    a = torch.randn(512, 512)
    tflops = 2 * 512**3 / best(lambda: a @ a) / 1e12
    return GpuProfile("measured torch:cpu", vram_gb, 2 * copy_gbps, tflops, copy_gbps, mem_efficiency=1.0,
                      compute_efficiency=1.0, launch_s=2e-6, pcie_latency_s=2e-6)


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
