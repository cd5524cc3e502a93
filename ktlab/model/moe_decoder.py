"""The MoE decoder every supported family runs on: pre-norm layers of attention and a routed MoE
(plus a shared expert where the family has one), assembled from a :class:`ModelConfig`'s
features and GGUF-named weights (``ktlab.model.arch_common``).

Where the layers are Qwen3-MoE's exactly (``ModelConfig.qwen3_layout``) a decode step runs as
one C++ call; other layouts run layer by layer on the same kernels (q/k/v biases, whole-width
q/k norms and shared experts in torch around them).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import torch

from ktlab.config import ModelConfig
from ktlab.kernels import CpuExperts, DecodeLayerWeights, DecodeModel, QMatrix, decode_attention_block
from ktlab.model.arch_common import norm_rope_rows, stored_name
from ktlab.model.cpu_experts import CpuExpertBackend, build_cpu_experts
from ktlab.model.layers import (
    SWIGLU,
    AllOn,
    AttentionWeights,
    DeferredSum,
    ExpertBackend,
    ExpertMlp,
    FusedLinear,
    GatedMLP,
    KVCache,
    LatentAttentionWeights,
    Linear,
    MoEBlock,
    PagedBatch,
    PagedKV,
    Placement,
    Rope,
    Routing,
    SeqSlice,
    TorchExperts,
    attention,
    paged_attention,
    plain_torch,
    rms_norm,
    row_kernels_apply,
    torch_threads,
)
from ktlab.model.rope_freqs import rope_inv_freq, softmax_scale
from ktlab.model.weights import WeightSource


class DecoderLayer:
    """Pre-norm block ``index``: x + attn(norm(x)), then h + moe(norm(h)) (+ shared(norm(h)) where
    the family has a shared expert). A dense layer (``moe`` None) has only ``shared``: its MLP."""

    def __init__(self, cfg: ModelConfig, index: int, attn: AttentionWeights, attn_norm: torch.Tensor,
                 ffn_norm: torch.Tensor, moe: MoEBlock | None, shared: GatedMLP | None = None) -> None:
        self.cfg, self.attn, self.attn_norm, self.ffn_norm, self.moe = cfg, attn, attn_norm, ffn_norm, moe
        self.index, self.shared = index, shared

    def forward(self, x: torch.Tensor, cache: KVCache | None, rope: Rope, defer: int = 0,
                pending: DeferredSum | None = None) -> tuple[torch.Tensor, DeferredSum | None]:
        """x [T, H] -> ([T, H], this layer's deferred expert output or None). ``cache`` None: a
        whole sequence from position 0, no cache (training).

        ``pending``: the previous layer's deferred expert output, added to this layer's output
        (KTransformers' expert deferral: those experts finish while this layer runs).
        """
        eps = self.cfg.rms_norm_eps
        h = x + attention(rms_norm(x, self.attn_norm, eps), self.attn, cache, self.index, rope, self.cfg)
        return self._moe(h, defer, pending)

    def forward_batch(self, x: torch.Tensor, kv: PagedKV, batch: PagedBatch) -> torch.Tensor:
        """x [N, H]: the concatenated tokens of ``batch.seqs`` -> [N, H]. Dense projections and the
        MoE run once over all N tokens (each expert's weights read once); attention per sequence.
        A decode step (one token per sequence) of a Q8_0 / K-quant float32 model runs its attention half
        as one C++ call (:func:`ktlab.kernels.decode_attention_block`: the same kernels in the
        same order, so the same bits, without the Python between them)."""
        if self._fused_decode_applies(x, kv, batch):
            h, hn, ids, weights = self._fused_decode_attention(x, kv, batch)
            for lookahead in self.moe.lookaheads:
                lookahead(self.moe.layer, h)
            experts = self._experts_of_all()
            if experts is None:
                h = h + self.moe.forward_routed(hn, ids, weights)
                return h if self.shared is None else h + self.shared(hn)
            for observe in self.moe.observers:  # as forward_routed: they see the choice
                observe(self.moe.layer, ids, weights)
            experts.forward_add(hn.numpy(), ids.numpy(), weights.numpy(), h.numpy())  # h += experts, in place
            return h if self.shared is None else h + self.shared(hn)
        h = x + paged_attention(rms_norm(x, self.attn_norm, self.cfg.rms_norm_eps), self.attn, kv,
                                self.index, batch, self.cfg)
        return self._moe(h, 0, None)[0]

    def dense_parts(self, fused: bool = False) -> list:
        """What a step reads of this layer besides its routed experts: projections (the fused
        q/k/v matrix where there is one and ``fused``), their biases, norms, router and the shared
        expert, as :class:`Linear` / :class:`FusedLinear` / tensors."""
        router = self.moe.router if self.moe is not None else None
        parts = [*self.attn.parts(fused), self.attn_norm, self.ffn_norm, router]
        if self.shared is not None:
            parts += self.shared.parts()
        return [p for p in parts if p is not None]

    def _fused_decode_applies(self, x: torch.Tensor, kv: PagedKV, batch: PagedBatch) -> bool:
        a = self.attn
        return (self.moe is not None and self.cfg.cpp_attention_block and batch.decode_tokens is not None
                and not batch.chunks and a.qkv is not None and a.wo.qmat is not None
                and row_kernels_apply(x, kv.k, self.attn_norm, self.ffn_norm, a.q_norm, a.k_norm, self.moe.router))

    def _experts_of_all(self) -> CpuExperts | None:
        """The C++ experts, when every expert of this layer runs there (placement ``AllOn`` a
        ``CpuExpertBackend``): a decode step then adds their output in one call (the same kernel
        and add as ``forward_routed``, without the Python between). None for any other placement."""
        if self.moe is None:
            return None
        placement = self.moe.placement
        if type(placement) is not AllOn:
            return None
        backend = self.moe.backends.get(placement.backend)
        return backend.experts if type(backend) is CpuExpertBackend else None

    def _fused_decode_attention(self, x: torch.Tensor, kv: PagedKV,
                                batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, a = self.cfg, self.attn
        keys, values = kv.rows(self.index)
        h, hn, ids, weights = decode_attention_block(
            x.numpy(), self.attn_norm.numpy(), a.qkv.mats, a.q_norm.numpy(), a.k_norm.numpy(), a.wo.qmat,
            self.ffn_norm.numpy(), self.moe.router.numpy(), cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps,
            batch.cos.numpy(), batch.sin.numpy(), keys.numpy(), values.numpy(), batch.slots.numpy(),
            batch.decode_tables, batch.decode_lens, kv.page_size, self.moe.top_k, self.moe.norm_topk_prob)
        return tuple(torch.from_numpy(t) for t in (h, hn, ids, weights))

    def _moe(self, h: torch.Tensor, defer: int,
             pending: DeferredSum | None) -> tuple[torch.Tensor, DeferredSum | None]:
        hn = rms_norm(h, self.ffn_norm, self.cfg.rms_norm_eps)
        if self.moe is None:  # a dense layer; the previous layer's deferred experts join here
            h = h + self.shared(hn)
            return (h if pending is None else h + pending.result()), None
        for lookahead in self.moe.lookaheads:  # predictions of the next layers' experts, from this hidden state
            lookahead(self.moe.layer, h)
        out, deferred = self.moe.forward(hn, defer)
        h = h + out if self.shared is None else h + out + self.shared(hn)
        return (h if pending is None else h + pending.result()), deferred


def latent_attention(p: str, cfg: ModelConfig, t, linear) -> LatentAttentionWeights:
    """Block ``p``'s latent attention from llama.cpp's deepseek2 tensors: q (``attn_q`` or
    ``attn_q_a``/``_norm``/``attn_q_b``), ``attn_kv_a_mqa``, ``attn_kv_a_norm``, the expansion split
    as ``attn_k_b`` [nh, kv_lora, nope] and ``attn_v_b`` [nh, v, kv_lora] (current converters; the
    shape check refuses files with one ``attn_kv_b``), ``attn_output``. RoPE rows (stored in
    adjacent pairs) go to NeoX order."""
    nh, hd, rope, lora = cfg.num_heads, cfg.head_dim, cfg.rope_dim, cfg.kv_lora_rank
    nope = hd - rope
    pair = norm_rope_rows(1, rope) if cfg.rope_style == "norm" else np.arange(rope)
    q_rows = (np.arange(nh)[:, None] * hd + np.concatenate([np.arange(nope), nope + pair])[None, :]).reshape(-1)
    kv_a_rows = np.concatenate([np.arange(lora), lora + pair])
    if cfg.q_lora_rank:
        q, q_a, q_a_norm, q_b = (None, linear(p + "attn_q_a.weight"), t(p + "attn_q_a_norm.weight"),
                                 linear(p + "attn_q_b.weight", q_rows))
    else:
        q, q_a, q_a_norm, q_b = linear(p + "attn_q.weight", q_rows), None, None, None
    return LatentAttentionWeights(q, q_a, q_a_norm, q_b, linear(p + "attn_kv_a_mqa.weight", kv_a_rows),
                                  t(p + "attn_kv_a_norm.weight"), t(p + "attn_k_b.weight"), t(p + "attn_v_b.weight"),
                                  linear(p + "attn_output.weight"),
                                  softmax_scale(cfg) * cfg.cache_head_dim**0.5)


def _tensors_of(part) -> list[torch.Tensor | None]:
    """The torch tensors of a dense part (a Linear's weight and bias, a GatedMLP's, a tensor)."""
    if isinstance(part, torch.Tensor):
        return [part]
    if isinstance(part, Linear):
        return [part.weight, part.bias]
    return [t for sub in getattr(part, "parts", lambda: [])() for t in _tensors_of(sub)]


def _bytes_of(w) -> list[np.ndarray]:
    """A weight's bytes as the kernels read them (a block-format matrix's blocks, else the
    tensor), as 1-D uint8 views."""
    mats = getattr(w, "mats", None) or ([w.qmat] if getattr(w, "qmat", None) is not None else [])
    if mats:
        return [np.ascontiguousarray(m.data).reshape(-1).view(np.uint8) for m in mats]
    t = w.weight if hasattr(w, "weight") else w
    return [t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()]


EXPERT_ENGINES = ("cpu", "torch")
#: GGUF types whose dense matrices (attention, LM head) run on the C++ block kernels (QMatrix).
DENSE_FORMAT_OF_QTYPE = {"Q8_0": "q8_0", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k", "MXFP4": "mxfp4"}


class MoEDecoder:
    """An MoE decoder (any supported family) in torch and the C++ kernels. Experts come from
    per-layer backends chosen by a ``Placement``.

    ``experts="cpu"`` (default): every expert runs in the C++ engine on its stored blocks;
    ``experts="torch"``: dequantized float weights in torch (the reference path).
    """

    #: A decode step of :meth:`forward_batch` (one new token per sequence) runs as one C++ call
    #: (:class:`~ktlab.kernels.DecodeModel`) where every layer's experts are on the C++ engine and
    #: the dense weights in a block format: the same bits as layer by layer. False: layer by layer (tests, A/B).
    fused_decode_step: bool = True
    #: Per-layer tensor suffixes a family's files name otherwise (canonical -> theirs), e.g.
    #: GLM-4.5's ``post_attention_norm.weight`` for ``ffn_norm.weight``.
    tensor_renames: Mapping[str, str] = MappingProxyType({})

    def __init__(
        self,
        cfg: ModelConfig,
        weights: WeightSource,
        dtype: torch.dtype = torch.float32,
        experts: str = "cpu",
        placement: Placement | None = None,
        extra_backends: list[dict[str, ExpertBackend]] | None = None,
        isa: str | None = None,
        threads: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if experts not in EXPERT_ENGINES:
            raise ValueError(f"experts must be one of {', '.join(EXPERT_ENGINES)}, got {experts!r}")
        self.cfg, self.dtype, self.experts = cfg, dtype, experts
        # device: every dense part (embeddings, attention, norms, routers, shared experts, head) and the
        # KV cache there, in plain torch at ``dtype`` (dequantized once); routed experts stay where the
        # placement puts them (the C++ engine for "cpu"). None: dense on the CPU block kernels.
        self.device = torch.device(device) if device is not None else None
        dense_device = self.device or torch.device("cpu")
        self.deferral = 0  # experts per token whose output joins one layer late (0: exact model)
        self._decode_model: tuple[list[CpuExperts], DecodeModel] | None = None  # (its expert engines, it)
        self.placement = placement or AllOn(experts)

        def stored(name: str) -> str:  # the name in this family's files
            return stored_name(name, self.tensor_renames)

        def t(name: str) -> torch.Tensor:
            array = weights.tensor(stored(name))
            return torch.from_numpy(array if array.flags.writeable else array.copy()).to(dense_device, dtype)

        def linear(name: str, rows: np.ndarray | None = None) -> Linear:
            """The matrix ``name`` (its rows reordered by ``rows`` where given), block-format
            when the engine has kernels for its type (dense on the CPU only)."""
            kernels = experts == "cpu" and self.device is None and hasattr(weights, "raw")
            raw = weights.raw(stored(name)) if kernels else None
            fmt = DENSE_FORMAT_OF_QTYPE.get(raw.qtype.name) if raw is not None else None
            weight, bias = t(name), optional(name.removesuffix(".weight") + ".bias")
            qmat = None
            if fmt is not None:
                blocks = np.ascontiguousarray(raw.data).reshape(int(raw.shape[0]), -1)
                qmat = QMatrix(np.ascontiguousarray(blocks[rows]) if rows is not None else blocks, fmt, isa, threads)
            if rows is not None:
                order = torch.from_numpy(rows).to(dense_device)
                weight, bias = weight[order], (bias[order] if bias is not None else None)
            return Linear(weight, qmat, bias)

        def optional(name: str) -> torch.Tensor | None:
            return t(name) if weights.has_tensor(stored(name)) else None

        self.embed = t("token_embd.weight")  # [V, H]
        self.lm_head = linear("output.weight" if weights.has_tensor("output.weight") else "token_embd.weight")
        self.norm = t("output_norm.weight")
        inv_freq, rope_scale = rope_inv_freq(cfg)
        self.rope = Rope(cfg.rotary_dim, cfg.rope_theta, dtype, inv_freq, rope_scale, dense_device)
        # q/k rows stored for llama.cpp's adjacent-pair RoPE go back to NeoX order once, here.
        qk_rows = [None, None, None] if cfg.rope_style == "neox" or cfg.mla else [
            norm_rope_rows(cfg.num_heads, cfg.head_dim), norm_rope_rows(cfg.num_kv_heads, cfg.head_dim), None]
        routing = None if cfg.softmax_routing else Routing(cfg.router == "sigmoid", None, cfg.router_groups,
                                                            cfg.router_topk_groups, cfg.routed_scale)

        def layer_routing(p: str) -> Routing | None:
            if routing is None:
                return None
            return dataclasses.replace(routing, bias=t(p + "exp_probs_b.bias") if cfg.router_bias else None,
                                       logit_bias=t(p + "ffn_gate_inp.bias") if cfg.router_logit_bias else None)

        def expert_mlp(p: str) -> ExpertMlp:
            if not cfg.expert_mlp_differs:
                return SWIGLU
            gate, up, down = (t(p + f"ffn_{kind}_exps.bias") if cfg.expert_bias else None for kind in parts)
            return ExpertMlp(cfg.swiglu_limit, cfg.swiglu_alpha, gate, up, down)

        parts = ("gate", "up", "down")
        self.layers: list[DecoderLayer] = []
        for i in range(cfg.num_layers):
            p = f"blk.{i}."
            if cfg.mla:
                attn = latent_attention(p, cfg, t, linear)
            else:
                wq, wk, wv = (linear(p + f"attn_{n}.weight", rows) for n, rows in zip("qkv", qk_rows, strict=True))
                fused = FusedLinear([wq, wk, wv]) if all(lin.qmat is not None for lin in (wq, wk, wv)) else None
                attn = AttentionWeights(wq, wk, wv, linear(p + "attn_output.weight"),
                                        optional(p + "attn_q_norm.weight"), optional(p + "attn_k_norm.weight"), fused,
                                        t(p + "attn_sinks.weight") if cfg.attn_sinks else None, cfg.layer_window(i))
            moe, shared = None, None
            if i < cfg.first_dense_layers:  # a dense layer: its MLP, no experts
                shared = GatedMLP(*(linear(p + f"ffn_{kind}.weight") for kind in parts))
            else:
                j = i - cfg.first_dense_layers  # the MoE layer's index in every per-layer expert table
                backends: dict[str, ExpertBackend] = dict(extra_backends[j]) if extra_backends else {}
                mlp = expert_mlp(p)
                if experts == "torch":  # on the dense device (all experts there)
                    backends["torch"] = TorchExperts(*(t(p + f"ffn_{kind}_exps.weight") for kind in parts), mlp)
                elif experts == "cpu":
                    engine = build_cpu_experts(weights, i, isa=isa, threads=threads)
                    if mlp is not SWIGLU:
                        mlp.attach(engine)
                    backends["cpu"] = CpuExpertBackend(engine)
                moe = MoEBlock(j, t(p + "ffn_gate_inp.weight"), cfg.num_experts_per_tok, cfg.norm_topk_prob,
                               backends, self.placement, routing=layer_routing(p), mlp=mlp)
                if cfg.shared_expert_size:
                    gate = optional(p + "ffn_gate_inp_shexp.weight") if cfg.shared_expert_gate else None
                    shared = GatedMLP(*(linear(p + f"ffn_{kind}_shexp.weight") for kind in parts), gate)
            self.layers.append(DecoderLayer(cfg, i, attn, t(p + "attn_norm.weight"), t(p + "ffn_norm.weight"), moe,
                                            shared))

    def dense_weight_bytes(self) -> int:
        """Bytes of non-expert weights every step reads, as the model holds them: attention
        projections, routers, norms and the head (the embedding table is only indexed)."""
        parts = [self.lm_head, self.norm, *(p for layer in self.layers for p in layer.dense_parts())]
        return sum(r.nbytes for part in parts for r in _bytes_of(part))

    def weight_regions(self, selected: list[np.ndarray]) -> list[np.ndarray]:
        """The weight bytes a decode step reads, as 1-D uint8 views where they live: the dense
        weights of :meth:`dense_weight_bytes` (the fused q/k/v matrix where the layer has one)
        and each layer's ``selected`` experts. For ``ktlab.serve.roofline.PairedReads``.

        Raises ValueError unless every expert of every layer runs on the C++ engine."""
        if len(selected) != self.cfg.num_moe_layers:
            raise ValueError(f"{len(selected)} expert selections for {self.cfg.num_moe_layers} MoE layers")
        regions = [*_bytes_of(self.lm_head), *_bytes_of(self.norm)]
        chosen = iter(selected)
        for layer in self.layers:
            regions += [r for part in layer.dense_parts(fused=True) for r in _bytes_of(part)]
            if layer.moe is None:
                continue
            engine = layer._experts_of_all()
            if engine is None:
                raise ValueError("paired reads need every expert on the CPU engine "
                                 "(no hybrid placement, no torch experts)")
            regions += engine.expert_regions(next(chosen))
        return regions

    def moe_blocks(self) -> list[MoEBlock]:
        """The routed-expert block of every layer, in order (see ``ktlab.model.base.MoEModel``)."""
        return [layer.moe for layer in self.layers if layer.moe is not None]

    def expert_bytes(self) -> int:
        """Stored bytes of one expert (gate, up and down) of a layer."""
        first = self.moe_blocks()[0]
        backend = first.backends.get("cpu")
        if backend is not None:
            return int(backend.experts.expert_bytes)
        torch_experts = first.backends["torch"]
        return sum(t[0].numel() * t.element_size() for t in (torch_experts.gate, torch_experts.up,
                                                             torch_experts.down))

    def new_cache(self, max_len: int) -> KVCache:
        """An empty KV cache for one sequence of up to ``max_len`` tokens (on the dense device)."""
        if max_len > self.cfg.context_length:
            raise ValueError(f"max_len {max_len} exceeds the model's context length {self.cfg.context_length}")
        return KVCache.allocate(self.cfg, max_len, self.dtype, self.rope.device)

    def new_paged_kv(self, num_pages: int, page_size: int) -> PagedKV:
        """A pool of KV pages for ``Model.forward_batch`` (see ``ktlab.serve.kv``), on the dense device."""
        return PagedKV.allocate(self.cfg, num_pages, page_size, self.dtype, self.rope.device)

    def device_dense_bytes(self) -> int:
        """Bytes the dense part holds on the accelerator (``device``): every dense tensor, the
        embedding table included; 0 when the dense part runs on the CPU."""
        if self.device is None:
            return 0
        tensors = [self.embed, self.lm_head.weight, self.lm_head.bias, self.norm,
                   *(t for layer in self.layers for part in layer.dense_parts() for t in _tensors_of(part))]
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors if t is not None}.values())

    def add_route_observer(self, observer) -> None:
        """Call ``observer(layer, ids [T, k], weights [T, k])`` after every routing decision."""
        for moe in self.moe_blocks():
            moe.observers.append(observer)

    def remove_route_observer(self, observer) -> None:
        """Undo ``add_route_observer``."""
        for moe in self.moe_blocks():
            if observer in moe.observers:
                moe.observers.remove(observer)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Logits (float32) for ``tokens`` [T] appended at cache.length; [T, V] or [1, V] if last_only."""
        T = tokens.shape[0]
        if cache.length + T > cache.capacity:
            raise ValueError(f"sequence of {cache.length + T} tokens exceeds the KV cache ({cache.capacity})")
        with torch_threads(1 if T == 1 else torch.get_num_threads()), self._device_mode():
            x = self.embed[tokens.to(self.embed.device)]
            pending = None
            for layer in self.layers:
                x, pending = layer.forward(x, cache, self.rope, self.deferral, pending)
            if pending is not None:  # the last layer's deferred experts join before the head
                x = x + pending.result()
            cache.length += T
            if last_only:
                x = x[-1:]
            return self.lm_head(rms_norm(x, self.norm, self.cfg.rms_norm_eps)).float().cpu()

    def forward_train(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] (float32) of one whole sequence from position 0, differentiable (no cache, no
        ``inference_mode``): for fine-tuning a model whose dense part is torch (``device=``); the MoE
        blocks need ``autograd_experts`` (``ktlab.train``) for gradients through their experts."""
        if self.device is None:
            raise ValueError("forward_train needs the dense part in torch: load the model with device='cpu'")
        if tokens.shape[0] > self.cfg.context_length:
            raise ValueError(f"{tokens.shape[0]} tokens exceed the model's context length {self.cfg.context_length}")
        with self._device_mode():
            x = self.embed[tokens.to(self.embed.device)]
            for layer in self.layers:
                x = layer.forward(x, None, self.rope)[0]  # no cache: the sequence attends to itself
            return self.lm_head(rms_norm(x, self.norm, self.cfg.rms_norm_eps)).float()

    @torch.inference_mode()
    def forward_batch(self, tokens: torch.Tensor, seqs: list[SeqSlice], kv: PagedKV,
                      threads: int | None = None) -> torch.Tensor:
        """Logits (float32) [S, V] of the last token of each of the S sequences in ``seqs``.

        ``tokens`` [N] are the sequences' new tokens concatenated in order (N = sum of n_tokens);
        sequence s attends to its positions 0 .. start+n_tokens-1 in its pages of ``kv``, and its
        new keys/values are written there. One call, whatever the mix of prefill chunks and decode
        tokens: the MoE engine groups all N tokens by expert. Dense projections, norms, RoPE, routers
        and decode attention compute each token's row on its own, so a sequence's logits do not
        depend on what else is in the batch (bit for bit for decode steps). ``threads``:
        torch intra-op threads for the call (None: one for small calls, all for big ones).
        """
        if self.deferral:
            raise ValueError("forward_batch needs the exact model (model.deferral must be 0)")
        N = tokens.shape[0]
        if sum(s.n_tokens for s in seqs) != N or any(s.n_tokens <= 0 for s in seqs):
            raise ValueError(f"{N} tokens do not match the sequences' n_tokens {[s.n_tokens for s in seqs]}")
        end = max(s.start + s.n_tokens for s in seqs)
        if end > self.cfg.context_length:
            raise ValueError(f"position {end} exceeds the model's context length {self.cfg.context_length}")
        batch = PagedBatch.build(seqs, kv.page_size, self.rope)
        with torch_threads(threads or (1 if N <= 32 else torch.get_num_threads())), self._device_mode():
            x = self.embed[tokens.to(self.embed.device)]  # [N, H]
            if batch.decode_tokens is not None and not batch.chunks:
                logits = self._decode_step(x, kv, batch)
                if logits is not None:
                    return logits
            for layer in self.layers:
                x = layer.forward_batch(x, kv, batch)
            last = torch.cumsum(torch.tensor([s.n_tokens for s in seqs]), 0).to(x.device) - 1
            return self.lm_head(rms_norm(x[last], self.norm, self.cfg.rms_norm_eps)).float().cpu()

    def _device_mode(self):
        """Plain torch for the dense part when it lives on an accelerator (see ``plain_torch``)."""
        return plain_torch() if self.device is not None else contextlib.nullcontext()

    def _decode_step(self, x: torch.Tensor, kv: PagedKV, batch: PagedBatch) -> torch.Tensor | None:
        """Logits [B, V] of a decode step as one C++ call; the route observers are then shown each
        layer's choice, in layer order. None where the step cannot run that way."""
        model = self._whole_decode_model()
        if model is None or not row_kernels_apply(x, kv.k, kv.v):
            return None
        L, nkv, _, _, hd = kv.k.shape
        logits, ids, weights = model.step(
            x.numpy(), batch.cos.numpy(), batch.sin.numpy(), kv.k.view(L, nkv, -1, hd).numpy(),
            kv.v.view(L, nkv, -1, hd).numpy(), batch.slots.numpy(), batch.decode_tables, batch.decode_lens,
            kv.page_size)
        for moe, layer_ids, layer_weights in zip(self.moe_blocks(), ids, weights, strict=True):
            if moe.observers:
                chosen, weighted = torch.from_numpy(layer_ids), torch.from_numpy(layer_weights)
                for observe in moe.observers:
                    observe(moe.layer, chosen, weighted)
        return torch.from_numpy(logits)

    def _whole_decode_model(self) -> DecodeModel | None:
        """The :class:`~ktlab.kernels.DecodeModel` of this model as it is placed now (built once per
        set of expert engines); None when ``fused_decode_step`` is off or some layer's experts are
        not all on the C++ engine, or the dense weights are not in a block format / float32."""
        if not self.fused_decode_step or self.lm_head.qmat is None or not self.cfg.qwen3_layout:
            return None
        engines = [layer._experts_of_all() for layer in self.layers]
        if any(e is None for e in engines) or any(layer.attn.qkv is None or layer.attn.wo.qmat is None
                                                  for layer in self.layers):
            return None
        if self._decode_model is not None and all(a is b for a, b in zip(self._decode_model[0], engines,
                                                                           strict=True)):
            return self._decode_model[1]
        norms = [t for layer in self.layers for t in (layer.attn_norm, layer.ffn_norm, layer.attn.q_norm,
                                                      layer.attn.k_norm, layer.moe.router)]
        if not row_kernels_apply(self.norm, *norms):
            return None
        layers = [DecodeLayerWeights(layer.attn_norm.numpy(), layer.attn.qkv.mats, layer.attn.q_norm.numpy(),
                                     layer.attn.k_norm.numpy(), layer.attn.wo.qmat, layer.ffn_norm.numpy(),
                                     layer.moe.router.numpy(), experts)
                  for layer, experts in zip(self.layers, engines, strict=True)]
        try:
            model = DecodeModel(layers, self.norm.numpy(), self.lm_head.qmat, self.cfg.num_heads, self.cfg.num_kv_heads,
                                self.cfg.rms_norm_eps, self.layers[0].moe.top_k, self.layers[0].moe.norm_topk_prob)
        except ValueError:  # e.g. matrices on different ISA paths: layer by layer then
            return None
        self._decode_model = (engines, model)
        return model
