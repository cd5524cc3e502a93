"""The C++ row ops between a layer's matmuls (RMSNorm, q/k norm + RoPE, router top-k) vs torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ktlab.kernels import qk_norm_rope, rms_norm_rows, route_topk
from ktlab.model.layers import Rope

EPS = 1e-6


def torch_rms_norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Hugging Face's Qwen3RMSNorm in float32."""
    t = torch.from_numpy(x)
    return (torch.from_numpy(w) * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS))).numpy()


@pytest.mark.parametrize("n", [128, 2048, 100])  # 100: not a multiple of the 16 partial sums
def test_rms_norm_rows_matches_torch_and_rows_are_batch_independent(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((37, n)).astype(np.float32) * 3
    w = rng.standard_normal(n).astype(np.float32)
    y = rms_norm_rows(x, w, EPS)
    np.testing.assert_allclose(y, torch_rms_norm(x, w), rtol=2e-6, atol=2e-6)
    for r in (0, 5, 36):  # a row alone gives the same bits as in the batch
        assert np.array_equal(rms_norm_rows(x[r : r + 1], w, EPS)[0], y[r])
    inplace = x.copy()
    rms_norm_rows(inplace, w, EPS, out=inplace)
    assert np.array_equal(inplace, y)


def test_rms_norm_rows_takes_any_leading_shape():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    assert np.array_equal(rms_norm_rows(x, w, EPS), rms_norm_rows(x.reshape(12, 64), w, EPS).reshape(3, 4, 64))


def test_qk_norm_rope_matches_torch_norm_then_rope():
    rng = np.random.default_rng(2)
    T, nh, nkv, hd = 21, 8, 2, 64
    qkv = rng.standard_normal((T, (nh + 2 * nkv) * hd)).astype(np.float32)
    q_norm, k_norm = (rng.standard_normal(hd).astype(np.float32) for _ in range(2))
    cos, sin = (t.numpy() for t in Rope(hd, 1e6).tables(40, T))
    q, k = qk_norm_rope(qkv, nh, nkv, q_norm, k_norm, cos, sin, EPS)
    tc, ts = torch.from_numpy(cos), torch.from_numpy(sin)
    q_ref = Rope.apply(torch.from_numpy(torch_rms_norm(qkv[:, : nh * hd].reshape(T, nh, hd), q_norm)), tc, ts)
    k_ref = Rope.apply(torch.from_numpy(torch_rms_norm(qkv[:, nh * hd : (nh + nkv) * hd].reshape(T, nkv, hd),
                                                       k_norm)), tc, ts)
    np.testing.assert_allclose(q, q_ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k, k_ref.numpy(), rtol=1e-5, atol=1e-5)
    q1, k1 = qk_norm_rope(qkv[7:8], nh, nkv, q_norm, k_norm, cos[7:8], sin[7:8], EPS)
    assert np.array_equal(q1[0], q[7]) and np.array_equal(k1[0], k[7])


def test_qk_norm_rope_rejects_bad_shapes():
    qkv = np.zeros((4, 10 * 64), dtype=np.float32)
    norm = np.ones(64, dtype=np.float32)
    cos = np.ones((4, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="fewer than"):
        qk_norm_rope(qkv, 8, 4, norm, norm, cos, cos, EPS)
    with pytest.raises(ValueError, match=r"cos and sin must be \[T=4"):
        qk_norm_rope(qkv, 4, 2, norm, norm, cos[:3], cos[:3], EPS)
    with pytest.raises(ValueError, match="even head size"):
        qk_norm_rope(qkv[:, :63 * 6], 4, 2, norm[:63], norm[:63], cos[:, :63], cos[:, :63], EPS)


@pytest.mark.parametrize("norm", [True, False])
def test_route_topk_matches_torch_softmax_topk(norm):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((50, 128)).astype(np.float32) * 2
    ids, weights = route_topk(logits, 8, norm)
    probs = torch.softmax(torch.from_numpy(logits), dim=-1)
    ref_w, ref_ids = torch.topk(probs, 8, dim=-1)
    if norm:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert ids.dtype == np.int64 and np.array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(weights, ref_w.numpy(), rtol=1e-6, atol=1e-7)


def test_route_topk_breaks_ties_by_lower_id_and_validates():
    logits = np.zeros((1, 6), dtype=np.float32)
    logits[0, [4, 1]] = 1.0
    ids, weights = route_topk(logits, 3, True)
    assert ids.tolist() == [[1, 4, 0]]
    assert weights.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="top_k must be in 1..6"):
        route_topk(logits, 7, True)
