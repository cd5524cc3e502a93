"""``ktlab bench-experts``: the CPU expert kernels against this machine's limits and rivals.

For each layer shape, weight format, ISA path and token count T, one fused MoE layer call
(:meth:`ktlab.kernels.CpuExperts.forward`) is timed on random weights and random routing
(k distinct experts per token, uniform, a fresh routing every call so the weights come from
memory as in a real decode, not from the cache of the previous call). Reported per row:

- ``ms``: median time per call (at least ``repeat`` calls and ``min_time`` seconds; one
  warm-up call first);
- ``GB/s``: weight bytes actually read (unique experts touched x bytes per expert) / time;
- ``GOP/s``: ``2 * 3 * H * I * T * k`` / time (each of the T*k routed slots runs three
  H x I matrix-vector products);
- ``%BW``: GB/s as a share of the read bandwidth measured by the command itself
  (:func:`ktlab.benchmarks.machine.measure_read_bandwidth`): the measure for decode;
- ``%peak``: GOP/s as a share of the measured peak of the path's instructions for the format
  (:func:`ktlab.benchmarks.machine.measure_peak`, int8 for the integer formats, bf16 or fp32
  for BF16): the measure for prefill;
- ``other``: CPU cores that other processes kept busy while the row was timed (Linux
  /proc/stat minus this process), so rows measured on a shared, busy machine show as such.

Side by side, on the same shapes, routings and threads: torch (per-expert
``torch.nn.functional.linear`` in bf16, grouped by expert like Hugging Face's MoE loop, and
int8 through ``torch._int_mm`` with per-row weight and per-token activation scales) and,
when the ``kt_kernel`` package imports, KTransformers' own AMX/AVX-512 MoE (``AMXInt8_MOE``,
``AMXBF16_MOE`` of ``kt_kernel_ext``). Baselines that cannot run are skipped with a note.

Random weights: ``DISTINCT_EXPERTS`` experts are drawn (seeded) and quantized once per shape and
format, then copied to fill all E experts (each copy its own memory, so every expert's bytes
are really read; quantizing 128 experts of the 30B shape to Q4_K in numpy would take minutes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ktlab.benchmarks import machine

__all__ = [
    "BenchConfig",
    "BenchReport",
    "BenchRow",
    "DEFAULT_TOKENS",
    "DISTINCT_EXPERTS",
    "ExpertShape",
    "FORMATS",
    "SCALAR_TOKENS",
    "SHAPES",
    "run_bench",
]


@dataclass(frozen=True)
class ExpertShape:
    """One MoE layer's expert shape: hidden size H, expert inter size I, E experts, top-k."""

    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int

    def ops(self, tokens: int) -> float:
        """Multiply-add ops (2 per MAC) of one layer call on ``tokens`` tokens."""
        return 2.0 * 3 * self.hidden * self.inter * tokens * self.top_k


#: The shapes the benchmark knows: real Qwen3-30B-A3B and gpt-oss-20b layers and the bundled tiny model's
#: (by default the first and the last).
SHAPES: dict[str, ExpertShape] = {
    "30b-a3b": ExpertShape("30b-a3b", hidden=2048, inter=768, experts=128, top_k=8),
    "gpt-oss-20b": ExpertShape("gpt-oss-20b", hidden=2880, inter=2880, experts=32, top_k=4),
    "tiny": ExpertShape("tiny", hidden=256, inter=64, experts=64, top_k=4),
}
#: ktlab weight formats benchmarked (GGUF names, lower case). The mixes are a Q4_K_M / Q5_K_M file's
#: expert layers where llama.cpp's rule gives the down projection more bits: gate and up Q4_K (Q5_K),
#: down Q6_K.
FORMATS: tuple[str, ...] = ("q8_0", "q4_k", "q5_k", "q6_k", "bf16", "mxfp4", "q4_k_m", "q5_k_m")
#: (gate/up, down) GGUF types of each benchmarked format.
FORMAT_QTYPES: dict[str, tuple[str, str]] = {
    **{f: (f.upper(), f.upper()) for f in ("q8_0", "q4_k", "q5_k", "q6_k", "bf16", "mxfp4")},
    "q4_k_m": ("Q4_K", "Q6_K"),
    "q5_k_m": ("Q5_K", "Q6_K"),
}
#: Token counts T per call: decode (1) to a prefill chunk (512).
DEFAULT_TOKENS: tuple[int, ...] = (1, 4, 16, 64, 512)
#: The scalar path is slow: it runs only these T.
SCALAR_TOKENS: frozenset[int] = frozenset({1, 4})
#: Distinct random experts per shape; the others are copies of them (see the module doc).
DISTINCT_EXPERTS = 16
#: Rows measured while other processes used more than this many cores are marked noisy.
BUSY_OTHER = 0.1
#: Calls timed per row at most.
_MAX_CALLS = 10_000
#: Baseline engines: (engine name, format label, what it needs).
_BASELINES: tuple[tuple[str, str], ...] = (
    ("torch", "bf16"),
    ("torch", "int8"),
    ("kt-kernel", "int8"),
    ("kt-kernel", "bf16"),
)


def _csv(value: str | Sequence[Any] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out = tuple(v.strip().lower() for v in items if str(v).strip())
    if not out:
        raise ValueError("an empty list was given")
    return out


@dataclass(frozen=True)
class BenchConfig:
    """What ``ktlab bench-experts`` runs; validated on construction (``ValueError``).

    Lists may be given as comma-separated strings. ``isas=None``: every path available here;
    ``threads=None``: :func:`ktlab.kernels.default_threads`. ``retries``: times a row is
    measured again while other processes keep more than ``BUSY_OTHER`` cores busy (the
    quietest measurement is kept).
    """

    shapes: tuple[str, ...] = ("30b-a3b", "tiny")
    formats: tuple[str, ...] = FORMATS
    isas: tuple[str, ...] | None = None
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    threads: int | None = None
    repeat: int = 5
    min_time: float = 0.3
    baselines: bool = True
    seed: int = 0
    peak_seconds: float = 0.1
    bandwidth_passes: int = 5
    retries: int = 2

    def __post_init__(self) -> None:
        from ktlab.kernels import ISA_NAMES, available_isas, default_threads, resolve_isa

        shapes = _csv(self.shapes)
        for s in shapes:
            if s not in SHAPES:
                raise ValueError(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
        formats = _csv(self.formats)
        for f in formats:
            if f not in FORMATS:
                raise ValueError(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
        isas = _csv(self.isas)
        if isas is None:
            isas = tuple(available_isas())
        for i in isas:
            if i not in ISA_NAMES:
                raise ValueError(f"unknown ISA path {i!r}; choose from {', '.join(ISA_NAMES)}")
            resolve_isa(i)  # unavailable here: ValueError naming the CPU's features
        try:
            tokens = tuple(int(t) for t in _csv(self.tokens))
        except ValueError:
            raise ValueError(f"tokens must be positive integers, got {self.tokens!r}") from None
        if any(t < 1 for t in tokens):
            raise ValueError(f"tokens must be positive integers, got {self.tokens!r}")
        threads = default_threads() if self.threads is None else self.threads
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if self.repeat < 1 or self.min_time < 0 or self.peak_seconds <= 0 or self.bandwidth_passes < 1:
            raise ValueError("repeat and bandwidth_passes must be >= 1, min_time >= 0, peak_seconds > 0")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        for name, value in (("shapes", shapes), ("formats", formats), ("isas", isas), ("tokens", tokens)):
            object.__setattr__(self, name, tuple(dict.fromkeys(value)))  # drop duplicates, keep order
        object.__setattr__(self, "threads", threads)

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A fast subset for tests and smoke runs: tiny shape, T in {1, 16}, short timings."""
        values: dict[str, Any] = {
            "shapes": ("tiny",), "tokens": (1, 16), "repeat": 3, "min_time": 0.02,
            "peak_seconds": 0.02, "bandwidth_passes": 2, "retries": 0,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def tokens_for(self, isa: str) -> tuple[int, ...]:
        """The T values a path runs (the scalar path only the small ones)."""
        if isa == "scalar":
            return tuple(t for t in self.tokens if t in SCALAR_TOKENS)
        return self.tokens


@dataclass
class BenchRow:
    """One measurement: a shape, format and engine (ISA path) at T tokens per call."""

    shape: str
    format: str
    engine: str
    isa: str
    tokens: int
    ms: float
    calls: int
    bytes_read: float
    gbps: float
    gops: float
    pct_bandwidth: float
    pct_peak: float | None
    peak_kind: str | None
    peak_isa: str | None
    #: CPU cores other processes kept busy meanwhile, on average (None: unknown). Rows where
    #: it is above ``BUSY_OTHER`` were measured on a shared, busy machine: noisy.
    other_cpu: float | None = None


@dataclass
class BenchReport:
    """Everything one run measured: machine limits, rows, and notes on what was skipped."""

    config: BenchConfig
    machine: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``ktlab_version``, ``machine``, ``config``, ``results``, ``notes``."""
        import ktlab

        config = dataclasses.asdict(self.config)
        return {
            "ktlab_version": ktlab.__version__,
            "machine": self.machine,
            "config": config,
            "results": [dataclasses.asdict(r) for r in self.rows],
            "notes": list(self.notes),
        }

    def format_table(self) -> str:
        """The rows as a plain-text table, then the machine's limits and the notes."""
        headers = ("shape", "format", "engine", "isa", "T", "ms", "MB read", "GB/s", "GOP/s", "%BW", "%peak", "other")
        lines = [
            (
                r.shape, r.format, r.engine, r.isa, str(r.tokens), _num(r.ms), _num(r.bytes_read / 1e6),
                _num(r.gbps), _num(r.gops), f"{r.pct_bandwidth:.0f}",
                "-" if r.pct_peak is None else f"{r.pct_peak:.1f}",
                "?" if r.other_cpu is None else f"{r.other_cpu:.2f}" + (" *" if r.other_cpu > BUSY_OTHER else "  "),
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
        right = {4, 5, 6, 7, 8, 9, 10, 11}

        def fmt(cells: Sequence[str]) -> str:
            pairs = enumerate(zip(cells, widths, strict=True))
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs)

        out = [fmt(headers), fmt(["-" * w for w in widths])]
        previous = None
        for row, line in zip(self.rows, lines, strict=True):
            if previous is not None and row.shape != previous:
                out.append("")
            previous = row.shape
            out.append(fmt(line))
        m = self.machine
        peaks = ", ".join(
            f"{isa} {kind} {value:.0f}"
            for isa, kinds in m.get("peaks_gops", {}).items()
            for kind, value in kinds.items()
        )
        out.append("")
        out.append(
            f"machine: {m['cpu_model']}, {m['threads']} threads; measured read bandwidth "
            f"{m['read_bandwidth_gbps']:.1f} GB/s; peaks (GOP/s): {peaks}"
        )
        if any(r.other_cpu is not None and r.other_cpu > BUSY_OTHER for r in self.rows):
            out.append(
                f"note: other: CPU cores other processes kept busy while a row was timed; * above {BUSY_OTHER}: "
                "that row shared the machine and is noisy"
            )
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)


def _num(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


# ---- random layers ---------------------------------------------------------------------------


class _RandomLayer:
    """``DISTINCT_EXPERTS`` random float experts of a shape (seeded), copied out to E experts."""

    def __init__(self, shape: ExpertShape, seed: int) -> None:
        rng = np.random.default_rng(seed)
        n = min(DISTINCT_EXPERTS, shape.experts)
        scale_in, scale_mid = 1.0 / math.sqrt(shape.hidden), 1.0 / math.sqrt(shape.inter)
        self.shape = shape
        self.gate = (rng.standard_normal((n, shape.inter, shape.hidden), dtype=np.float32) * scale_in)
        self.up = (rng.standard_normal((n, shape.inter, shape.hidden), dtype=np.float32) * scale_in)
        self.down = (rng.standard_normal((n, shape.hidden, shape.inter), dtype=np.float32) * scale_mid)
        self._quantized_cache: dict[tuple[int, int], tuple[_Raw, _Raw, _Raw]] = {}  # one format at a time

    def expand(self, pool: np.ndarray) -> np.ndarray:
        """Copies of the distinct experts (first axis) out to E, each in its own memory."""
        reps = -(-self.shape.experts // pool.shape[0])
        return np.ascontiguousarray(np.concatenate([pool] * reps, axis=0)[: self.shape.experts])

    def ktlab_experts(self, fmt: str, isa: str, threads: int) -> Any:
        """:class:`ktlab.kernels.CpuExperts` in ``fmt``; K-quant rows that don't fit fall back
        to Q8_0 as the GGUF writer does (the tiny shape's down projection)."""
        from gguf import GGMLQuantizationType

        from ktlab.kernels import CpuExperts

        gate_up, down = FORMAT_QTYPES[fmt]
        raws = self._quantized(GGMLQuantizationType[gate_up], GGMLQuantizationType[down])
        return CpuExperts(*raws, isa=isa, threads=threads)

    def _quantized(self, qtype: Any, down_qtype: Any) -> tuple[_Raw, _Raw, _Raw]:
        key = (int(qtype), int(down_qtype))
        cache = self._quantized_cache
        if key not in cache:
            from ktlab.model.quantize import fallback_qtype, quantize

            raws = []
            for pool, wanted in ((self.gate, qtype), (self.up, qtype), (self.down, down_qtype)):
                qt = fallback_qtype(pool.shape[-1], wanted)
                raws.append(_Raw(qt, (self.shape.experts, *pool.shape[1:]), self.expand(quantize(pool, qt))))
            cache.clear()  # one format at a time in memory (the 30B layer is up to 1.2 GB)
            cache[key] = (raws[0], raws[1], raws[2])
        return cache[key]

    def release(self) -> None:
        """Drop the quantized copies."""
        self._quantized_cache.clear()

    def torch_weights(self, dtype: Any) -> tuple[Any, Any, Any]:
        """gate, up ``[E, I, H]`` and down ``[E, H, I]`` as torch tensors of ``dtype``."""
        import torch

        return tuple(torch.from_numpy(self.expand(p)).to(dtype) for p in (self.gate, self.up, self.down))


@dataclass
class _Raw:
    """A raw tensor as :class:`ktlab.kernels.CpuExperts` takes it."""

    qtype: Any
    shape: tuple[int, ...]
    data: np.ndarray


# ---- engines: each turns (x, ids, weights) into a zero-argument call -------------------------


@dataclass
class _Engine:
    """A way to run the layer: ``prepare(x, ids, w)`` converts inputs once (untimed) and returns
    the call to time; ``expert_bytes`` is what one expert's weights cost to read."""

    engine: str
    fmt: str
    isa: str
    peak_isa: str
    expert_bytes: int
    prepare: Callable[[np.ndarray, np.ndarray, np.ndarray], Callable[[], Any]]
    close: Callable[[], None] = lambda: None


def _ktlab_engine(layer: _RandomLayer, fmt: str, isa: str, threads: int) -> _Engine:
    experts = layer.ktlab_experts(fmt, isa, threads)

    def prepare(x: np.ndarray, ids: np.ndarray, w: np.ndarray) -> Callable[[], Any]:
        return lambda: experts.forward(x, ids, w)

    return _Engine("ktlab", fmt, isa, isa, experts.expert_bytes, prepare)


def _torch_engine(layer: _RandomLayer, fmt: str, threads: int) -> _Engine:
    """Hugging Face's MoE loop: per hit expert, its tokens through three ``linear`` calls."""
    import torch
    import torch.nn.functional as F

    shape = layer.shape
    if fmt == "bf16":
        gate, up, down = layer.torch_weights(torch.bfloat16)
        scales = None
        expert_bytes = 3 * shape.hidden * shape.inter * 2
    else:
        gate, up, down, scales = _torch_int8_weights(layer)
        expert_bytes = 3 * shape.hidden * shape.inter + (2 * shape.inter + shape.hidden) * 4

    def linear(e: int, which: int, h: torch.Tensor) -> torch.Tensor:
        w = (gate, up, down)[which][e]
        if scales is None:
            return F.linear(h, w)
        s = h.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        q = torch.round(h / s).to(torch.int8)
        return torch._int_mm(q, w.t()).float() * s * scales[which][e]

    def forward(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], shape.hidden, dtype=torch.float32)
        mask = F.one_hot(ids, num_classes=shape.experts).permute(2, 1, 0)  # [E, k, T]
        for e in torch.nonzero(mask.sum(dim=(-1, -2))).flatten().tolist():
            slot, tok = torch.where(mask[e])
            h = x[tok]
            a = F.silu(linear(e, 0, h)) * linear(e, 1, h)
            y = linear(e, 2, a)
            out.index_add_(0, tok, y.float() * w[tok, slot, None])
        return out

    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    def prepare(x: np.ndarray, ids: np.ndarray, w: np.ndarray) -> Callable[[], Any]:
        xt = torch.from_numpy(x).to(dtype)
        it = torch.from_numpy(ids.astype(np.int64))
        wt = torch.from_numpy(w)

        def call() -> Any:
            with torch.inference_mode():
                return forward(xt, it, wt)

        return call

    from ktlab.kernels import best_isa

    best = best_isa()
    return _Engine("torch", fmt, "auto", best, expert_bytes, prepare, lambda: torch.set_num_threads(previous_threads))


def _torch_int8_weights(layer: _RandomLayer) -> tuple[Any, Any, Any, tuple[Any, Any, Any]]:
    """int8 weights (per-row absmax scales) and a check that ``torch._int_mm`` runs on CPU."""
    import torch

    quantized, scales = [], []
    for pool in (layer.gate, layer.up, layer.down):
        s = np.maximum(np.abs(pool).max(axis=-1, keepdims=True), 1e-12) / 127.0
        q = np.clip(np.rint(pool / s), -127, 127).astype(np.int8)
        quantized.append(torch.from_numpy(layer.expand(q)))
        scales.append(torch.from_numpy(layer.expand(s.astype(np.float32)))[:, :, 0])  # [E, rows]
    probe = torch.ones(1, layer.shape.hidden, dtype=torch.int8)
    torch._int_mm(probe, quantized[0][0].t())  # raises where CPU int8 matmul is missing
    return quantized[0], quantized[1], quantized[2], tuple(scales)


class _KtKernel:
    """KTransformers' ``kt_kernel_ext``: one CPUInfer (worker pool) per thread count, kept until
    :meth:`shutdown`."""

    _infer: dict[int, Any] = {}

    @classmethod
    def shutdown(cls) -> None:
        """Drop the pools (their destructors print, so stdout goes to stderr meanwhile)."""
        if cls._infer:
            import gc

            with _stdout_to_stderr():
                cls._infer.clear()
                gc.collect()

    @classmethod
    def infer(cls, threads: int) -> Any:
        from kt_kernel import kt_kernel_ext as ext

        if threads not in cls._infer:
            cfg = ext.WorkerPoolConfig()
            cfg.subpool_count = 1
            cfg.subpool_numa_map = [0]
            cfg.subpool_thread_count = [threads]
            with _stdout_to_stderr():
                cls._infer[threads] = ext.CPUInfer(cfg)
        return cls._infer[threads]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr meanwhile: kt-kernel's C++ prints its set-up on stdout,
    which would mix with the table."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _kt_engine(layer: _RandomLayer, fmt: str, threads: int, max_tokens: int) -> _Engine:
    """``AMXInt8_MOE`` / ``AMXBF16_MOE`` on bf16 weights (int8 quantized by kt at load)."""
    import kt_kernel
    import torch
    from kt_kernel import kt_kernel_ext as ext

    shape = layer.shape
    infer = _KtKernel.infer(threads)
    gate, up, down = (t.contiguous() for t in layer.torch_weights(torch.bfloat16))
    gpu_mask = torch.zeros(shape.experts, dtype=torch.bool)
    p2l = torch.arange(shape.experts, dtype=torch.int64)
    cfg = ext.moe.MOEConfig(shape.experts, shape.top_k, shape.hidden, shape.inter, gpu_mask.data_ptr())
    cfg.layer_idx = 0
    cfg.pool = infer.backend_
    cfg.max_len = -(-max_tokens // 32) * 32  # its int8 buffers want multiples of 32 rows
    cfg.gate_proj, cfg.up_proj, cfg.down_proj = gate.data_ptr(), up.data_ptr(), down.data_ptr()
    cfg.save = cfg.load = False
    with _stdout_to_stderr():
        moe = (ext.moe.AMXInt8_MOE if fmt == "int8" else ext.moe.AMXBF16_MOE)(cfg)
        infer.submit(moe.load_weights_task(p2l.data_ptr()))
        infer.sync()
    keep = (gate, up, down, gpu_mask, p2l, cfg)
    variant = str(getattr(kt_kernel, "__cpu_variant__", "?"))
    from ktlab.kernels import available_isas

    peak_isa = "amx" if variant.startswith("amx") and "amx" in available_isas() else "avx512"
    per_value = 1 if fmt == "int8" else 2
    expert_bytes = 3 * shape.hidden * shape.inter * per_value

    def prepare(x: np.ndarray, ids: np.ndarray, w: np.ndarray) -> Callable[[], Any]:
        n, k = ids.shape
        xt = torch.from_numpy(x).to(torch.bfloat16).contiguous()
        it = torch.from_numpy(ids.astype(np.int64)).contiguous()
        wt = torch.from_numpy(w).contiguous()
        out = torch.zeros(n, shape.hidden, dtype=torch.bfloat16)
        bsz = torch.tensor([n], dtype=torch.int32)
        args = (bsz.data_ptr(), k, it.data_ptr(), wt.data_ptr(), xt.data_ptr(), out.data_ptr(), False)

        def call() -> Any:
            _ = keep, xt, it, wt, bsz  # alive as long as the call
            infer.submit(moe.forward_task(*args))
            infer.sync()
            return out

        return call

    return _Engine("kt-kernel", fmt, variant, peak_isa, expert_bytes, prepare)


# ---- timing ----------------------------------------------------------------------------------


def _routing(rng: np.random.Generator, shape: ExpertShape, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """k distinct experts per token, uniform; routing weights normalised per token."""
    ids = np.argsort(rng.random((tokens, shape.experts)), axis=1)[:, : shape.top_k].astype(np.int32)
    w = rng.random((tokens, shape.top_k)).astype(np.float32) + 0.05
    return np.ascontiguousarray(ids), np.ascontiguousarray(w / w.sum(axis=1, keepdims=True))


def _busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _time_engine(
    engine: _Engine, shape: ExpertShape, tokens: int, config: BenchConfig
) -> tuple[float, int, float, float | None]:
    """(median seconds per call, calls timed, mean weight bytes read per call, CPU cores other
    processes kept busy meanwhile on average: None where unknown)."""
    rng = np.random.default_rng((config.seed, tokens))
    x = rng.standard_normal((tokens, shape.hidden), dtype=np.float32)

    def fresh() -> tuple[Callable[[], Any], int]:
        ids, w = _routing(rng, shape, tokens)
        return engine.prepare(x, ids, w), len(np.unique(ids))

    fresh()[0]()  # warm-up: first touch, pool start, lazy set-up
    busy0, own0, wall0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    times: list[float] = []
    unique: list[int] = []
    while len(times) < _MAX_CALLS and (len(times) < config.repeat or sum(times) < config.min_time):
        call, n_unique = fresh()  # a fresh routing per call, prepared outside the timing
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        unique.append(n_unique)
    busy1, own1, wall = _busy_cpu_s(), _own_cpu_s(), time.perf_counter() - wall0
    other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    return statistics.median(times), len(times), statistics.fmean(unique) * engine.expert_bytes, other


# ---- the run ---------------------------------------------------------------------------------


def _plan(config: BenchConfig) -> list[tuple[str, str, str, str, tuple[int, ...]]]:
    """(shape, kind, format, isa, tokens) work items in run order, kt-kernel last (its worker
    threads may keep spinning after use, which would slow everything measured after them)."""
    items = []
    for s in config.shapes:
        for fmt in config.formats:
            items.extend((s, "ktlab", fmt, isa, config.tokens_for(isa)) for isa in config.isas)
        if config.baselines:
            items.extend((s, "torch", fmt, "auto", config.tokens) for eng, fmt in _BASELINES if eng == "torch")
    if config.baselines:
        for s in config.shapes:
            items.extend((s, "kt-kernel", fmt, "", config.tokens) for eng, fmt in _BASELINES if eng == "kt-kernel")
    return [item for item in items if item[4]]


def _make_engine(kind: str, layer: _RandomLayer, fmt: str, isa: str, config: BenchConfig) -> _Engine:
    if kind == "ktlab":
        return _ktlab_engine(layer, fmt, isa, config.threads)
    if kind == "torch":
        return _torch_engine(layer, fmt, config.threads)
    return _kt_engine(layer, fmt, config.threads, max(config.tokens))


def _measure(
    engine: _Engine, shape: ExpertShape, tokens: Sequence[int], config: BenchConfig, report: BenchReport, progress: Any
) -> list[BenchRow]:
    """One row per T for an engine; measures the peak it is compared with on first need."""
    peaks: dict[str, dict[str, float]] = report.machine["peaks_gops"]
    peak_kind = machine.peak_kind_for(engine.fmt, engine.peak_isa)
    if peak_kind not in peaks.get(engine.peak_isa, {}):
        peaks.setdefault(engine.peak_isa, {})[peak_kind] = machine.measure_peak(
            engine.peak_isa, peak_kind, config.threads, seconds=config.peak_seconds
        )
    peak = peaks[engine.peak_isa][peak_kind]
    bandwidth = report.machine["read_bandwidth_gbps"]
    rows = []
    for t in tokens:
        seconds, calls, nbytes, other = _time_engine(engine, shape, t, config)
        for _ in range(config.retries):  # shared machine: try again for a quieter measurement
            if other is None or other <= BUSY_OTHER:
                break
            again = _time_engine(engine, shape, t, config)
            if again[3] is not None and again[3] < other:
                seconds, calls, nbytes, other = again
        gbps, gops = nbytes / seconds / 1e9, shape.ops(t) / seconds / 1e9
        rows.append(
            BenchRow(
                shape=shape.name, format=engine.fmt, engine=engine.engine, isa=engine.isa, tokens=t, ms=seconds * 1e3,
                calls=calls, bytes_read=nbytes, gbps=gbps, gops=gops, pct_bandwidth=100 * gbps / bandwidth,
                pct_peak=100 * gops / peak, peak_kind=peak_kind, peak_isa=engine.peak_isa, other_cpu=other,
            )
        )
        progress.update(1)
    return rows


def _iter_rows(config: BenchConfig, report: BenchReport, progress: Any) -> Iterator[BenchRow]:
    layers: dict[str, _RandomLayer] = {}
    skipped: set[tuple[str, str]] = set()
    for shape_name, kind, fmt, isa, tokens in _plan(config):
        shape = SHAPES[shape_name]
        if shape_name not in layers:
            layers.clear()  # one shape's weights at a time
            layers[shape_name] = _RandomLayer(shape, config.seed)
        layer = layers[shape_name]
        if (kind, fmt) in skipped:
            progress.update(len(tokens))
            continue
        progress.set_description(f"{shape_name} {fmt} {kind} {isa}".strip())
        done = progress.n
        engine = None
        try:
            engine = _make_engine(kind, layer, fmt, isa, config)
            yield from _measure(engine, shape, tokens, config, report, progress)
        except Exception as exc:  # a baseline that can't run here: skip it, say why
            if kind == "ktlab":
                raise
            skipped.add((kind, fmt))
            report.notes.append(f"{kind} {fmt} skipped: {_why(exc)}")
            progress.update(done + len(tokens) - progress.n)
        finally:
            if engine is not None:
                engine.close()
        if kind == "ktlab" and isa == config.isas[-1]:
            layer.release()


def _why(exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return f"the package is not importable here ({exc}); `pip install kt-kernel` to compare"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def run_bench(config: BenchConfig | None = None, progress: bool = True) -> BenchReport:
    """Measure the machine, then every (shape, format, engine, T) of ``config``.

    ``progress``: a tqdm bar on stderr while it runs.
    """
    from tqdm import tqdm

    config = config or BenchConfig()
    info = machine.machine_info(config.threads)
    info["read_bandwidth_gbps"] = machine.measure_read_bandwidth(config.threads, passes=config.bandwidth_passes)
    info["peaks_gops"] = {}
    info["versions"] = _versions()
    report = BenchReport(config=config, machine=info)
    total = sum(len(item[4]) for item in _plan(config))
    try:
        with tqdm(total=total, file=sys.stderr, disable=not progress, unit="row", leave=False) as bar:
            report.rows.extend(_iter_rows(config, report, bar))
    finally:
        _KtKernel.shutdown()
    _remeasure_limits(report)
    return report


def _remeasure_limits(report: BenchReport) -> None:
    """Measure bandwidth and peaks once more after the rows and keep the best values (a busy
    moment at the start would understate the machine and overstate every %), then redo the %."""
    config, m = report.config, report.machine
    m["read_bandwidth_gbps"] = machine.measure_read_bandwidth(
        config.threads, passes=config.bandwidth_passes, again=True
    )
    for isa, kinds in m["peaks_gops"].items():
        for kind in kinds:
            kinds[kind] = machine.measure_peak(isa, kind, config.threads, seconds=config.peak_seconds, again=True)
    for r in report.rows:
        r.pct_bandwidth = 100 * r.gbps / m["read_bandwidth_gbps"]
        if r.peak_isa is not None and r.peak_kind is not None:
            r.pct_peak = 100 * r.gops / m["peaks_gops"][r.peak_isa][r.peak_kind]


def _versions() -> dict[str, str | None]:
    """Versions of ktlab and of what it is compared with (read from metadata, not imported)."""
    from importlib import metadata

    import ktlab

    out: dict[str, str | None] = {"ktlab": ktlab.__version__}
    for dist in ("numpy", "torch", "kt-kernel"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
