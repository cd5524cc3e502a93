"""ktlab.model.mixes: llama.cpp's Q4_K_M / Q5_K_M tensor-type rule."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from ktlab.config import ModelConfig
from ktlab.model.arch_common import expected_tensor_shapes
from ktlab.model.gguf_write import QUANT_CHOICES, check_quant, quant_file_type, tensor_qtype
from ktlab.model.mixes import QUANT_MIXES, mixed_qtype, use_more_bits

# Layers whose attn_v and ffn_down get Q6_K, worked out by hand from llama.cpp's
# i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2 (C integer division):
#   n = 4:  n/8 = 0, 7n/8 = 3 -> i >= 3, and i % 3 == 2 -> {2, 3}
#   n = 48: n/8 = 6, 7n/8 = 42 -> 0..5, 42..47, and i - 6 in {2, 5, ..., 35} -> 8, 11, ..., 41
MORE_BITS = {
    1: {0},
    2: {1},
    4: {2, 3},
    8: {0, 3, 6, 7},
    48: {0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 42, 43, 44, 45, 46, 47},
}
BASE = {"Q4_K_M": Q.Q4_K, "Q5_K_M": Q.Q5_K}


def _qwen3_30b_a3b(layers: int, experts: int = 128, tied: bool = False) -> ModelConfig:
    return ModelConfig(
        arch="qwen3moe", vocab_size=151936, hidden_size=2048, num_layers=layers, num_heads=32, num_kv_heads=4,
        head_dim=128, num_experts=experts, num_experts_per_tok=8, moe_intermediate_size=768,
        tie_word_embeddings=tied,
    )


@pytest.mark.parametrize("n_layers", sorted(MORE_BITS))
def test_use_more_bits_layers(n_layers):
    assert {i for i in range(n_layers) if use_more_bits(i, n_layers)} == MORE_BITS[n_layers]


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q5_K_M"])
@pytest.mark.parametrize("n_layers", [4, 48])
def test_qwen3_moe_128_experts_every_tensor(preset, n_layers):
    """Qwen3-30B-A3B (128 experts, untied): nothing but output, attn_v and ffn_down_exps changes."""
    cfg = _qwen3_30b_a3b(n_layers)
    base, more = BASE[preset], MORE_BITS[n_layers]
    got = {name: mixed_qtype(preset, name, n_layers, n_experts=128) for name in expected_tensor_shapes(cfg)}
    assert got.pop("token_embd.weight") == base
    assert got.pop("output.weight") == Q.Q6_K
    assert got.pop("output_norm.weight") == Q.F32
    for i in range(n_layers):
        p = f"blk.{i}."
        bumped = Q.Q6_K if i in more else base
        assert got.pop(p + "attn_v.weight") == bumped
        assert got.pop(p + "ffn_down_exps.weight") == bumped
        for norm in ("attn_norm", "attn_q_norm", "attn_k_norm", "ffn_norm"):
            assert got.pop(p + f"{norm}.weight") == Q.F32
        assert got.pop(p + "ffn_gate_inp.weight") == Q.F32
        for plain in ("attn_q", "attn_k", "attn_output", "ffn_gate_exps", "ffn_up_exps"):
            assert got.pop(p + f"{plain}.weight") == base
    assert not got
    n_q6 = sum(mixed_qtype(preset, f"blk.{i}.attn_v.weight", n_layers) == Q.Q6_K for i in range(n_layers))
    assert n_q6 == {4: 2, 48: 24}[n_layers]


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q5_K_M"])
def test_eight_experts_bump_attention(preset):
    """llama.cpp's n_expert == 8 case: attn_k / attn_v Q8_0 on every layer, attn_output Q5_K."""
    for i in range(4):
        assert mixed_qtype(preset, f"blk.{i}.attn_v.weight", 4, n_experts=8) == Q.Q8_0
        assert mixed_qtype(preset, f"blk.{i}.attn_k.weight", 4, n_experts=8) == Q.Q8_0
        assert mixed_qtype(preset, f"blk.{i}.attn_output.weight", 4, n_experts=8) == Q.Q5_K
        assert mixed_qtype(preset, f"blk.{i}.attn_q.weight", 4, n_experts=8) == BASE[preset]
        down = mixed_qtype(preset, f"blk.{i}.ffn_down_exps.weight", 4, n_experts=8)
        assert down == (Q.Q6_K if i in MORE_BITS[4] else BASE[preset])
    # 16 or 128 experts, or a dense model: no attention bump
    for n_experts in (0, 16, 128):
        assert mixed_qtype(preset, "blk.0.attn_k.weight", 4, n_experts=n_experts) == BASE[preset]
        assert mixed_qtype(preset, "blk.0.attn_v.weight", 4, n_experts=n_experts) == BASE[preset]


def test_dense_names_and_tied_embeddings():
    assert mixed_qtype("Q4_K_M", "blk.0.ffn_down.weight", 8) == Q.Q6_K
    assert mixed_qtype("Q4_K_M", "blk.1.ffn_down.weight", 8) == Q.Q4_K
    assert mixed_qtype("q5_k_m", "blk.3.attn_qkv.weight", 8) == Q.Q6_K  # attn_v-like, lower-case preset
    assert mixed_qtype("Q4_K_M", "token_embd.weight", 8, tied_embeddings=True) == Q.Q6_K
    assert mixed_qtype("Q4_K_M", "token_embd.weight", 8) == Q.Q4_K


@pytest.mark.parametrize(
    "args, needle",
    [
        (("Q4_K_S", "blk.0.attn_v.weight", 4), "unknown quant mix 'Q4_K_S'"),
        (("Q4_K_M", "blk.0.attn_v.weight", 0), "n_layers must be positive"),
        (("Q4_K_M", "blk.4.attn_v.weight", 4), "layer 4, but the model has 4 layers"),
        (("Q4_K_M", "ffn_down_exps.weight", 4), "cannot tell the layer"),
    ],
)
def test_errors(args, needle):
    with pytest.raises(ValueError, match=needle):
        mixed_qtype(*args)


def test_writer_choices_file_types_and_row_fallback():
    assert QUANT_CHOICES == ("F32", "F16", "BF16", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4", "Q4_K_M", "Q5_K_M",
                             "MXFP4_MOE")
    assert check_quant("q4_k_m") == "Q4_K_M" and check_quant("q5_k") == "Q5_K"
    with pytest.raises(ValueError, match="unknown quant type 'Q3_K'"):
        check_quant("Q3_K")
    assert quant_file_type("Q4_K_M") == LlamaFileType.MOSTLY_Q4_K_M == QUANT_MIXES["Q4_K_M"].file_type
    assert quant_file_type("Q5_K_M") == LlamaFileType.MOSTLY_Q5_K_M
    assert quant_file_type("Q4_K") is None
    assert quant_file_type("MXFP4_MOE") == LlamaFileType.MOSTLY_MXFP4_MOE

    cfg = _qwen3_30b_a3b(4)
    assert tensor_qtype("Q4_K_M", "blk.3.attn_v.weight", (512, 2048), cfg) == Q.Q6_K
    assert tensor_qtype("Q4_K_M", "blk.3.attn_v.weight", (512, 2080), cfg) == Q.Q8_0  # rows not whole Q6_K blocks
    assert tensor_qtype("Q4_K_M", "blk.0.attn_v.weight", (512, 100), cfg) == Q.F16
    assert tensor_qtype("Q5_K_M", "blk.0.ffn_norm.weight", (2048,), cfg) == Q.F32
    assert tensor_qtype("Q5_K", "blk.3.attn_v.weight", (512, 2048), cfg) == Q.Q5_K  # a single type: no mix
    # gpt-oss's mix: MXFP4 experts, Q8_0 for every other matrix, F32 biases (2-D per-expert ones too)
    assert tensor_qtype("MXFP4_MOE", "blk.1.ffn_down_exps.weight", (128, 2048, 768), cfg) == Q.MXFP4
    assert tensor_qtype("MXFP4_MOE", "blk.1.attn_v.weight", (512, 2048), cfg) == Q.Q8_0
    assert tensor_qtype("MXFP4_MOE", "output.weight", (1000, 2048), cfg) == Q.Q8_0
    assert tensor_qtype("MXFP4_MOE", "blk.1.ffn_gate_exps.bias", (128, 768), cfg) == Q.F32
