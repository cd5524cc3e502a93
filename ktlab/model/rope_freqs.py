"""RoPE inverse frequencies and the cos/sin scale, plain and YaRN-scaled (numpy; torch-free).

YaRN (arXiv 2309.00071) as Hugging Face's ``_compute_yarn_parameters`` and llama.cpp's
``rope_yarn`` compute it: per frequency, a ramp between the original ("extrapolated") frequency and
the one slowed ``factor`` times ("interpolated"), from the dims that turn more than ``beta_fast``
times over the original context (kept) to those that turn less than ``beta_slow`` times (fully
interpolated); cos and sin are scaled by 0.1 ln(factor) + 1.
"""

from __future__ import annotations

import math

import numpy as np

from ktlab.config import ModelConfig

YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 mscale ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """The q . k scale: 1 / sqrt(head_dim), times DeepSeek's YaRN temperature squared where
    ``rope_mscale_all_dim`` is set (it scales the non-rotary dims too)."""
    scale = cfg.head_dim ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
    return scale


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [rotary_dim / 2] float32, the factor cos and sin are scaled by)."""
    dim, base = cfg.rotary_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    if cfg.rope_scaling == "none":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor = cfg.rope_factor

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.rope_original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(YARN_BETA_FAST), correction_dim(YARN_BETA_SLOW)
    if cfg.rope_yarn_truncate:  # whole dims (gpt-oss's config turns this off)
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singularity
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
    keep = 1 - ramp  # 1: the original frequency, 0: slowed `factor` times
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        scale = yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(factor, cfg.rope_mscale_all_dim)
        return inv_freq.astype(np.float32), scale
    return inv_freq.astype(np.float32), yarn_mscale(factor)
