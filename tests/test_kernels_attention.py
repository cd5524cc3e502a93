"""Paged decode attention (cpp/attention.h) vs a float64 numpy softmax over gathered pages,
every path against its scalar twin, batch independence and bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest

from ktlab import kernels


def make_pool(rng: np.random.Generator, nkv: int, pages: int, page: int, hd: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (nkv, pages * page, hd)
    return (rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32))


def reference(q, k, v, tables, lens, page):
    """float64 softmax(q k^T / sqrt(hd)) v over each sequence's rows, gathered in position order."""
    B, nh, hd = q.shape
    group = nh // k.shape[0]
    out = np.zeros((B, nh, hd))
    for b in range(B):
        rows = np.array([tables[b][s // page] * page + s % page for s in range(lens[b])])
        for h in range(nh):
            keys, values = k[h // group, rows].astype(np.float64), v[h // group, rows].astype(np.float64)
            scores = keys @ q[b, h].astype(np.float64) / np.sqrt(hd)
            p = np.exp(scores - scores.max())
            out[b, h] = (p / p.sum()) @ values
    return out


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize(("nh", "nkv", "hd", "page"), [(32, 4, 128, 16), (4, 2, 32, 8), (6, 3, 24, 5)])
def test_matches_float64_reference(isa: str, nh: int, nkv: int, hd: int, page: int) -> None:
    rng = np.random.default_rng(nh + hd + page)
    k, v = make_pool(rng, nkv, 40, page, hd)
    lens = np.array([1, page, page + 1, 3 * page + 2, 7 * page], dtype=np.int32)
    pages = rng.permutation(40)  # scattered, non-monotonic page tables
    tables = np.zeros((len(lens), 8), dtype=np.int32)
    for b in range(len(lens)):
        tables[b] = pages[8 * b : 8 * b + 8] if 8 * b + 8 <= 40 else pages[:8]
    q = (3 * rng.standard_normal((len(lens), nh, hd))).astype(np.float32)
    out = kernels.paged_decode_attention(q, k, v, tables, lens, page, hd**-0.5, isa=isa)
    np.testing.assert_allclose(out, reference(q, k, v, tables, lens, page), rtol=2e-5, atol=2e-5)


def test_sequence_output_independent_of_batch_and_threads() -> None:
    rng = np.random.default_rng(1)
    k, v = make_pool(rng, 4, 32, 16, 128)
    tables = rng.permutation(32).astype(np.int32).reshape(4, 8)
    lens = np.array([100, 17, 128, 1], dtype=np.int32)
    q = rng.standard_normal((4, 32, 128)).astype(np.float32)
    full = kernels.paged_decode_attention(q, k, v, tables, lens, 16, 128**-0.5, threads=2)
    for b in range(4):
        alone = kernels.paged_decode_attention(q[b : b + 1], k, v, tables[b : b + 1], lens[b : b + 1], 16,
                                               128**-0.5, threads=1)
        np.testing.assert_array_equal(alone[0], full[b])


def test_bad_inputs_raise_value_error() -> None:
    rng = np.random.default_rng(2)
    k, v = make_pool(rng, 2, 4, 8, 32)
    q = rng.standard_normal((1, 4, 32)).astype(np.float32)
    tables = np.array([[0, 1]], dtype=np.int32)
    attend = kernels.paged_decode_attention
    with pytest.raises(ValueError, match="positions"):
        attend(q, k, v, tables, np.array([17]), 8, 1.0)  # 2 pages of 8 hold 16
    with pytest.raises(ValueError, match="outside the pool"):
        attend(q, k, v, np.array([[0, 9]]), np.array([12]), 8, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        attend(rng.standard_normal((1, 3, 32)).astype(np.float32), k, v, tables, np.array([4]), 8, 1.0)
    with pytest.raises(ValueError, match="whole pages"):
        attend(q, k, v, tables, np.array([4]), 5, 1.0)


def q8_matrix(rng: np.random.Generator, rows: int, cols: int) -> kernels.QMatrix:
    raw = np.stack([kernels.quantize_q8_0(r) for r in rng.standard_normal((rows, cols)).astype(np.float32)])
    return kernels.QMatrix(raw)


def test_decode_attention_block_matches_its_kernels_one_by_one_and_validates():
    """The fused decode call against rms_norm -> q/k/v matmul -> norm+RoPE -> pool write ->
    paged attention -> output projection -> residual -> FFN norm -> router, called one by one."""
    rng = np.random.default_rng(7)
    B, H, nh, nkv, hd, E, k, page = 3, 64, 4, 2, 32, 16, 4, 4
    qkv, wo = q8_matrix(rng, (nh + 2 * nkv) * hd, H), q8_matrix(rng, H, nh * hd)
    attn_norm, ffn_norm = (rng.standard_normal(H).astype(np.float32) for _ in range(2))
    q_norm, k_norm = (rng.standard_normal(hd).astype(np.float32) for _ in range(2))
    router = rng.standard_normal((E, H)).astype(np.float32)
    x = rng.standard_normal((B, H)).astype(np.float32)
    cos, sin = (rng.standard_normal((B, hd)).astype(np.float32) for _ in range(2))
    k_pool, v_pool = make_pool(rng, nkv, 6, page, hd)
    tables = np.array([[0, 1], [2, 3], [4, 5]], dtype=np.int32)
    lens = np.array([5, 2, 8], dtype=np.int32)
    slots = np.array([t[(n - 1) // page] * page + (n - 1) % page for t, n in zip(tables, lens, strict=True)],
                     dtype=np.int64)
    args = (attn_norm, [qkv], q_norm, k_norm, wo, ffn_norm, router, nh, nkv, 1e-6, cos, sin)
    fused_k, fused_v = k_pool.copy(), v_pool.copy()
    h, hn, ids, weights = kernels.decode_attention_block(x, *args, fused_k, fused_v, slots, tables, lens, page, k, True)

    y = qkv(kernels.rms_norm_rows(x, attn_norm, 1e-6))
    q, kk = kernels.qk_norm_rope(y, nh, nkv, q_norm, k_norm, cos, sin, 1e-6)
    k_pool[:, slots] = kk.transpose(1, 0, 2)
    v_pool[:, slots] = y[:, (nh + nkv) * hd:].reshape(B, nkv, hd).transpose(1, 0, 2)
    attn = kernels.paged_decode_attention(q, k_pool, v_pool, tables, lens, page, hd ** -0.5)
    h_ref = x + wo(attn.reshape(B, nh * hd))
    hn_ref = kernels.rms_norm_rows(h_ref, ffn_norm, 1e-6)
    ids_ref, w_ref = kernels.route_topk(kernels.f32_matmul(router, hn_ref), k, True)
    for got, want in ((h, h_ref), (hn, hn_ref), (ids, ids_ref), (weights, w_ref), (fused_k, k_pool),
                      (fused_v, v_pool)):
        assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="outside the pool's 24 rows"):
        kernels.decode_attention_block(x, *args, fused_k, fused_v, slots + 24, tables, lens, page, k, True)
    with pytest.raises(ValueError, match="top_k must be in 1..16"):
        kernels.decode_attention_block(x, *args, fused_k, fused_v, slots, tables, lens, page, 17, True)
