"""Python face of the CPU kernels in ``cpp/`` (built as :mod:`ktlab._kernels`).

ISA paths, best first: ``amx > avx512 > avx2 > scalar``. The best one available on this CPU
runs unless ``KTLAB_ISA=scalar|avx2|avx512|amx`` forces one (read once, at first use);
forcing a path this CPU lacks raises ``ValueError`` naming the path and the CPU's features.
``KTLAB_ISA_DISABLE=amx,avx512`` (read once) makes ktlab treat those paths as absent.

Q8_0 GEMV: ``y = W @ x`` with ``W`` as raw Q8_0 rows exactly as a GGUF file stores them
(``[N, K/32*34]`` uint8) and ``x`` fp32, quantized on the fly to int8 blocks of 32 with an
fp32 scale; block dot products are exact int32, scaled and summed in fp32.
"""

from __future__ import annotations

import warnings

import numpy as np

from ktlab import _kernels

__all__ = [
    "ISA_NAMES",
    "Q8_0_BLOCK_BYTES",
    "Q8_0_BLOCK_VALUES",
    "available_isas",
    "best_isa",
    "cpu_features",
    "default_threads",
    "q8_0_gemv",
    "quantize_q8_0",
    "resolve_isa",
    "selected_isa",
]

#: Every ISA path ktlab knows, worst to best.
ISA_NAMES: tuple[str, ...] = tuple(_kernels.ISA_NAMES)
#: Bytes in one Q8_0 block (fp16 scale + 32 int8 quants), as in ggml.
Q8_0_BLOCK_BYTES: int = _kernels.Q8_0_BLOCK_BYTES
#: Values in one Q8_0 block.
Q8_0_BLOCK_VALUES: int = _kernels.Q8_0_BLOCK_VALUES


def cpu_features() -> dict[str, bool]:
    """The CPU features the dispatcher looks at (``avx2``, ``avx512vnni``, ``amx_int8``, ...)."""
    return _kernels.cpu_features()


def available_isas() -> list[str]:
    """ISA paths usable on this CPU, worst to best (always starts with ``"scalar"``)."""
    return _kernels.available_isas()


def best_isa() -> str:
    """The best ISA path this CPU can run, ignoring ``KTLAB_ISA``."""
    return _kernels.best_isa()


def resolve_isa(name: str | None = None) -> str:
    """The path a kernel call with ``isa=name`` runs on.

    ``None`` means ``KTLAB_ISA`` when set, else :func:`best_isa`. Raises ``ValueError`` for
    an unknown name or a path this CPU lacks (the message names both and the CPU features).
    """
    return _kernels.resolve_isa(name)


def selected_isa() -> str:
    """The path kernels use by default: ``KTLAB_ISA`` when set, else the best available.

    Warns (``RuntimeWarning``) when the CPU lacks AVX2 and the slow scalar path is all there is.
    """
    isa = _kernels.resolve_isa(None)
    if isa == "scalar" and _kernels.forced_isa() is None:
        warnings.warn(
            "this CPU has no AVX2 (or the OS does not enable it): ktlab's CPU kernels run on the slow scalar path",
            RuntimeWarning,
            stacklevel=2,
        )
    return isa


def default_threads() -> int:
    """Default kernel thread count: the physical cores this process may run on."""
    return _kernels.default_num_threads()


def q8_0_gemv(
    w_raw: np.ndarray,
    x: np.ndarray,
    isa: str | None = None,
    threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``y[N] = W[N, K] @ x[K]`` with ``W`` in Q8_0.

    Args:
        w_raw: uint8 ``[N, K/32*34]``: raw Q8_0 rows, as stored in a GGUF file (a read-only
            memmap is fine; it is not copied when C-contiguous).
        x: ``[K]`` activations (cast to float32), ``K`` a multiple of 32.
        isa: path to run (``"scalar"``, ``"avx2"``, ``"avx512"``, ``"amx"``); ``None`` uses
            :func:`selected_isa`.
        threads: kernel threads; ``None`` uses :func:`default_threads`. The result does not
            depend on it (bit-identical for any thread count).
        out: optional float32 ``[N]`` C-contiguous output buffer.

    Returns:
        float32 ``[N]`` (``out`` when given).

    Raises:
        ValueError: wrong dtype, rank or byte count, or an unknown/unavailable ``isa``.
    """
    if not isinstance(w_raw, np.ndarray) or w_raw.dtype != np.uint8 or w_raw.ndim != 2:
        raise ValueError(f"w_raw must be a 2-D uint8 array of raw Q8_0 rows [N, K/32*34], got {_describe(w_raw)}")
    x = np.asarray(x)
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be a 1-D float array [K], got {_describe(x)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    w_raw = np.ascontiguousarray(w_raw)
    if out is None:
        out = np.empty(w_raw.shape[0], dtype=np.float32)
    elif out.dtype != np.float32 or out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous 1-D float32 array, got {_describe(out)}")
    if isa is None:
        isa = selected_isa()
    if threads is None:
        threads = 0
    elif threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for the default), got {threads}")
    _kernels.q8_0_gemv(w_raw, x, out, isa, int(threads))
    return out


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Quantize fp32 values ``[..., K]`` (``K`` a multiple of 32) to raw Q8_0 bytes.

    Returns uint8 ``[..., K/32*34]``, byte-identical to ggml's ``quantize_row_q8_0`` and to
    ``gguf.quants.quantize(x, GGMLQuantizationType.Q8_0)``.
    """
    x = np.asarray(x)
    if x.ndim < 1 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be a float array [..., K], got {_describe(x)}")
    k = x.shape[-1]
    if k == 0 or k % Q8_0_BLOCK_VALUES:
        raise ValueError(f"the last axis has {k} values; Q8_0 needs a positive multiple of 32")
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        return np.empty((*x.shape[:-1], k // Q8_0_BLOCK_VALUES * Q8_0_BLOCK_BYTES), dtype=np.uint8)
    raw = _kernels.quantize_q8_0(flat)  # blocks never straddle rows, so one flat pass is per-row
    return raw.reshape(*x.shape[:-1], k // Q8_0_BLOCK_VALUES * Q8_0_BLOCK_BYTES)


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__
