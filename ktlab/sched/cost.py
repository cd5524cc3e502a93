"""Cost model of hybrid MoE inference: CPU expert time, GPU expert time, PCIe transfers.

All times in seconds. One expert of ``expert_bytes`` bytes (gate + up + down as stored) and
``ops_per_token`` multiply-add ops (2 per MAC) per routed token:

- ``t_cpu(n)``: the CPU engine on n tokens: streaming the weights (memory-bound decode) plus
  the compute (prefill), ``bytes / bw + n * ops / rate``; plus ``call_overhead`` once per
  layer call (pool wake-up, Python). Calibrated on this machine by :func:`calibrate_cpu`
  (``bench-experts``-style timings, cached), or the defaults measured here (see docs).
- ``t_gpu(n)``: the accelerator: ``max(bytes / mem_bw, n * ops / flops) + launch``.
- ``t_pcie(bytes)``: host-to-device copies at the profile's PCIe rate plus a fixed latency.
- ``t_dense(n)``: the non-expert part of a layer (attention, norms, router) on the GPU.

GPU figures come from public spec sheets (see :data:`PROFILES`) scaled by achievable
efficiencies; every number derived from a profile is *simulated*, and says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class GpuProfile:
    """A GPU by its spec sheet: VRAM, memory bandwidth, dense bf16 tensor TFLOP/s, PCIe."""

    name: str
    vram_gb: float
    mem_gbps: float
    bf16_tflops: float
    pcie_gbps: float  # effective host-to-device copy rate (pinned memory), not the link's raw rate
    mem_efficiency: float = 0.8  # share of the spec bandwidth a streaming kernel reaches
    compute_efficiency: float = 0.6  # share of the spec TFLOP/s a grouped expert GEMM reaches
    launch_s: float = 8e-6  # per expert kernel launch (CUDA graphs make this smaller)
    pcie_latency_s: float = 10e-6  # per copy

    def __post_init__(self) -> None:
        for f in ("vram_gb", "mem_gbps", "bf16_tflops", "pcie_gbps"):
            if getattr(self, f) <= 0:
                raise ValueError(f"GpuProfile.{f} must be > 0, got {getattr(self, f)!r}")
        if not (0 < self.mem_efficiency <= 1 and 0 < self.compute_efficiency <= 1):
            raise ValueError("GpuProfile efficiencies must be in (0, 1]")

    @property
    def vram_bytes(self) -> float:
        """VRAM in bytes."""
        return self.vram_gb * GB


#: Public specs. Memory bandwidth and dense BF16/FP16 tensor TFLOP/s (no sparsity) from
#: NVIDIA's data sheets and architecture whitepapers: RTX 4090 (Ada whitepaper: 1008 GB/s,
#: 165 TFLOP/s FP16 tensor, FP16 accumulate), RTX 3090 (Ampere GA102 whitepaper: 936 GB/s,
#: 71 TFLOP/s), A100 80GB SXM (2039 GB/s, 312 TFLOP/s BF16), H100 80GB SXM (3350 GB/s, 989
#: TFLOP/s BF16), H200 (4800 GB/s, 989 TFLOP/s). PCIe: 4.0 x16 is 32 GB/s raw, ~25 GB/s
#: achieved for pinned host-to-device copies; 5.0 x16 64 GB/s raw, ~50 GB/s achieved.
PROFILES: dict[str, GpuProfile] = {
    "rtx3090-24g": GpuProfile("rtx3090-24g", 24, 936, 71, 25),
    "rtx4090-24g": GpuProfile("rtx4090-24g", 24, 1008, 165, 25),
    "a100-80g": GpuProfile("a100-80g", 80, 2039, 312, 25),
    "h100-80g": GpuProfile("h100-80g", 80, 3350, 989, 50),
    "h200-141g": GpuProfile("h200-141g", 141, 4800, 989, 50),
}


def get_profile(name: str) -> GpuProfile:
    """A profile by name (``simulated:`` prefix allowed)."""
    key = name.removeprefix("simulated:")
    if key not in PROFILES:
        raise ValueError(f"unknown accelerator profile {name!r}; one of {', '.join(PROFILES)}")
    return PROFILES[key]


@dataclass(frozen=True)
class CpuCost:
    """The CPU expert engine's speed for one expert shape and format on this machine."""

    bandwidth_gbps: float  # effective weight streaming rate
    gops: float  # effective compute rate on grouped tokens
    call_overhead_s: float = 30e-6
    source: str = "default"  # "default" or what calibrated it

    def __post_init__(self) -> None:
        if self.bandwidth_gbps <= 0 or self.gops <= 0 or self.call_overhead_s < 0:
            raise ValueError(f"CpuCost needs positive rates and overhead >= 0, got {self}")


#: Measured on the development box (2 cores, AVX-512; docs/benchmarks.md, bench-experts
#: Q8_0 30B-A3B rows): decode streams about 26 GB/s of weights, prefill reaches about 480 GOP/s.
DEFAULT_CPU = CpuCost(bandwidth_gbps=26.0, gops=480.0, call_overhead_s=30e-6)


@dataclass(frozen=True)
class ExpertCost:
    """Everything the scheduler needs to price one expert of a model on a machine + GPU."""

    expert_bytes: int
    ops_per_token: float
    cpu: CpuCost
    gpu: GpuProfile
    dense_bytes: int = 0  # non-expert weights of one layer (attention, router, norms)
    dense_ops_per_token: float = 0.0

    @classmethod
    def for_shape(cls, hidden: int, inter: int, bytes_per_weight: float, gpu: GpuProfile,
                  cpu: CpuCost = DEFAULT_CPU, dense_params: int = 0) -> ExpertCost:
        """From an expert shape (H, I) and storage (bytes per weight: Q8_0 = 34/32)."""
        params = 3 * hidden * inter
        return cls(int(params * bytes_per_weight), 2.0 * params, cpu, gpu, int(dense_params * bytes_per_weight),
                   2.0 * dense_params)

    @classmethod
    def for_model(cls, cfg, expert_bytes: int, gpu: GpuProfile, cpu: CpuCost = DEFAULT_CPU) -> ExpertCost:
        """For a loaded model (``cfg``: a ModelConfig) whose experts take ``expert_bytes`` each.
        The dense part of a layer is everything a token reads besides routed experts, always on
        the GPU and stored like the experts: the attention projections of every layer, the shared
        experts, the MLPs of leading dense layers, spread over the MoE layers (the per-layer unit
        of the schedule)."""
        per_weight = expert_bytes / cfg.expert_params
        dense_params = (cfg.num_layers * cfg.attention_params + cfg.num_moe_layers * cfg.shared_expert_params
                        + cfg.first_dense_layers * 3 * cfg.hidden_size * cfg.intermediate_size) / cfg.num_moe_layers
        return cls(expert_bytes, 2.0 * cfg.expert_params, cpu, gpu, int(dense_params * per_weight), 2.0 * dense_params)

    def t_cpu(self, n: int) -> float:
        """One expert on the CPU for n tokens (without the per-call overhead)."""
        return self.expert_bytes / (self.cpu.bandwidth_gbps * GB) + n * self.ops_per_token / (self.cpu.gops * GB)

    def t_gpu(self, n: int) -> float:
        """One resident expert on the GPU for n tokens."""
        g = self.gpu
        mem = self.expert_bytes / (g.mem_gbps * g.mem_efficiency * GB)
        compute = n * self.ops_per_token / (g.bf16_tflops * g.compute_efficiency * 1e12)
        return max(mem, compute) + g.launch_s

    def t_pcie(self, nbytes: float | None = None) -> float:
        """Copy ``nbytes`` (default: one expert) host to device."""
        nbytes = self.expert_bytes if nbytes is None else nbytes
        return nbytes / (self.gpu.pcie_gbps * GB) + self.gpu.pcie_latency_s

    def t_dense(self, n: int) -> float:
        """The non-expert part of one layer for n tokens on the GPU (a few launches)."""
        g = self.gpu
        mem = self.dense_bytes / (g.mem_gbps * g.mem_efficiency * GB)
        compute = n * self.dense_ops_per_token / (g.bf16_tflops * g.compute_efficiency * 1e12)
        return max(mem, compute) + 6 * g.launch_s

    def saving(self, n: int = 1) -> float:
        """Time one use of a resident expert saves over running it on the CPU."""
        return max(0.0, self.t_cpu(n) - self.t_gpu(n))

    def with_cpu(self, cpu: CpuCost) -> ExpertCost:
        """The same costs with another CPU model."""
        return replace(self, cpu=cpu)


# ---- calibration -----------------------------------------------------------------------------


def _cache_path(shape: str, fmt: str, isa: str, threads: int) -> Path:
    root = Path(os.environ.get("KTLAB_CACHE", Path.home() / ".cache" / "ktlab"))
    return root / f"cpu-cost-{shape}-{fmt}-{isa}-{threads}t.json"


def fit_cpu_cost(rows: list[tuple[int, float]], expert_bytes: int, ops_per_token: float, experts: int,
                 top_k: int, source: str) -> CpuCost:
    """Fit ``t(T) = c0 + u(T) * bytes / bw + T * k * ops / rate`` to (T, seconds) layer timings
    under uniform routing, u(T) = E (1 - (1 - k/E)^T) experts touched; least squares, >= 0."""
    import numpy as np

    a = np.array([[1.0, experts * (1 - (1 - top_k / experts) ** t) * expert_bytes, t * top_k * ops_per_token]
                  for t, _ in rows])
    b = np.array([s for _, s in rows])
    scale = a.max(axis=0)
    coef, *_ = np.linalg.lstsq(a / scale, b, rcond=None)
    coef = np.maximum(coef / scale, [0.0, 1e-15, 1e-15])
    return CpuCost(bandwidth_gbps=1.0 / coef[1] / GB, gops=1.0 / coef[2] / GB, call_overhead_s=float(coef[0]),
                   source=source)


def calibrate_cpu(shape: str = "30b-a3b", fmt: str = "q8_0", isa: str | None = None, threads: int | None = None,
                  refresh: bool = False, progress: bool = False) -> CpuCost:
    """Time the C++ engine on ``shape``/``fmt`` at T in {1, 4, 16, 64, 512} and fit a
    :class:`CpuCost`; cached per (shape, format, ISA, threads) under ``~/.cache/ktlab``
    (``KTLAB_CACHE``), so later calls are instant. ``refresh`` re-measures."""
    from ktlab.benchmarks.experts import SHAPES, BenchConfig, run_bench
    from ktlab.kernels import default_threads, resolve_isa

    isa = resolve_isa(isa)
    threads = threads or default_threads()
    path = _cache_path(shape, fmt, isa, threads)
    if path.exists() and not refresh:
        try:
            return CpuCost(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            pass  # a stale or broken cache file: measure again
    config = BenchConfig(shapes=(shape,), formats=(fmt,), isas=(isa,), tokens=(1, 4, 16, 64, 512), threads=threads,
                         baselines=False, repeat=3, min_time=0.05, retries=0, bandwidth_passes=2, peak_seconds=0.02)
    report = run_bench(config, progress=progress)
    s = SHAPES[shape]
    ktlab_rows = [r for r in report.rows if r.engine == "ktlab"]
    if not ktlab_rows:
        raise ValueError(f"calibration measured nothing for {shape} {fmt} on {isa} (see bench-experts)")
    rows = [(r.tokens, r.ms / 1e3) for r in ktlab_rows]
    bytes_per_expert = next(r.bytes_read for r in ktlab_rows if r.tokens == 1) / s.top_k
    cost = fit_cpu_cost(rows, int(bytes_per_expert), s.ops(1) / s.top_k, s.experts, s.top_k,
                        source=f"calibrated: {shape} {fmt} {isa} {threads} threads")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(cost), indent=2))
    return cost


def describe(cost: ExpertCost) -> str:
    """One line: the costs of one expert at T=1 (simulated GPU figures say so)."""
    return (f"expert {cost.expert_bytes / 1e6:.2f} MB: cpu {cost.t_cpu(1) * 1e3:.3f} ms "
            f"({cost.cpu.source}), gpu {cost.t_gpu(1) * 1e6:.1f} us (simulated {cost.gpu.name}), "
            f"pcie {cost.t_pcie() * 1e3:.3f} ms (simulated)")

