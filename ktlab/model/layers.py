"""Building blocks of MoE decoders in torch: RMSNorm, RoPE, GQA attention with KV cache, MoE block.

The MoE block never decides where experts run: it asks its ``Placement`` which backend owns each
selected expert and sums what those backends return. Shapes in comments: T tokens, H hidden,
nh/nkv heads, hd head dim, E experts, k experts per token, I expert width.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ktlab.config import ModelConfig
from ktlab.kernels import QMatrix, f32_matmul, paged_decode_attention, qk_norm_rope, rms_norm_rows, route_topk


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block (about 10 us to switch).

    Decode steps use one: their torch ops are tiny, and idle OpenMP workers spinning after
    each op steal the cores the C++ expert pool needs (measured: 150 -> 30 ms/token).
    """
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


_plain = threading.local()


@contextmanager
def plain_torch() -> Iterator[None]:
    """Inside the block the dense layers run as plain torch ops, never the C++ row kernels: the code
    a model on an accelerator runs (``MoEDecoder(device=...)``), so that the CPU standing in for one
    (``torch:cpu``) runs exactly what a GPU would."""
    before = getattr(_plain, "on", False)
    _plain.on = True
    try:
        yield
    finally:
        _plain.on = before


def row_kernels_apply(*tensors: torch.Tensor) -> bool:
    """Whether the C++ row kernels (float32 CPU, no autograd, not under :func:`plain_torch`) can take
    these tensors."""
    return not getattr(_plain, "on", False) and all(
        t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, computed in float32 (as Hugging Face does). Float32 CPU
    tensors take the C++ row kernel: one call instead of five torch ops, and each row's
    result independent of the other rows."""
    if row_kernels_apply(x, weight):
        return torch.from_numpy(rms_norm_rows(x.numpy(), weight.numpy(), eps))
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class Rope:
    """NeoX-style rotary embedding (rotate halves), tables grown on demand. ``head_dim`` is the
    rotated width: where it is less than a head's (partial RoPE, GLM-4.5), the rest passes."""

    def __init__(self, head_dim: int, theta: float, dtype: torch.dtype = torch.float32,
                 inv_freq: np.ndarray | None = None, scale: float = 1.0,
                 device: torch.device | str = "cpu") -> None:
        self.inv_freq = (1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
                         if inv_freq is None else torch.from_numpy(np.asarray(inv_freq, dtype=np.float32)))
        self.scale = scale  # cos and sin are multiplied by it (YaRN's temperature)
        self.dtype = dtype
        self.device = torch.device(device)  # where the tables live (the model's dense device)
        self._cos = torch.empty(0, head_dim, dtype=dtype, device=self.device)
        self._sin = torch.empty(0, head_dim, dtype=dtype, device=self.device)

    def tables(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, hd] for positions start .. start+length-1."""
        end = start + length
        if end > self._cos.shape[0]:
            n = max(end, 2 * self._cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos(), emb.sin()
            if self.scale != 1.0:
                cos, sin = cos * self.scale, sin * self.scale
            self._cos, self._sin = cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)
        return self._cos[start:end], self._sin[start:end]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, hd] for arbitrary positions [N] (a batch of sequences at different offsets)."""
        self.tables(0, int(positions.max()) + 1)
        positions = positions.to(self.device)
        return self._cos[positions], self._sin[positions]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, hd] by position tables [T, rd] (its first rd dims where rd < hd)."""
        rd = cos.shape[-1]
        if rd < x.shape[-1]:
            return torch.cat([Rope.apply(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)
        half = rd // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass
class KVCache:
    """Contiguous per-layer key/value cache for one sequence: k, v [L, max_len, nkv, hd]."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, cfg: ModelConfig, max_len: int, dtype: torch.dtype, device: str = "cpu") -> KVCache:
        """Zeroed cache for ``max_len`` positions."""
        shape = (cfg.num_layers, max_len, cfg.cache_heads, cfg.cache_head_dim)
        k = torch.zeros(shape, dtype=dtype, device=device)
        return cls(k, k if cfg.mla else torch.zeros(shape, dtype=dtype, device=device))  # latent: values are keys

    @property
    def capacity(self) -> int:
        """Positions the cache can hold."""
        return self.k.shape[1]


@dataclass
class PagedKV:
    """Key/value pages shared by many sequences: k, v [L, nkv, P, page_size, hd] (head-major, so
    gathering a sequence's pages for one head yields contiguous [positions, hd] rows for matmuls).

    A sequence owns a page table (page ids in order); its position ``p`` lives in page
    ``table[p // page_size]`` at row ``p % page_size``. Who owns which page is decided
    elsewhere (``ktlab.serve.kv.BlockManager``); this is only the storage, plus a reusable
    workspace for gathered pages (fresh multi-MB buffers every layer cost page faults).
    """

    k: torch.Tensor
    v: torch.Tensor
    _workspace: list[torch.Tensor] = field(default_factory=list, repr=False)

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> PagedKV:
        """Zeroed pages (``num_pages`` of ``page_size`` positions each, every layer) on ``device``."""
        shape = (cfg.num_layers, cfg.cache_heads, num_pages, page_size, cfg.cache_head_dim)
        k = torch.zeros(shape, dtype=dtype, device=device)
        return cls(k, k if cfg.mla else torch.zeros(shape, dtype=dtype, device=device))  # latent: values are keys

    @property
    def nbytes(self) -> int:
        """Bytes of the pool (keys and values)."""
        return (self.k.numel() + (0 if self.v is self.k else self.v.numel())) * self.k.element_size()

    @property
    def num_pages(self) -> int:
        """Pages in the pool."""
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        """Positions per page."""
        return self.k.shape[3]

    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views k, v [nkv, P*page_size, hd] of one layer (row = page * page_size + offset)."""
        nkv, hd = self.k.shape[1], self.k.shape[-1]
        return self.k[layer].view(nkv, -1, hd), self.v[layer].view(nkv, -1, hd)

    def gather(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [nkv, n*page_size, hd] of the ``pages`` [n] in order, copied into the workspace
        (valid until the next call)."""
        nkv, _, page, hd = self.k.shape[1:]
        n = pages.numel() * page * hd * nkv
        if not self._workspace or self._workspace[0].numel() < n:
            self._workspace[:] = [torch.empty(max(n, 2 * (self._workspace[0].numel() if self._workspace else 0)),
                                              dtype=self.k.dtype, device=self.k.device) for _ in range(2)]
        out = []
        for src, ws in zip((self.k[layer], self.v[layer]), self._workspace, strict=True):
            buf = ws[:n].view(nkv, pages.numel(), page, hd)
            torch.index_select(src, 1, pages, out=buf)
            out.append(buf.view(nkv, -1, hd))
        return out[0], out[1]


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's share of a batched call: its ``n_tokens`` tokens sit at positions
    ``start .. start+n_tokens-1``, its keys/values in the pages of ``page_table``."""

    page_table: tuple[int, ...]
    start: int
    n_tokens: int


@dataclass
class PagedBatch:
    """Index tensors of one batched call, built once and shared by every layer.

    One-token sequences (decode) attend in the paged decode kernel, over their page tables;
    longer ones (prefill chunks) one by one with the causal mask.
    """

    seqs: list[SeqSlice]
    positions: torch.Tensor  # [N] position of every token
    slots: torch.Tensor  # [N] flat row (page * page_size + offset) where its K/V go
    cos: torch.Tensor  # [N, hd]
    sin: torch.Tensor  # [N, hd]
    decode_tokens: torch.Tensor | None  # [B] indices (in the N tokens) of the one-token sequences
    decode_tables: np.ndarray | None  # [B, Pmax] int32 their page tables, padded with page 0
    decode_lens: np.ndarray | None  # [B] int32 positions each one-token sequence attends to
    chunks: list[tuple[int, int, torch.Tensor, int]]  # multi-token sequences: (t0, t1, rows [S], start)

    @classmethod
    def build(cls, seqs: list[SeqSlice], page_size: int, rope: Rope) -> PagedBatch:
        """Positions, write slots and read rows for ``seqs`` (their tokens concatenated in this order),
        the index tensors on the device of ``rope``'s tables (the model's)."""
        batch = cls._build_decode(seqs, page_size, rope) if all(s.n_tokens == 1 for s in seqs) else \
            cls._build_any(seqs, page_size, rope)
        return batch if rope.device.type == "cpu" else batch._on(rope.device)

    def _on(self, device: torch.device) -> PagedBatch:
        self.positions, self.slots = self.positions.to(device), self.slots.to(device)
        if self.decode_tokens is not None:
            self.decode_tokens = self.decode_tokens.to(device)
        self.chunks = [(t0, t1, rows.to(device), start) for t0, t1, rows, start in self.chunks]
        return self

    @classmethod
    def _build_any(cls, seqs: list[SeqSlice], page_size: int, rope: Rope) -> PagedBatch:
        """``build`` for any mix of prefill chunks and decode tokens."""
        offsets = np.arange(page_size)
        positions, slots, decode_tokens, decode_rows, chunks = [], [], [], [], []
        t0 = 0
        for s in seqs:
            end = s.start + s.n_tokens
            if len(s.page_table) * page_size < end:
                raise ValueError(f"page table of {len(s.page_table)} pages cannot hold {end} positions")
            rows = (np.asarray(s.page_table)[:, None] * page_size + offsets).reshape(-1)[:end]
            positions.append(np.arange(s.start, end))
            slots.append(rows[s.start :])
            if s.n_tokens == 1:
                decode_tokens.append(t0)
                decode_rows.append((s.page_table[: -(-end // page_size)], end))
            else:
                chunks.append((t0, t0 + s.n_tokens, torch.from_numpy(rows), s.start))
            t0 += s.n_tokens
        pos = torch.from_numpy(np.concatenate(positions))
        cos, sin = rope.at(pos)
        d_tokens = d_tables = d_lens = None
        if decode_rows:
            d_tables = np.zeros((len(decode_rows), max(len(t) for t, _ in decode_rows)), dtype=np.int32)
            for i, (table, _) in enumerate(decode_rows):
                d_tables[i, : len(table)] = table
            d_tokens = torch.tensor(decode_tokens)
            d_lens = np.array([end for _, end in decode_rows], dtype=np.int32)
        return cls(seqs, pos, torch.from_numpy(np.concatenate(slots)), cos, sin, d_tokens, d_tables, d_lens, chunks)

    @classmethod
    def _build_decode(cls, seqs: list[SeqSlice], page_size: int, rope: Rope) -> PagedBatch:
        """``build`` for a decode step (one token per sequence), without a loop of numpy calls per
        sequence: the same tensors (a decode step's fixed cost: 190 -> 84 us for 16 sequences here)."""
        starts = np.fromiter((s.start for s in seqs), dtype=np.int64, count=len(seqs))
        n_pages = starts // page_size + 1  # pages each sequence reads, the new position's included
        d_tables = np.zeros((len(seqs), int(n_pages.max())), dtype=np.int32)
        for i, (s, n) in enumerate(zip(seqs, n_pages.tolist(), strict=True)):
            if len(s.page_table) < n:
                raise ValueError(f"page table of {len(s.page_table)} pages cannot hold {s.start + 1} positions")
            d_tables[i, :n] = s.page_table[:n]
        rows = np.arange(len(seqs))
        slots = d_tables[rows, n_pages - 1].astype(np.int64) * page_size + starts % page_size
        pos = torch.from_numpy(starts)
        cos, sin = rope.at(pos)
        return cls(seqs, pos, torch.from_numpy(slots), cos, sin, torch.from_numpy(rows), d_tables,
                   (starts + 1).astype(np.int32), [])


class Linear:
    """``y = x W^T (+ b)``. Float weights serve torch; when the stored blocks are Q8_0 or a
    K-quant the model gives a :class:`~ktlab.kernels.QMatrix` and every call runs the C++ matmul
    on those blocks (0.56-1.06 bytes per weight instead of 4, each weight read once for all the
    rows of x). A row's result never depends on the rows that come with it, so a token's output
    does not depend on its batch or its prefill chunk."""

    def __init__(self, weight: torch.Tensor, qmat: QMatrix | None = None, bias: torch.Tensor | None = None) -> None:
        self.weight = weight  # [N, K]
        self.qmat = qmat
        self.bias = bias  # [N] or None

    @property
    def nbytes(self) -> int:
        """Bytes a call reads of this matrix (its blocks when it has them, else the float weight)."""
        return self.qmat.raw.nbytes if self.qmat is not None else self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, N]."""
        if self.qmat is not None:
            y = torch.from_numpy(self.qmat(x.float().numpy())).to(x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class FusedLinear:
    """Several block-format projections of the same input (q, k and v) as one matmul call where
    they share a format: their rows are concatenated once at load, so one pool wake-up serves
    them all; where formats differ (a Q4_K_M file's v may be Q6_K) each keeps its own matrix.
    Each output row is the same dot product as in its own :class:`Linear`, so the results are
    identical."""

    def __init__(self, parts: list[Linear]) -> None:
        if any(p.qmat is None for p in parts):
            raise ValueError("FusedLinear needs a block-format matrix for every part")
        first = parts[0].qmat
        if len({p.qmat.fmt for p in parts}) == 1:
            self.mats = [QMatrix(np.concatenate([p.qmat.raw for p in parts]), first.fmt, first.isa, first.threads)]
        else:
            self.mats = [p.qmat for p in parts]
        self._splits = np.cumsum([p.weight.shape[0] for p in parts])[:-1].tolist()
        biases = [p.bias for p in parts]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(p.weight.shape[0], dtype=p.weight.dtype)
             for b, p in zip(biases, parts, strict=True)])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [T, K] -> one [T, N_i] tensor per part."""
        return list(torch.tensor_split(self.concatenated(x), self._splits, dim=1))

    def concatenated(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, sum N_i]: the parts' outputs side by side, as one array."""
        xs = x.float().numpy()
        out = [m(xs) for m in self.mats]
        y = torch.from_numpy(out[0] if len(out) == 1 else np.concatenate(out, axis=-1)).to(x.dtype)
        return y if self.bias is None else y + self.bias


@dataclass
class AttentionWeights:
    """One layer's attention parameters (row = output feature)."""

    wq: Linear  # [nh*hd, H]
    wk: Linear  # [nkv*hd, H]
    wv: Linear  # [nkv*hd, H]
    wo: Linear  # [H, nh*hd]
    q_norm: torch.Tensor | None  # [hd] per head or [nh*hd] over the projection (ModelConfig.qk_norm); None: none
    k_norm: torch.Tensor | None  # [hd] or [nkv*hd]
    qkv: FusedLinear | None = None  # q, k and v as block-format matmuls (Q8_0 and K-quant files)
    sinks: torch.Tensor | None = None  # [nh] attention-sink logits (gpt-oss; ModelConfig.attn_sinks)
    window: int = 0  # positions a query sees, its own included (sliding-window layers); 0: all

    def output(self, out: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        """Attention output [T, nh, hd] -> [T, H] (the output projection)."""
        return self.wo(out.reshape(out.shape[0], -1))

    def parts(self, fused: bool = False) -> list:
        """Its weights as a step reads them (the fused q/k/v matrix where there is one and
        ``fused``), biases and norms included; for byte counts."""
        projections = [self.qkv] if fused and self.qkv is not None else [self.wq, self.wk, self.wv]
        parts = [*projections, self.wo, self.q_norm, self.k_norm, self.sinks,
                 *(lin.bias for lin in (self.wq, self.wk, self.wv, self.wo))]
        return [p for p in parts if p is not None]


@dataclass
class LatentAttentionWeights:
    """One layer's multi-head latent attention (DeepSeek-V2/V3, Kimi-K2; ModelConfig.kv_lora_rank),
    in the absorbed form DeepSeek and llama.cpp run it: the cache keeps, per position, only the
    normed ``kv_lora_rank`` latent c and the shared RoPE key (one cached row of ``kv_lora + rope``,
    ``ModelConfig.cache_head_dim``: 576 floats for DeepSeek-V3 instead of 128 heads x 384). Each
    query head moves into latent space, q_lat = k_b^T q_nope, so that q . k = [q_lat, q_pe] . [c,
    k_pe] for every head against the one cached row (multi-query attention); the values are the
    latent, and each head's output maps back through its v_b. Queries come straight from x (``q``)
    or through a normed ``q_lora_rank`` latent (``q_a``, ``q_b``); RoPE rows in NeoX order."""

    q: Linear | None  # [nh * hd, H] without a q latent
    q_a: Linear | None  # [q_lora, H]
    q_a_norm: torch.Tensor | None  # [q_lora]
    q_b: Linear | None  # [nh * hd, q_lora]
    kv_a: Linear  # [kv_lora + rope, H]
    kv_a_norm: torch.Tensor  # [kv_lora]
    k_b: torch.Tensor  # [nh, kv_lora, nope]: the latent's expansion into keys, transposed
    v_b: torch.Tensor  # [nh, v, kv_lora]: into values
    wo: Linear  # [H, nh * v]
    q_scale: float = 1.0  # the softmax scale over the kernels' own 1 / sqrt(cached row width)
    sinks: None = None  # no attention sinks or sliding windows in latent attention (AttentionWeights)
    window: int = 0

    def parts(self, fused: bool = False) -> list:
        """Its weights, for byte counts (``fused`` has no meaning here)."""
        parts = [self.q, self.q_a, self.q_a_norm, self.q_b, self.kv_a, self.kv_a_norm, self.k_b, self.v_b, self.wo]
        return [p for p in parts if p is not None]

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, nh, L + R] (in latent space, scaled), the cached row k [T, 1, L + R] and v = k (the
        values are the latent, the row's first L dims: the cache keeps one tensor for both, and the
        output's last R dims are dropped) of x [T, H]; L = kv_lora_rank, R = rope_dim."""
        T, nh, hd, rope, lora = x.shape[0], cfg.num_heads, cfg.head_dim, cfg.rope_dim, cfg.kv_lora_rank
        eps = cfg.rms_norm_eps
        q = self.q(x) if self.q is not None else self.q_b(rms_norm(self.q_a(x), self.q_a_norm, eps))
        q = q.view(T, nh, hd)
        q_lat = per_head_matmul(q[..., : hd - rope], self.k_b)
        q = torch.cat([q_lat, Rope.apply(q[..., hd - rope :], cos, sin)], dim=-1) * self.q_scale
        latent = self.kv_a(x)  # [T, kv_lora + rope]
        c = rms_norm(latent[:, :lora].contiguous(), self.kv_a_norm, eps)[:, None, :]
        k = torch.cat([c, Rope.apply(latent[:, None, lora:], cos, sin)], dim=-1)
        return q, k, k

    def output(self, out: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        """Attention output in latent space [T, nh, L + R] -> [T, H]: each head through its v_b, then wo."""
        heads = per_head_matmul(out[..., : cfg.kv_lora_rank], self.v_b)
        return self.wo(heads.reshape(out.shape[0], -1))


def per_head_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, nh, K] times each head's own w [nh, N, K]^T -> [T, nh, N]. Float32 CPU tensors take
    the C++ row kernel head by head, so a token's result never depends on the tokens beside it."""
    if not row_kernels_apply(x, w):
        return torch.einsum("thk,hnk->thn", x, w)
    xs, ws = x.numpy(), w.numpy()
    return torch.from_numpy(np.stack([f32_matmul(ws[h], xs[:, h]) for h in range(ws.shape[0])], axis=1))


def project_qkv(
    x: torch.Tensor, w: AttentionWeights | LatentAttentionWeights, cos: torch.Tensor, sin: torch.Tensor,
    cfg: ModelConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, nh, hd], k and v [T, nkv, hd] of x [T, H]: projections (+ biases), q/k RMSNorm (per
    head, over the whole projection or none: ``cfg.qk_norm``), RoPE (tables [T, hd]).

    With the fused block-format projection, per-head norms and float32 tensors, the head norms
    and RoPE of every token run in one C++ call over the fused output (a dozen torch ops otherwise)."""
    if isinstance(w, LatentAttentionWeights):
        return w.project(x, cos, sin, cfg)
    T = x.shape[0]
    per_head = cfg.qk_norm == "head"
    if (w.qkv is not None and per_head and cfg.rotary_dim == cfg.head_dim
            and row_kernels_apply(x, w.q_norm, w.k_norm, cos, sin)):
        y = w.qkv.concatenated(x)  # [T, (nh + 2 nkv) hd]: q heads, k heads, v heads
        q, k = qk_norm_rope(y.numpy(), cfg.num_heads, cfg.num_kv_heads, w.q_norm.numpy(), w.k_norm.numpy(),
                            cos.numpy(), sin.numpy(), cfg.rms_norm_eps)
        v = y[:, (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim :].view(T, cfg.num_kv_heads, cfg.head_dim)
        return torch.from_numpy(q), torch.from_numpy(k), v
    q, k, v = w.qkv(x) if w.qkv is not None else (w.wq(x), w.wk(x), w.wv(x))
    if cfg.qk_norm == "full":
        eps = cfg.rms_norm_eps
        q, k = rms_norm(q.contiguous(), w.q_norm, eps), rms_norm(k.contiguous(), w.k_norm, eps)
    q = q.reshape(T, cfg.num_heads, cfg.head_dim)
    k = k.reshape(T, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(T, cfg.num_kv_heads, cfg.head_dim)
    if per_head:
        q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)
    return Rope.apply(q, cos, sin), Rope.apply(k, cos, sin), v


def attention(
    x: torch.Tensor, w: AttentionWeights, cache: KVCache | None, layer: int, rope: Rope, cfg: ModelConfig
) -> torch.Tensor:
    """GQA self-attention of x [T, H] at positions cache.length.., writing its K/V into the cache.
    ``cache`` None: a whole sequence from position 0 attending to its own keys, no cache written
    (training: autograd through every position, no in-place writes)."""
    T, pos = x.shape[0], cache.length if cache is not None else 0
    q, k, v = project_qkv(x, w, *rope.tables(pos, T), cfg)
    if cache is None:
        out = gqa_attention(q, k, v, 0, w.window, w.sinks)
        return w.output(out.reshape(T, cfg.num_heads, -1), cfg)
    cache.k[layer, pos : pos + T] = k
    if cache.v is not cache.k:  # one tensor for both under latent attention
        cache.v[layer, pos : pos + T] = v
    out = gqa_attention(q, cache.k[layer, : pos + T], cache.v[layer, : pos + T], pos, w.window, w.sinks)
    return w.output(out.reshape(T, cfg.num_heads, -1), cfg)


def paged_attention(
    x: torch.Tensor, w: AttentionWeights, kv: PagedKV, layer: int, batch: PagedBatch, cfg: ModelConfig
) -> torch.Tensor:
    """Attention of the concatenated tokens x [N, H] of many sequences: projections batched over
    all N tokens, then each sequence attends to its own pages only (all one-token sequences in one
    paged decode call, prefill chunks one by one)."""
    q, k, v = project_qkv(x, w, batch.cos, batch.sin, cfg)
    keys, values = kv.rows(layer)  # [nkv, P*page, hd]
    keys[:, batch.slots] = k.transpose(0, 1)
    if kv.v is not kv.k:  # one tensor for both under latent attention
        values[:, batch.slots] = v.transpose(0, 1)
    if batch.decode_tokens is not None and not batch.chunks:
        out = paged_decode(q, kv, layer, batch, w.window, w.sinks)
    else:
        out = torch.empty_like(q)
        if batch.decode_tokens is not None:
            out[batch.decode_tokens] = paged_decode(q[batch.decode_tokens], kv, layer, batch, w.window, w.sinks)
        for t0, t1, rows, start in batch.chunks:  # [S, nkv, hd] views of this sequence's rows
            ks, vs = keys[:, rows].transpose(0, 1), values[:, rows].transpose(0, 1)
            out[t0:t1] = gqa_attention(q[t0:t1], ks, vs, start, w.window, w.sinks).reshape(t1 - t0, -1, q.shape[-1])
    return w.output(out, cfg)


def paged_decode(q: torch.Tensor, kv: PagedKV, layer: int, batch: PagedBatch, window: int = 0,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the one-token sequences' queries q [B, nh, hd] over their own pages: the C++
    kernel reading the pool in place (float32 pools, no window or sinks), else torch on a gathered
    padded copy (``window``, ``sinks``: see :func:`gqa_attention`)."""
    if kv.k.dtype == torch.float32 and not window and sinks is None:
        keys, values = kv.rows(layer)
        out = paged_decode_attention(q.numpy(), keys.numpy(), values.numpy(), batch.decode_tables,
                                     batch.decode_lens, kv.page_size, q.shape[-1] ** -0.5)
        return torch.from_numpy(out)
    pages = torch.from_numpy(batch.decode_tables.astype(np.int64)).to(q.device)
    lens = torch.from_numpy(batch.decode_lens).to(q.device)[:, None]
    position = torch.arange(pages.shape[1] * kv.page_size, device=q.device)[None, :]
    pad = position >= lens
    if window:
        pad |= position < lens - window
    shape = (kv.k.shape[1], pages.shape[0], -1, kv.k.shape[-1])  # [nkv, B, Pmax*page, hd]
    k_dec, v_dec = (t.view(shape) for t in kv.gather(layer, pages.view(-1)))
    return decode_attention(q, k_dec, v_dec, pad, sinks)


#: Queries from which a prefill chunk attends through torch's fused attention (see gqa_attention).
SDPA_MIN_QUERIES = 16


def _softmax_rows(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of ``scores`` [..., S], each row's denominator also holding its
    sink logit ``sinks`` [...] (gpt-oss's attention sinks: a logit that takes no value) where given."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    joined = torch.cat([scores, sinks.to(scores.dtype)[..., None]], dim=-1)
    return torch.softmax(joined, dim=-1)[..., :-1]


def gqa_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int, window: int = 0,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention of q [T, nh, hd] (positions pos..) over keys/values [S, nkv, hd].
    ``window`` > 0: a query sees only its last ``window`` positions (its own included); ``sinks``
    [nh]: attention-sink logits in every softmax (both gpt-oss; always the matmul path below).

    Few queries (decode): written out with batched matmuls, on the CPU many times faster than
    ``scaled_dot_product_attention(enable_gqa=True)`` (0.04 vs 0.6 ms at S=70). Prefill chunks of
    ``SDPA_MIN_QUERIES`` or more: torch's fused kernel, about twice the speed of the matmuls and a
    materialised mask (30B-A3B heads, 512 queries: 24 vs 45 ms; 512 after 256: 37 vs 68 ms).
    """
    T, nh, hd = q.shape
    S, nkv, _ = keys.shape
    if T >= SDPA_MIN_QUERIES and not window and sinks is None:
        causal = pos == 0 and S == T
        mask = None if causal else \
            torch.arange(S, device=q.device)[None, :] <= (pos + torch.arange(T, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                             values.transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
                                             enable_gqa=True)[0]  # [nh, T, hd]
        return out.transpose(0, 1).reshape(T, nkv, nh // nkv, hd)
    group = nh // nkv
    qg = q.reshape(T, nkv, group, hd).permute(1, 0, 2, 3).reshape(nkv, T * group, hd)
    scores = torch.bmm(qg, keys.permute(1, 2, 0)).mul_(hd**-0.5).float()  # [nkv, T*group, S]
    if T > 1 or window:  # query t (row t*group + g) sees keys 0 .. pos+t (the last `window` of them)
        query_pos = (pos + torch.arange(T, device=q.device))[:, None]
        key_pos = torch.arange(S, device=q.device)[None, :]
        allowed = key_pos <= query_pos
        if window:
            allowed &= key_pos > query_pos - window
        scores.masked_fill_(~allowed.repeat_interleave(group, 0)[None], float("-inf"))
    # sink of row t*group + g of KV head j: head j*group + g
    row_sinks = None if sinks is None else sinks.view(nkv, 1, group).expand(nkv, T, group).reshape(nkv, T * group)
    probs = _softmax_rows(scores, row_sinks).to(values.dtype)
    out = torch.bmm(probs, values.permute(1, 0, 2))  # [nkv, T*group, hd]
    return out.reshape(nkv, T, group, hd).permute(1, 0, 2, 3)  # [T, nkv, group, hd] = [T, nh, hd]


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence: q [B, nh, hd] over its own keys/values [nkv, B, S, hd] (padded to a
    common S; ``pad`` [B, S] True at padding or outside a sliding window) -> [B, nh, hd]. Two
    batched matmuls per KV head over all B sequences; ``sinks`` [nh]: attention-sink logits."""
    B, nh, hd = q.shape
    nkv = keys.shape[0]
    group = nh // nkv
    qg = q.view(B, nkv, group, hd)
    out = torch.empty_like(qg)
    for j in range(nkv):
        scores = torch.bmm(qg[:, j], keys[j].transpose(1, 2)).mul_(hd**-0.5).float()  # [B, group, S]
        scores.masked_fill_(pad[:, None, :], float("-inf"))
        head_sinks = None if sinks is None else sinks[j * group:(j + 1) * group].expand(B, group)
        probs = _softmax_rows(scores, head_sinks).to(values.dtype)
        out[:, j] = torch.bmm(probs, values[j])  # [B, group, hd]
    return out.view(B, nh, hd)


class ExpertBackend(Protocol):
    """Something that computes the routed experts it owns for a batch of tokens."""

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: np.ndarray
    ) -> torch.Tensor:
        """Sum over (token, slot) with ids in ``experts`` of weight * expert(x); returns [T, H]."""
        ...


class Placement(Protocol):
    """Answers where each expert of a layer lives, as backend name -> expert ids it owns."""

    def locate(self, layer: int, experts: np.ndarray, counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Partition ``experts`` (unique selected ids of ``layer``, each routed ``counts``
        tokens) among backends; backends run in the order of the returned dict."""
        ...


@dataclass
class AllOn:
    """The trivial placement: every expert of every layer on one backend."""

    backend: str = "torch"

    def locate(self, layer: int, experts: np.ndarray, counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Everything belongs to ``self.backend``."""
        return {self.backend: experts}


@dataclass(frozen=True, eq=False)
class ExpertMlp:
    """An expert's MLP where it is more than SwiGLU without biases (gpt-oss; see ModelConfig):
    per-expert biases on gate and up (before the activation) and down, and the clamped SwiGLU
    ``(clip(u, -limit, limit) + 1) * g' * sigmoid(alpha g')``, ``g' = min(g, limit)`` (``limit`` > 0).
    The torch form of what the C++ engine computes (``CpuExperts.set_mlp``)."""

    limit: float = 0.0
    alpha: float = 1.702
    gate_bias: torch.Tensor | None = None  # [E, I]
    up_bias: torch.Tensor | None = None  # [E, I]
    down_bias: torch.Tensor | None = None  # [E, H]

    def hidden(self, g: torch.Tensor, u: torch.Tensor, expert: int) -> torch.Tensor:
        """The activation of gate and up outputs [T, I] of ``expert``."""
        if self.gate_bias is not None:
            g = g + self.gate_bias[expert].to(g.dtype)
        if self.up_bias is not None:
            u = u + self.up_bias[expert].to(u.dtype)
        if self.limit <= 0:
            return F.silu(g) * u
        g = g.clamp(max=self.limit)
        return (u.clamp(-self.limit, self.limit) + 1) * (g * torch.sigmoid(self.alpha * g))

    def output(self, y: torch.Tensor, expert: int) -> torch.Tensor:
        """Down's output [T, H] of ``expert`` with its bias."""
        return y if self.down_bias is None else y + self.down_bias[expert].to(y.dtype)

    def expert(self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               expert: int) -> torch.Tensor:
        """Expert ``expert``'s output [T, H] for rows x [T, H], from its float matrices gate, up
        [I, H] and down [H, I]."""
        return self.output(F.linear(self.hidden(F.linear(x, gate), F.linear(x, up), expert), down), expert)

    def attach(self, experts) -> None:
        """Give the C++ engine (``ktlab.kernels.CpuExperts``) this form."""
        def arr(t: torch.Tensor | None):
            return None if t is None else t.float().numpy()

        experts.set_mlp(clamped=self.limit > 0, alpha=self.alpha, limit=self.limit,
                        gate_bias=arr(self.gate_bias), up_bias=arr(self.up_bias), down_bias=arr(self.down_bias))


#: Plain SwiGLU without biases (every family but gpt-oss).
SWIGLU = ExpertMlp()


class TorchExperts:
    """A stacked expert layer computed with torch: SwiGLU down(silu(gate x) * up x), or the
    ``mlp`` form (biases, clamped SwiGLU)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, mlp: ExpertMlp = SWIGLU) -> None:
        self.gate = gate  # [E, I, H]
        self.up = up  # [E, I, H]
        self.down = down  # [E, H, I]
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: np.ndarray
    ) -> torch.Tensor:
        """See ``ExpertBackend.forward``; tokens are grouped per expert."""
        out = torch.zeros_like(x)
        for e in experts.tolist():
            token_idx, slot = torch.where(ids == e)
            if token_idx.numel() == 0:
                continue
            y = self.mlp.expert(x[token_idx], self.gate[e], self.up[e], self.down[e], e)
            out.index_add_(0, token_idx, y * weights[token_idx, slot, None].to(x.dtype))
        return out


class GatedMLP:
    """SwiGLU down(silu(gate x) * up x) that every token goes through: a shared expert (Qwen2-MoE,
    DeepSeek, GLM), scaled per token by sigmoid(x . g) where the family gates it, or the MLP of a
    dense layer. Its matrices are :class:`Linear` (block-format matmuls on Q8_0 / K-quant files)."""

    def __init__(self, gate: Linear, up: Linear, down: Linear, gate_inp: torch.Tensor | None = None) -> None:
        self.gate, self.up, self.down = gate, up, down  # [S, H], [S, H], [H, S]
        self.gate_inp = gate_inp  # [H] or None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        y = self.down(F.silu(self.gate(x)) * self.up(x))
        if self.gate_inp is None:
            return y
        if row_kernels_apply(x, self.gate_inp):  # each token's gate on its own, whatever the batch
            logit = torch.from_numpy(f32_matmul(self.gate_inp.numpy()[None], x.numpy()))
        else:
            logit = x @ self.gate_inp[:, None]
        return y * torch.sigmoid(logit)

    def parts(self) -> list:
        """Its weights (Linear and tensors), for byte counts."""
        return [self.gate, self.up, self.down, *([self.gate_inp] if self.gate_inp is not None else [])]


@dataclass
class Routing:
    """How a router's logits choose experts, beyond Qwen3's softmax top-k (see ModelConfig):
    sigmoid scores, a per-expert bias for the choice only, group-limited top-k, a scale."""

    sigmoid: bool = False
    bias: torch.Tensor | None = None  # [E]
    groups: int = 1
    topk_groups: int = 1
    scale: float = 1.0
    logit_bias: torch.Tensor | None = None  # [E]: the router's own bias (gpt-oss), on the logits

    def choose(self, logits: torch.Tensor, top_k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [T, k] and weights [T, k] (float32) of router logits [T, E], as Hugging Face's
        DeepSeek-V3 / GLM-4.5 routers do (a group scored by its two best sigmoid scores) and
        DeepSeek-V2's group-limited greedy one (softmax; a group scored by its best); gpt-oss's
        softmax over the top-k of biased logits is the softmax, top-k and renormalisation. Every row
        on its own (batch-independent)."""
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        scores = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
        choice = scores if self.bias is None else scores + self.bias
        if self.groups > 1:
            T, E = choice.shape
            grouped = choice.view(T, self.groups, E // self.groups)
            group_scores = grouped.topk(2 if self.sigmoid else 1, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_groups, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(E // self.groups, dim=1), float("-inf"))
        ids = choice.topk(top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if self.sigmoid else 0.0))
        return ids, weights * self.scale if self.scale != 1.0 else weights


RouteObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


class DeferredSum:
    """Parts of an expert sum (tensors, or callables that wait for a submitted C++ call): what
    :meth:`MoEBlock.forward` returns for the deferred experts, added to the next layer's output."""

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def result(self) -> torch.Tensor | None:
        """Wait for the parts and add them in order (None when there are none)."""
        out = None
        for part in self.parts:
            part = part if isinstance(part, torch.Tensor) else part()
            out = part if out is None else out + part
        self.parts = [] if out is None else [out]
        return out


@dataclass
class MoEBlock:
    """Router + routed experts of one layer; placement decides which backend runs which expert."""

    layer: int
    router: torch.Tensor  # [E, H]
    top_k: int
    norm_topk_prob: bool
    backends: dict[str, ExpertBackend]
    placement: Placement
    observers: list[RouteObserver] = field(default_factory=list)
    routing: Routing | None = None  # None: softmax over all experts, top-k (Qwen3, Mixtral, OLMoE)
    mlp: ExpertMlp = SWIGLU  # each expert's MLP form (biases, clamped SwiGLU: gpt-oss), for every backend
    #: Where gradients must flow (training; ``ktlab.train``): (x, ids, weights) -> the experts' sum as
    #: a differentiable function of x and weights. Used instead of the backends while grad is enabled.
    autograd_experts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    #: Each called with (layer, the residual stream h [T, H]) before the layer routes: what predicts
    #: the next layers' experts from this hidden state (``ktlab.model.lookahead.RouterLookahead``).
    lookaheads: list[Callable[[int, torch.Tensor], None]] = field(default_factory=list)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [T, k] and their weights [T, k] (float32)."""
        rows = row_kernels_apply(x, self.router)  # C++ rows: batch-independent, no torch op per step
        logits = torch.from_numpy(f32_matmul(self.router.numpy(), x.numpy())) if rows else \
            F.linear(x, self.router).float()
        if self.routing is not None:
            return self.routing.choose(logits, self.top_k, self.norm_topk_prob)
        if rows:
            ids, weights = route_topk(logits.numpy(), self.top_k, self.norm_topk_prob)
            return torch.from_numpy(ids), torch.from_numpy(weights)
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    def forward(self, x: torch.Tensor, defer: int = 0) -> tuple[torch.Tensor, DeferredSum | None]:
        """x [T, H] -> (weighted sum of the selected experts' outputs [T, H], deferred part).

        ``defer`` > 0: the ``defer`` lowest-weight experts of every token are computed apart and
        returned as a :class:`DeferredSum` for the caller to add one layer late (KTransformers'
        expert deferral): the placement is asked once for the layer, the kept experts are summed
        now, and the deferred ones are started on the same backends (the C++ engine's share
        submitted, so it runs while the next layer's dense part does); else None.
        """
        ids, weights = self.route(x)
        if defer <= 0:
            return self.forward_routed(x, ids, weights), None
        self._observe(ids, weights)
        order = torch.argsort(weights, dim=-1, descending=True, stable=True)  # heaviest first
        ids, weights = ids.gather(1, order), weights.gather(1, order)
        n = self.top_k - defer
        if self.autograd_experts is not None and torch.is_grad_enabled():
            keep = (torch.arange(self.top_k, device=weights.device) < n).to(weights.dtype)
            return (self.autograd_experts(x, ids, weights * keep),
                    DeferredSum([self.autograd_experts(x, ids, weights * (1 - keep))]))
        calls = self._located_calls(ids)
        now = DeferredSum(self._start(calls, x, ids[:, :n], weights[:, :n])).result()
        later = DeferredSum(self._start(calls, x, ids[:, n:], weights[:, n:], overlap=True))
        return now if now is not None else torch.zeros_like(x), later

    def forward_routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the experts already chosen (``ids``, ``weights`` [T, k] from
        :meth:`route` or a fused kernel that routed); observers see the choice first."""
        self._observe(ids, weights)
        return self._experts(x, ids, weights)

    def _observe(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        if self.observers:  # observers read host tensors (a model on an accelerator routes there)
            ids, weights = ids.cpu(), weights.cpu()
        for observe in self.observers:
            observe(self.layer, ids, weights)

    def _experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The backends' sums, added in placement order. Where several backends share the work
        (hybrid), those that can :meth:`submit` (the C++ engine) start first and compute while the
        others (an accelerator's resident experts) run, as KTransformers overlaps them."""
        if self.autograd_experts is not None and torch.is_grad_enabled():
            return self.autograd_experts(x, ids, weights)
        out = DeferredSum(self._start(self._located_calls(ids), x, ids, weights)).result()
        return out if out is not None else torch.zeros_like(x)

    def _located_calls(self, ids: torch.Tensor) -> list[tuple[ExpertBackend, np.ndarray]]:
        """Ask the placement once where this layer's selected experts (``ids`` [T, k]) run."""
        counts = np.bincount(ids.cpu().numpy().ravel())  # as np.unique(return_counts=True), 4x cheaper
        selected = np.flatnonzero(counts)
        return self._calls(self.placement.locate(self.layer, selected, counts[selected]))

    @staticmethod
    def _start(calls: list[tuple[ExpertBackend, np.ndarray]], x: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor, overlap: bool | None = None) -> list:
        """Run ``calls`` on (ids, weights): backends that can :meth:`submit` start first when several
        share the work (or ``overlap``), the others compute meanwhile; returns the parts (tensors, or
        callables that wait for a submitted sum)."""
        overlap = len(calls) > 1 if overlap is None else overlap
        parts: list = [backend.submit(x, ids, weights, experts) if overlap and hasattr(backend, "submit") else None
                       for backend, experts in calls]
        for i, (backend, experts) in enumerate(calls):
            if parts[i] is None:
                parts[i] = backend.forward(x, ids, weights, experts)
        return parts

    def _calls(self, located: dict[str, np.ndarray]) -> list[tuple[ExpertBackend, np.ndarray]]:
        """(backend, expert ids) to run, in placement order. Backends that compute on the same
        engine (the simulated GPU shares the CPU's C++ experts) run as one call with the union of
        their ids, so a token's sum over its experts is added in the same order as with all
        experts on one backend: the split changes where experts run, never the numbers."""
        calls: dict[int, tuple[ExpertBackend, list[np.ndarray]]] = {}
        for name, experts in located.items():
            if len(experts) == 0:
                continue
            backend = self.backends[name]
            engine = id(getattr(backend, "experts", backend))
            calls.setdefault(engine, (backend, []))[1].append(np.asarray(experts))
        return [(backend, parts[0] if len(parts) == 1 else np.sort(np.concatenate(parts)))
                for backend, parts in calls.values()]
