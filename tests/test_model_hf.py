"""Our Qwen3-MoE against Hugging Face transformers' Qwen3MoeForCausalLM on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_greedy_equals_transformers, hf_logits, nmse, our_logits

from ktlab.model import load_model

# Named tolerances (float32 unless stated).
LOGITS_MAX_ABS_F32 = 1e-3  # same weights, different op order
LOGITS_NMSE_Q8_0 = 1e-2  # Q8_0 weights vs the float reference (a flipped route amplifies it)
GREEDY_STEPS = 32

PROMPT = [5, 17, 42, 99, 7, 3, 250, 61, 13]


@pytest.mark.parametrize("source", ["hf_dir", "gguf_f32"])
def test_logits_match_transformers(source, hf_model, request):
    model, _ = load_model(request.getfixturevalue(source), experts="torch")
    ours, ref = our_logits(model, PROMPT), hf_logits(hf_model, PROMPT)
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) < LOGITS_MAX_ABS_F32


def test_q8_0_gguf_close_to_float_reference(gguf_q8, hf_model):
    model, _ = load_model(gguf_q8)
    ours, ref = our_logits(model, PROMPT), hf_logits(hf_model, PROMPT)
    err = nmse(ours, ref)
    assert 0 < err < LOGITS_NMSE_Q8_0, err  # not bit-identical (quantized), but close


def test_incremental_decode_equals_full_forward(gguf_f32):
    model, _ = load_model(gguf_f32, experts="torch")
    full = our_logits(model, PROMPT)
    cache = model.new_cache(len(PROMPT))
    first = model.forward(torch.tensor(PROMPT[:4]), cache).numpy()
    steps = [model.forward(torch.tensor([t]), cache).numpy()[0] for t in PROMPT[4:]]
    np.testing.assert_allclose(np.vstack([first, *steps]), full, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_identical_to_transformers(gguf_f32, hf_model):
    """32 greedy steps, float64 on both sides so near-ties cannot flip."""
    assert_greedy_equals_transformers(gguf_f32, hf_model, PROMPT, GREEDY_STEPS)


def test_route_observer_sees_router_choices(gguf_f32, hf_model):
    model, _ = load_model(gguf_f32, experts="torch")
    seen: dict[int, torch.Tensor] = {}
    model.add_route_observer(lambda layer, ids, w: seen.__setitem__(layer, ids.clone()))
    our_logits(model, PROMPT)
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor([PROMPT]), output_router_logits=True)
    for layer, router_logits in enumerate(out.router_logits):
        ref = torch.topk(router_logits.float(), 2, dim=-1).indices
        assert torch.equal(torch.sort(seen[layer], -1).values, torch.sort(ref, -1).values)


def test_yarn_rope_scaling_matches_transformers(tokenizer_data, test_tokenizer, tmp_path):
    """A Qwen3-MoE with YaRN RoPE scaling (factor 4 over 16 original positions): logits equal
    transformers' from safetensors and from our GGUF (which carries rope.scaling.* as llama.cpp
    writes them), over a prompt four times longer than the original context."""
    from conftest import hf_tiny_config, randomize, write_test_gguf
    from transformers import Qwen3MoeForCausalLM

    from ktlab.model import open_weights

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    torch.manual_seed(3)
    config = hf_tiny_config(len(tokenizer_data.tokens), rope_parameters=yarn, max_position_embeddings=64)
    hf = Qwen3MoeForCausalLM(config).eval()
    randomize(hf, seed=3)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    test_tokenizer.backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    gguf = write_test_gguf(hf, tokenizer_data, tmp_path / "yarn.gguf", "F32")
    cfg = open_weights(gguf).config
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_context) == ("yarn", 4.0, 16)
    prompt = [(7 * i + 3) % len(tokenizer_data.tokens) for i in range(64)]
    ref = hf_logits(hf, prompt)
    for source in (tmp_path / "hf", gguf):
        model, _ = load_model(source, experts="torch")
        assert np.max(np.abs(our_logits(model, prompt) - ref)) < LOGITS_MAX_ABS_F32
    plain, _ = load_model(gguf, experts="torch")  # without the scaling the model is another one
    plain.rope = type(plain.rope)(cfg.head_dim, cfg.rope_theta)
    assert np.max(np.abs(our_logits(plain, prompt) - ref)) > 100 * LOGITS_MAX_ABS_F32
