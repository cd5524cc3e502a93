"""Families beyond Qwen3-MoE (OLMoE, Qwen2-MoE) against Hugging Face transformers on the same weights,
from safetensors and from GGUFs we write; then the engine above the model (serving batches, the
hybrid runtime, ``ktlab info``) on each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_greedy_equals_transformers, hf_logits, nmse, our_logits, randomize

from ktlab.model import load_model, open_weights
from ktlab.model.gguf_write import write_gguf_from_hf_state
from ktlab.model.layers import SeqSlice
from ktlab.model.registry import architecture_for_hf
from ktlab.model.tokenizer import Tokenizer
from ktlab.runtime.generate import SamplingConfig, generate
from ktlab.runtime.hybrid import HybridConfig, attach_hybrid

# Named tolerances (float32 unless stated).
LOGITS_MAX_ABS_F32 = 1e-3  # same weights, different op order
LOGITS_NMSE_Q8_0 = 1e-2  # Q8_0 weights vs the float reference
LOGITS_NMSE_MXFP4 = 0.1  # 4-bit experts (MXFP4) vs the float reference
GREEDY_STEPS = 32
PROMPT = [5, 17, 42, 99, 7, 3, 250, 61, 13]

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
            num_experts_per_tok=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
            tie_word_embeddings=False)


def _olmoe(vocab: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM, OlmoeConfig(vocab_size=vocab, intermediate_size=32, **TINY)


def _qwen2moe(vocab: int):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM, Qwen2MoeConfig(vocab_size=vocab, intermediate_size=128, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=64, **TINY)


def _mixtral(vocab: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    tiny = {k: v for k, v in TINY.items() if k != "num_experts"}
    return MixtralForCausalLM, MixtralConfig(vocab_size=vocab, intermediate_size=32, num_local_experts=8, **tiny)


def _glm4moe(vocab: int):
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    tiny = {k: v for k, v in TINY.items() if k not in ("num_experts", "num_hidden_layers")}
    return Glm4MoeForCausalLM, Glm4MoeConfig(
        vocab_size=vocab, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, head_dim=16,
        n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True, use_qk_norm=False, **tiny)


def _deepseek_v3(vocab: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    tiny = {k: v for k, v in TINY.items() if k not in ("num_experts", "num_hidden_layers", "num_key_value_heads")}
    return DeepseekV3ForCausalLM, DeepseekV3Config(
        vocab_size=vocab, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, **tiny)


def _gpt_oss(vocab: int):
    from transformers import GptOssConfig, GptOssForCausalLM

    tiny = {k: v for k, v in TINY.items() if k not in ("num_experts", "rope_theta")}
    # A window of 4 and YaRN over 16 original positions: both matter within the prompt and 32 steps.
    yarn = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    config = GptOssConfig(vocab_size=vocab, intermediate_size=32, head_dim=16, num_local_experts=8, sliding_window=4,
                          rope_parameters=yarn, **tiny)
    config._attn_implementation = "eager"  # the attention with sinks
    return GptOssForCausalLM, config


FAMILIES = {"olmoe": _olmoe, "qwen2moe": _qwen2moe, "llama": _mixtral, "glm4moe": _glm4moe, "deepseek2": _deepseek_v3,
            "gpt-oss": _gpt_oss}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tokenizer_data, test_tokenizer, spm_tokenizer, tmp_path_factory):
    """(arch, HF model, HF dir, F32 GGUF, Q8_0 GGUF) of one family's tiny random model (Mixtral's
    with a SentencePiece vocabulary, the others byte-level BPE)."""
    arch = request.param
    if arch == "llama":
        tokenizer_data = spm_tokenizer[1]
        test_tokenizer = Tokenizer.from_spm_vocab(tokenizer_data.tokens, tokenizer_data.scores,
                                                  tokenizer_data.token_types, tokenizer_data.eos_id,
                                                  tokenizer_data.bos_id)
    cls, config = FAMILIES[arch](len(tokenizer_data.tokens))
    hf, hf_dir, ggufs = build_family(cls, config, tokenizer_data, test_tokenizer, tmp_path_factory.mktemp(arch))
    return arch, hf, hf_dir, ggufs["F32"], ggufs["Q8_0"]


def build_family(cls, config, tokenizer_data, test_tokenizer, root, qtypes=("F32", "Q8_0")):
    """A random Hugging Face model of ``config`` saved with its tokenizer, and its GGUFs by type."""
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    hf = cls(config).eval()
    randomize(hf)
    with torch.no_grad():  # randomize gives vectors ~1 (norm weights); biases that large swamp attention
        for name, p in hf.named_parameters():
            if name.endswith((".bias", "_bias", ".sinks")):  # gpt-oss: expert biases and attention sinks
                p.mul_(0.0).add_(0.3 * torch.randn(p.shape))
    hf.save_pretrained(root / "hf", safe_serialization=True)
    test_tokenizer.backend.save(str(root / "hf" / "tokenizer.json"))
    eos = tokenizer_data.tokens[tokenizer_data.eos_id]
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    cfg = architecture_for_hf(config.model_type).config_from_hf(hf.config.to_dict())
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    ggufs = {q: write_gguf_from_hf_state(root / f"{cfg.arch}-{q}.gguf", cfg, state, tokenizer_data, qtype=q)
             for q in qtypes}
    return hf, root / "hf", ggufs


def test_deepseek_v2_group_limited_greedy_routing_matches_transformers(tokenizer_data, test_tokenizer, tmp_path):
    """DeepSeek-V2's routing: softmax scores, the best 2 of 4 expert groups by each group's best score,
    top-k among them, scaled: logits equal transformers' (its routing is what differs from V3's)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    tiny = {k: v for k, v in TINY.items() if k not in ("num_experts", "num_hidden_layers", "num_key_value_heads")}
    config = DeepseekV2Config(
        vocab_size=len(tokenizer_data.tokens), intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=24,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.0,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, **tiny)
    hf, hf_dir, ggufs = build_family(DeepseekV2ForCausalLM, config, tokenizer_data, test_tokenizer, tmp_path, ("F32",))
    cfg = open_weights(ggufs["F32"]).config
    assert (cfg.router, cfg.router_groups, cfg.router_topk_groups, cfg.norm_topk_prob) == ("softmax", 4, 2, False)
    ref = hf_logits(hf, PROMPT)
    for source in (hf_dir, ggufs["F32"]):
        model, _ = load_model(source, experts="torch")
        assert np.max(np.abs(our_logits(model, PROMPT) - ref)) < LOGITS_MAX_ABS_F32


def test_deepseek_v2_lite_with_yarn_matches_transformers(tokenizer_data, test_tokenizer, tmp_path):
    """DeepSeek-V2-Lite's layout: queries without a latent, softmax top-k scaled and not renormalised,
    two shared experts, and YaRN with DeepSeek's temperatures (mscale 0.707: the softmax scale and
    the RoPE tables both change) over a prompt four times the original context: logits equal
    transformers' from safetensors and from our GGUF (rope.scaling.yarn_log_multiplier)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    tiny = {k: v for k, v in TINY.items() if k not in ("num_experts", "num_hidden_layers", "num_key_value_heads",
                                                        "max_position_embeddings")}
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707,
            "mscale_all_dim": 0.707, "rope_theta": 10000.0, "beta_fast": 32, "beta_slow": 1}
    config = DeepseekV2Config(
        vocab_size=len(tokenizer_data.tokens), intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.5,
        topk_method="greedy", max_position_embeddings=64, rope_parameters=yarn, **tiny)
    hf, hf_dir, ggufs = build_family(DeepseekV2ForCausalLM, config, tokenizer_data, test_tokenizer, tmp_path, ("F32",))
    cfg = open_weights(ggufs["F32"]).config
    assert (cfg.q_lora_rank, cfg.router, cfg.norm_topk_prob, cfg.routed_scale, cfg.rope_scaling) == (
        0, "softmax", False, 1.5, "yarn")
    assert cfg.rope_mscale_all_dim == pytest.approx(0.707)
    prompt = [(5 * i + 1) % len(tokenizer_data.tokens) for i in range(60)]
    ref = hf_logits(hf, prompt)
    for source in (hf_dir, ggufs["F32"]):
        model, _ = load_model(source, experts="torch")
        assert np.max(np.abs(our_logits(model, prompt) - ref)) < LOGITS_MAX_ABS_F32


def test_config_has_the_family_features(family):
    arch, hf, _, gguf_f32, _ = family
    cfg = open_weights(gguf_f32).config
    assert cfg.arch == arch and not cfg.qwen3_layout and cfg.layout_differences()  # says why not
    assert open_weights("tiny").config.layout_differences() == []  # Qwen3's own layout
    if arch == "olmoe":
        assert (cfg.qk_norm, cfg.attn_bias, cfg.shared_expert_size, cfg.norm_topk_prob) == ("full", False, 0, False)
    elif arch == "glm4moe":
        assert (cfg.first_dense_layers, cfg.num_moe_layers, cfg.router, cfg.router_bias, cfg.router_groups,
                cfg.routed_scale, cfg.shared_expert_size, cfg.rotary_dim) == (1, 2, "sigmoid", True, 2, 2.5, 32, 8)
    elif arch == "llama":
        assert (cfg.qk_norm, cfg.rope_style, cfg.shared_expert_size, cfg.norm_topk_prob) == ("none", "norm", 0, True)
    elif arch == "deepseek2":
        assert (cfg.mla, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.head_dim, cfg.rope_dim, cfg.v_dim, cfg.router,
                cfg.router_groups, cfg.first_dense_layers) == (True, 32, 32, 24, 8, 16, "sigmoid", 2, 1)
        model, _ = load_model(gguf_f32, experts="torch")  # the cache holds the latent + RoPE key, one row
        assert tuple(model.new_cache(8).k.shape) == (3, 8, 1, 32 + 8)
        pool = model.new_paged_kv(2, 16)
        assert tuple(pool.k.shape) == (3, 1, 2, 16, 32 + 8) and pool.v is pool.k  # the latent serves as values
    elif arch == "gpt-oss":
        assert (cfg.attn_sinks, cfg.sliding_window, cfg.layer_window(0), cfg.layer_window(1), cfg.router_logit_bias,
                cfg.expert_bias, cfg.swiglu_limit, cfg.rope_scaling, cfg.rope_yarn_truncate) == (
            True, 4, 4, 0, True, True, 7.0, "yarn", False)
    else:
        assert (cfg.qk_norm, cfg.attn_bias, cfg.shared_expert_size, cfg.shared_expert_gate) == ("none", True, 64, True)


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_logits_match_transformers(family, source):
    _, hf, hf_dir, gguf_f32, _ = family
    model, _ = load_model(hf_dir if source == "hf" else gguf_f32, experts="torch")
    ours, ref = our_logits(model, PROMPT), hf_logits(hf, PROMPT)
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) < LOGITS_MAX_ABS_F32


def test_q8_0_on_the_cpu_engine_close_to_transformers(family):
    _, hf, _, _, gguf_q8 = family
    model, _ = load_model(gguf_q8)  # experts in the C++ engine, projections on the Q8_0 kernels
    attn = model.layers[0].attn  # projections on the Q8_0 kernels
    assert (attn.kv_a.qmat is not None) if model.cfg.mla else (attn.qkv is not None)
    err = nmse(our_logits(model, PROMPT), hf_logits(hf, PROMPT))
    assert 0 < err < LOGITS_NMSE_Q8_0, err


def test_greedy_tokens_identical_to_transformers(family):
    """32 greedy steps, float64 on both sides so near-ties cannot flip."""
    _, hf, _, gguf_f32, _ = family
    assert_greedy_equals_transformers(gguf_f32, hf, PROMPT, GREEDY_STEPS)


def test_batched_equals_alone_in_serving(family):
    """A decode step and a prefill chunk batched with other sequences give each sequence the logits
    it gets alone (paged KV, forward_batch)."""
    _, _, _, _, gguf_q8 = family
    model, _ = load_model(gguf_q8)
    page = 16
    prompts = [PROMPT, [9, 8, 7, 6, 5], [100, 200, 33]]

    def run(batch_ids: list[int]) -> dict[int, np.ndarray]:
        kv = model.new_paged_kv(num_pages=12, page_size=page)
        tables = {i: tuple(range(4 * i, 4 * i + 4)) for i in batch_ids}
        seqs = [SeqSlice(tables[i], 0, len(prompts[i])) for i in batch_ids]
        tokens = torch.tensor([t for i in batch_ids for t in prompts[i]])
        first = model.forward_batch(tokens, seqs, kv)
        steps = [SeqSlice(tables[i], len(prompts[i]), 1) for i in batch_ids]
        second = model.forward_batch(torch.tensor([11] * len(batch_ids)), steps, kv)
        return {i: np.vstack([first[j].numpy(), second[j].numpy()]) for j, i in enumerate(batch_ids)}

    together = run([0, 1, 2])
    for i in range(3):
        np.testing.assert_array_equal(run([i])[i], together[i])


@pytest.mark.parametrize("policy,budget", [("lru", 0.25), ("value", 0.5)])
def test_hybrid_runtime_gives_the_all_cpu_tokens(family, policy, budget):
    _, _, _, _, gguf_q8 = family
    model, _ = load_model(gguf_q8)
    reference, _ = generate(model, PROMPT, SamplingConfig(max_tokens=16))
    model, _ = load_model(gguf_q8)
    hybrid = attach_hybrid(model, open_weights(gguf_q8), HybridConfig(policy=policy, budget=budget))
    tokens, _ = generate(model, PROMPT, SamplingConfig(max_tokens=16))
    assert tokens == reference
    assert hybrid.stats.lookups == 15 * model.cfg.num_moe_layers * model.cfg.num_experts_per_tok


def test_info_shows_shared_and_routed_expert_bytes(family, capsys):
    from ktlab.cli import main

    arch, _, _, _, gguf_q8 = family
    assert main(["info", str(gguf_q8)]) == 0
    out = capsys.readouterr().out
    assert arch in out
    weights = open_weights(gguf_q8)
    summary, cfg = weights.byte_summary(), weights.config
    assert summary["expert_bytes"] > 0
    if cfg.shared_expert_size:
        assert summary["shared_expert_bytes"] > 0 and "shared expert" in out
    else:
        assert summary["shared_expert_bytes"] == 0
    assert f"{cfg.num_moe_layers} MoE" in out and f"{cfg.first_dense_layers} dense" in out
    assert "decode step    layer by layer" in out and cfg.layout_differences()[0] in out
    if arch == "glm4moe":
        assert "sigmoid" in out and "of 2 groups" in out
    from ktlab.info import describe  # the KV bytes info reports are what the model's pool allocates

    pool = load_model(gguf_q8)[0].new_paged_kv(num_pages=3, page_size=16)
    allocated = (pool.k.numel() + (0 if pool.v is pool.k else pool.v.numel())) * pool.k.element_size()
    assert describe(gguf_q8)["kv_bytes_per_position"] == allocated // (3 * 16)


@pytest.mark.parametrize("family", ["llama"], indirect=True)
def test_mixtral_gguf_has_the_sentencepiece_vocabulary(family, spm_tokenizer):
    """The llama-family GGUF carries a SentencePiece vocabulary: read back, it encodes as the
    sentencepiece library does (BOS first) and decodes back."""
    _, _, _, gguf_f32, _ = family
    sp, data = spm_tokenizer
    tok = open_weights(gguf_f32).tokenizer()
    for text in ("The quick brown fox.", "def main():\n    return 42\n", "naïve café 日本語 🙂"):
        assert tok.encode(text) == [data.bos_id, *sp.encode(text)]
        assert tok.decode(tok.encode(text), skip_special=True) == text


def test_cli_generate_record_and_export_on_each_family(family, tmp_path, capsys):
    """`ktlab generate`, `ktlab record` and `ktlab export` on a GGUF of the family: the trace has a row
    per MoE layer and records where they start; llama.cpp's flags send exactly the CPU layers' blocks."""
    from ktlab.cli import main
    from ktlab.sched.stats import Trace

    arch, _, _, _, gguf_q8 = family
    cfg = open_weights(gguf_q8).config
    assert main(["generate", "--model", str(gguf_q8), "--prompt", "def main", "--max-tokens", "4"]) == 0
    trace_path = tmp_path / f"{arch}.npz"
    assert main(["record", "--model", str(gguf_q8), "--max-tokens", "16", "-o", str(trace_path)]) == 0
    trace = Trace.load(trace_path)
    assert trace.ids.shape[1:] == (cfg.num_moe_layers, cfg.num_experts_per_tok)
    assert trace.meta["first_moe_layer"] == cfg.first_dense_layers
    out = tmp_path / "export"
    assert main(["export", "--trace", str(trace_path), "--target", "llama.cpp", "--budget", "0", "-o", str(out)]) == 0
    flags = (out / "llama_cpp_flags.txt").read_text().split()
    assert flags[flags.index("--n-cpu-moe") + 1] == str(cfg.num_layers)  # every MoE block, dense ones before
    capsys.readouterr()


def test_serve_answers_each_family_the_same_batched_or_alone(family):
    """`ktlab serve` on the family's GGUF: greedy completions of 4 prompts sent at once (one
    continuous batch) equal each sent alone, through the official openai client."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from test_serve_api import start_server, stop_server

    _, _, _, _, gguf_q8 = family
    proc, url = start_server(gguf_q8, "--kv-pages", "32", "--page-size", "16", api_key=None)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
        prompts = ["def main():", "The quick brown fox", "import numpy as np", "Experts route"]

        def complete(prompt: str) -> str:
            return client.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0).choices[0].text

        alone = [complete(p) for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(complete, prompts))
        assert together == alone and all(alone)
    finally:
        stop_server(proc)


@pytest.mark.parametrize("version", ["v2-group-limited-greedy", "v3-noaux-tc"])
def test_grouped_routing_chooses_as_transformers_routers(version):
    """Routing.choose against transformers' own DeepSeek routers on 512 random tokens: the same experts
    (as sets) with the same weights; V2 scores a group by its best softmax score, V3 by its two best
    biased sigmoid scores (each test fails with the other's group rule)."""
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from ktlab.model.layers import Routing

    torch.manual_seed(5)
    common = dict(hidden_size=32, n_routed_experts=32, num_experts_per_tok=4, n_group=8, topk_group=3,
                  routed_scaling_factor=2.0)
    if version.startswith("v2"):
        router = DeepseekV2TopkRouter(DeepseekV2Config(topk_method="group_limited_greedy", **common))
        ours = Routing(False, None, 8, 3, 2.0)
    else:
        router = DeepseekV3TopkRouter(DeepseekV3Config(norm_topk_prob=True, **common))
        router.e_score_correction_bias.copy_(0.3 * torch.randn(32))
        ours = Routing(True, router.e_score_correction_bias.clone(), 8, 3, 2.0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(32, 32))
        x = torch.randn(512, 32)
        _, ref_w, ref_ids = router(x)
        logits = x @ router.weight.T
    ids, weights = ours.choose(logits, 4, norm=version.startswith("v3"))
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order), ref_w.gather(1, ref_order).float())


@pytest.mark.parametrize(("patch", "needle"), [
    ({"model_type": "qwen2_moe", "mlp_only_layers": [0]}, "dense layers"),
    ({"model_type": "deepseek_v2", "topk_method": "noaux"}, "routing 'noaux'"),
    ({"model_type": "deepseek_v3", "rope_interleave": False}, "rope_interleave"),
    ({"model_type": "glm4_moe", "attention_bias": False}, "attention_bias"),
    ({"model_type": "olmoe", "clip_qkv": 8.0}, "clip_qkv"),
    ({"model_type": "mixtral", "sliding_window": 4096}, "sliding-window"),
    ({"model_type": "qwen3_moe", "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "'linear'"),
    ({"model_type": "gpt_oss", "swiglu_limit": 10.0}, "swiglu_limit"),
    ({"model_type": "gpt_oss", "layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"model_type": "jamba"}, "unsupported Hugging Face model_type 'jamba'"),
])
def test_unsupported_family_configs_are_one_line_errors(tmp_path, patch, needle):
    """A Hugging Face config a family cannot run yet is refused in one line naming the file and why."""
    from ktlab.errors import ModelFormatError

    config = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4,
              "num_experts_per_tok": 2, "moe_intermediate_size": 16, "intermediate_size": 16,
              "shared_expert_intermediate_size": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
              "v_head_dim": 8, "kv_lora_rank": 16, "attention_bias": True, **patch}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError) as info:
        open_weights(tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path)) and needle in message, message


def test_gpt_oss_mxfp4_experts_run_on_the_engine_as_gguf_dequantizes_them(tokenizer_data, test_tokenizer, tmp_path):
    """gpt-oss as released (llama.cpp's MXFP4_MOE: MXFP4 experts, the rest Q8_0): the C++ engine runs
    the MXFP4 blocks as stored, with the expert biases and clamped SwiGLU, and gives the logits of
    torch on gguf's dequantization of the same file (named tolerance: int8 activations)."""
    hf, _, ggufs = build_family(*_gpt_oss(len(tokenizer_data.tokens)), tokenizer_data, test_tokenizer, tmp_path,
                                ("MXFP4_MOE",))
    engine, _ = load_model(ggufs["MXFP4_MOE"])
    experts = engine.moe_blocks()[0].backends["cpu"].experts
    assert (experts.qtype, experts.down_qtype) == (39, 39)  # GGML_TYPE_MXFP4
    reference, _ = load_model(ggufs["MXFP4_MOE"], experts="torch")
    ours = our_logits(engine, PROMPT)
    assert nmse(ours, our_logits(reference, PROMPT)) < LOGITS_NMSE_Q8_0
    assert nmse(ours, hf_logits(hf, PROMPT)) < LOGITS_NMSE_MXFP4


@pytest.mark.parametrize("family", ["gpt-oss"], indirect=True)
def test_merged_gate_up_experts_read_as_the_separate_tensors(family, tokenizer_data, tmp_path):
    """A file storing each layer's expert gate and up as one ``ffn_gate_up_exps`` [E, 2I, H] (gate
    first; llama.cpp's newer converters, biases too) gives the very logits of the same weights stored
    apart, on the C++ engine and in torch."""
    from ktlab.model.gguf_write import write_gguf_from_arrays
    from ktlab.model.registry import architecture

    arch, hf, _, _, gguf_q8 = family
    cfg = open_weights(gguf_q8).config
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    tensors = architecture(arch).hf_to_gguf_tensors(state, cfg)
    merged = dict(tensors)
    for i in range(cfg.num_layers):
        for part in ("weight", "bias"):
            gate, up = (merged.pop(f"blk.{i}.ffn_{kind}_exps.{part}") for kind in ("gate", "up"))
            merged[f"blk.{i}.ffn_gate_up_exps.{part}"] = np.concatenate([gate, up], axis=1)
    path = write_gguf_from_arrays(tmp_path / "merged.gguf", cfg, merged, tokenizer_data, qtype="Q8_0")
    names = open_weights(path).tensor_names
    assert "blk.0.ffn_gate_up_exps.weight" in names and "blk.0.ffn_gate_exps.weight" not in names
    for experts in ("cpu", "torch"):
        apart, _ = load_model(gguf_q8, experts=experts)
        together, _ = load_model(path, experts=experts)
        np.testing.assert_array_equal(our_logits(together, PROMPT), our_logits(apart, PROMPT))


def test_lab_session_on_each_family(family, tmp_path):
    """`Session` on the family's GGUF: generate, record, place, simulate, the dashboard's per-layer
    split and export all see one row per MoE layer."""
    from ktlab.lab.session import Session

    arch, _, _, _, gguf_q8 = family
    s = Session(gguf_q8, budget=0.25)
    cfg = s.cfg
    assert s.generate("def main", max_tokens=4, stream=False) is not None
    trace = s.record(["def main():", "import os"], max_tokens=8)
    assert trace.ids.shape[1:] == (cfg.num_moe_layers, cfg.num_experts_per_tok)
    assert s.placement.gpu.shape == (cfg.num_moe_layers, cfg.num_experts)
    result = s.simulate("lru")
    assert 0.0 <= result.hit_rate <= 1.0 and result.decode_tok_s > 0
    assert len(s.layer_times(max_steps=4)) > 0
    files = s.export("llama.cpp", tmp_path)
    assert files and s.summary()["layers"] == cfg.num_moe_layers
