"""What this machine can do at best: read bandwidth and compute peaks, measured here.

Both are measured by ktlab itself, with the kernels' own thread pool and thread count, so the
"% of measured read bandwidth" and "% of ISA peak" columns of ``ktlab bench-experts`` compare
the kernels with the same machine in the same state (a busy box gives lower numbers to both).

- :func:`measure_read_bandwidth`: STREAM-like: a sum over a 1 GiB buffer (far beyond the
  caches), split over the threads, widest loads plus the kernels' software prefetch; best of
  several passes, in GB/s (10^9 bytes per second).
- :func:`measure_peak`: a register-resident loop per ISA path and kind (``cpp/peak.cpp``):
  ``int8`` dot products (AVX2 vpmaddubsw/vpmaddwd, AVX-512 VNNI vpdpbusd, AMX tdpbssd),
  ``bf16`` (AVX-512 vdpbf16ps, AMX tdpbf16ps) or ``fp32`` FMA; best of several runs, in GOP/s
  (a multiply-add counts as 2 ops). The scalar path's kernels are plain C++ that the compiler
  auto-vectorizes for the baseline target, so its peak is the baseline's SIMD (x86-64: SSE2
  pmaddwd for int8, mulps + addps for fp32).

Results are cached per process.
"""

from __future__ import annotations

import functools
import os
import platform
import time

import numpy as np

from ktlab import _kernels
from ktlab.kernels import available_isas, cpu_features, default_threads, resolve_isa

__all__ = [
    "PEAK_KINDS",
    "cpu_model",
    "machine_info",
    "measure_peak",
    "measure_read_bandwidth",
    "peak_kind_for",
    "peak_supported",
]

#: Kinds of compute peak: fp32 FMA, int8 and bf16 dot products.
PEAK_KINDS: tuple[str, ...] = tuple(_kernels.PEAK_KINDS)

#: Bytes of the bandwidth buffer: well past any last-level cache.
_BANDWIDTH_BYTES = 1 << 30


def _check_threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return threads


def _distinct_words(nbytes: int, seed: int = 0) -> np.ndarray:
    """``nbytes`` of 64-bit words, every page written and no two pages alike: a buffer of one
    repeated byte measured 57 GB/s here once the host had merged its identical pages (KSM) into
    a few cached ones, against 33-35 GB/s for distinct data."""
    return np.arange(nbytes // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)


@functools.lru_cache(maxsize=1)
def _bandwidth_buffer() -> tuple[np.ndarray, int]:
    """(buffer, the sum of its 64-bit words mod 2^64)."""
    words = _distinct_words(_BANDWIDTH_BYTES)
    return words.view(np.uint8), int(words.sum(dtype=np.uint64))


@functools.cache
def _read_bandwidth(threads: int, passes: int) -> float:
    buf, expected = _bandwidth_buffer()
    best = 0.0
    for _ in range(passes + 1):  # the first pass warms the pool and the TLB
        total, seconds = _kernels.read_sum(buf, threads)
        if total != expected:
            raise RuntimeError("read bandwidth kernel summed the buffer wrong")
        best = max(best, buf.nbytes / seconds / 1e9)
    return best


class ReadProbe:
    """A short read-bandwidth sample, for tracking the bandwidth while something else runs.

    On a shared host the bandwidth a process gets swings with its neighbours (here 17-51 GB/s
    from one second to the next), so a serving engine re-measures while it decodes rather than
    trusting one figure from its start. One call streams ``nbytes`` once (128 MiB: about 4 ms at
    33 GB/s, well past the last-level cache) over the kernel pool and returns GB/s.
    """

    def __init__(self, nbytes: int = 128 << 20, threads: int | None = None) -> None:
        if nbytes < 1 << 20:
            raise ValueError(f"a read probe needs at least 1 MiB, got {nbytes} bytes")
        self.threads = _check_threads(threads)
        # Distinct from other processes' probes too.
        self._buffer = _distinct_words(nbytes, seed=os.getpid() * 0x100000001B3 % (1 << 63)).view(np.uint8)

    def __call__(self) -> float:
        """Read the buffer once; GB/s."""
        _, seconds = _kernels.read_sum(self._buffer, self.threads)
        return self._buffer.nbytes / seconds / 1e9


_BEST: dict[tuple, float] = {}  # best values seen by `again=True` calls


def _best(key: tuple, measured: float) -> float:
    _BEST[key] = max(_BEST.get(key, 0.0), measured)
    return _BEST[key]


def measure_read_bandwidth(threads: int | None = None, passes: int = 5, again: bool = False,
                           keep_buffer: bool = True) -> float:
    """This machine's read bandwidth in GB/s on ``threads`` kernel threads (best of ``passes``).

    Cached per (threads, passes) for the life of the process. ``threads=None`` uses
    :func:`ktlab.kernels.default_threads`. ``again=True`` measures once more and returns the
    best value seen so far (on a shared machine a later, quieter moment may do better).
    ``keep_buffer=False`` frees the 1 GiB buffer afterwards (a server measures once at start).
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    threads = _check_threads(threads)
    key = ("bandwidth", threads, passes)
    try:
        first = _best(key, _read_bandwidth(threads, passes))
        return _best(key, _read_bandwidth.__wrapped__(threads, passes)) if again else first
    finally:
        if not keep_buffer:
            _bandwidth_buffer.cache_clear()


def peak_supported(isa: str, kind: str) -> bool:
    """Whether ``isa`` (an available path) has a ``kind`` peak loop on this CPU."""
    return bool(_kernels.peak_supported(resolve_isa(isa), kind))


def peak_kind_for(fmt: str, isa: str) -> str:
    """The peak a kernel of weight format ``fmt`` on ``isa`` is compared with.

    Integer formats (``q8_0``, the K-quants and their mixes, ``int8``) run int8 dot products; ``bf16``
    runs bf16 dot products where the path has them, else fp32 FMA (bf16 widened to fp32).
    """
    if fmt == "bf16":
        return "bf16" if peak_supported(isa, "bf16") else "fp32"
    return "int8"


@functools.cache
def _peak(isa: str, kind: str, threads: int, seconds: float, runs: int) -> float:
    iters = 1024
    while True:  # calibrate: grow until one run takes `seconds`
        ops, took = _kernels.run_peak(isa, kind, threads, iters)
        if took >= seconds or iters >= 1 << 40:
            break
        iters = int(iters * min(max(2.0, 1.2 * seconds / max(took, 1e-6)), 64.0))
    best = ops / took
    for _ in range(runs - 1):
        ops, took = _kernels.run_peak(isa, kind, threads, iters)
        best = max(best, ops / took)
    return best / 1e9


def measure_peak(
    isa: str, kind: str, threads: int | None = None, seconds: float = 0.1, runs: int = 3, again: bool = False
) -> float:
    """Measured compute peak in GOP/s of ``kind`` on the ``isa`` path, on ``threads`` threads.

    Each run lasts about ``seconds``; the best of ``runs`` is kept and cached per process.
    ``again=True`` measures once more and returns the best value seen so far.

    Raises:
        ValueError: unknown/unavailable ``isa``, unknown ``kind``, or no such loop here
            (e.g. ``bf16`` on AVX2).
    """
    isa = resolve_isa(isa)
    if kind not in PEAK_KINDS:
        raise ValueError(f"unknown peak kind {kind!r}; one of {', '.join(PEAK_KINDS)}")
    if not peak_supported(isa, kind):
        raise ValueError(f"the {isa} path has no {kind} peak loop on this CPU")
    if seconds <= 0 or runs < 1:
        raise ValueError(f"need seconds > 0 and runs >= 1, got {seconds}, {runs}")
    args = (isa, kind, _check_threads(threads), float(seconds), int(runs))
    first = _best(("peak", *args), _peak(*args))
    return _best(("peak", *args), _peak.__wrapped__(*args)) if again else first


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None = None) -> dict:
    """CPU model, cores, threads, ISA paths and features: the context of a benchmark run."""
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": _logical_cpus(),
        "threads": _check_threads(threads),
        "isas": available_isas(),
        "cpu_features": sorted(k for k, v in cpu_features().items() if v),
        "platform": platform.platform(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _logical_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
