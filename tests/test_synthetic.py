"""scripts/make_synthetic.py: random-weight Qwen3-MoE GGUFs with the real 30B-A3B shapes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ktlab.model import load_model
from ktlab.model.arch_common import expected_tensor_shapes
from ktlab.model.gguf import GGUFFile

LLAMA_CPP_NMSE = 2e-3  # our logits vs llama.cpp's on one Q8_0 file (measured ~1.3e-4)
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic.py"
TINY = ["--hidden", "256", "--experts", "8", "--top-k", "2", "--expert-inter", "256", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "64", "--layers", "2", "--no-progress"]


@pytest.fixture(scope="module")
def synth():
    spec = importlib.util.spec_from_file_location("make_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K", "BF16"])
def test_tiny_synthetic_loads_and_runs(synth, tmp_path, quant, capsys):
    path = tmp_path / f"syn-{quant}.gguf"
    assert synth.main([*TINY, "--quant", quant, "--tokenizer", "bytes", "--seed", "3", "-o", str(path)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and str(path) in summary[0] and " s" in summary[0]

    f = GGUFFile(path)
    cfg = f.config
    assert (cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (256, 8, 2, 256)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (4, 2, 64, 2)
    assert cfg.vocab_size == 260 and cfg.rms_norm_eps == pytest.approx(1e-6) and cfg.rope_theta == 1e6
    assert cfg.context_length == 4096 and not cfg.tie_word_embeddings
    assert f.tensor_info("blk.0.ffn_gate_exps.weight").qtype.name == quant
    assert f.tensor_info("blk.1.ffn_down_exps.weight").qtype.name == quant
    assert f.tensor_info("blk.0.ffn_gate_inp.weight").qtype.name == "F32"

    # Weight statistics: std ~ 1/sqrt(fan_in), norms ~ 1.
    gate = f.tensor("blk.0.ffn_gate_exps.weight")
    assert gate.std() == pytest.approx(1 / 16, rel=0.05)
    assert f.tensor("blk.0.attn_norm.weight").mean() == pytest.approx(1.0, abs=0.05)

    model, tokenizer = load_model(path)
    ids = tokenizer.encode("hello <|im_start|>")
    assert len(ids) == 7
    logits = model.forward(torch.tensor(ids), model.new_cache(16))
    assert logits.shape == (7, 260) and torch.isfinite(logits).all()


def test_same_seed_same_weights_and_vocab_padding(synth, tmp_path):
    a, b, c = (tmp_path / f"{n}.gguf" for n in "abc")
    base = [*TINY, "--layers", "1", "--tokenizer", "bytes"]
    assert synth.main([*base, "--seed", "1", "-o", str(a)]) == 0
    assert synth.main([*base, "--seed", "1", "-o", str(b), "--vocab", "300"]) == 0
    assert synth.main([*base, "--seed", "2", "-o", str(c)]) == 0
    fa, fb, fc = GGUFFile(a), GGUFFile(b), GGUFFile(c)
    name = "blk.0.ffn_up_exps.weight"
    np.testing.assert_array_equal(fa.raw(name).data, fb.raw(name).data)
    assert not np.array_equal(fa.raw(name).data, fc.raw(name).data)
    assert fb.config.vocab_size == 300
    tokens = fb.get("tokenizer.ggml.tokens")
    assert tokens[260] == "<|extra_0|>" and tokens[-1] == "<|extra_39|>"
    assert fb.tokenizer().token_to_id("<|extra_7|>") == 267


def test_tokenizer_copied_from_gguf(synth, gguf_q8, tokenizer_data, tmp_path):
    path = tmp_path / "copy.gguf"
    assert synth.main([*TINY, "--layers", "1", "--tokenizer", str(gguf_q8), "-o", str(path)]) == 0
    f = GGUFFile(path)
    assert f.get("tokenizer.ggml.tokens") == tokenizer_data.tokens
    assert f.get("tokenizer.ggml.merges") == tokenizer_data.merges
    assert f.config.vocab_size == len(tokenizer_data.tokens)
    text = "The quick brown fox"
    assert f.tokenizer().encode(text) == GGUFFile(gguf_q8).tokenizer().encode(text)


def test_default_plan_has_qwen3_30b_a3b_shapes(synth):
    """What the default command would write, checked without generating ~2.6 GB of weights."""
    p = synth.plan(["--tokenizer", "bytes"])
    cfg = p.cfg
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok) == (2048, 4, 128, 8)
    assert (cfg.moe_intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (768, 32, 4, 128)
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.context_length) == (1e-6, 1e6, 4096)
    assert cfg.norm_topk_prob and not cfg.tie_word_embeddings
    assert {s.name: s.shape for s in p.specs} == expected_tensor_shapes(cfg)
    shapes = {s.name: s.shape for s in p.specs}
    assert shapes["blk.3.ffn_gate_exps.weight"] == (128, 768, 2048)
    assert shapes["blk.3.ffn_down_exps.weight"] == (128, 2048, 768)
    assert shapes["blk.0.attn_q.weight"] == (4096, 2048) and shapes["blk.0.attn_k.weight"] == (512, 2048)
    qtypes = {s.name: s.qtype.name for s in p.specs}
    assert qtypes["blk.0.ffn_up_exps.weight"] == "Q8_0" and qtypes["blk.0.ffn_gate_inp.weight"] == "F32"
    assert p.path.name == "qwen3moe-30b-a3b-4L-Q8_0.gguf" and p.path.parent.name == "synthetic"
    # 4 layers x 3 x 128 x 768 x 2048 expert weights at 34 bytes / 32 values.
    expert_bytes = sum(synth.spec_bytes(s) for s in p.specs if "_exps." in s.name)
    assert expert_bytes == 4 * 3 * 128 * 768 * 2048 // 32 * 34

    q4 = synth.plan(["--tokenizer", "bytes", "--layers", "2", "--quant", "q4_k"])
    assert q4.path.name == "qwen3moe-30b-a3b-2L-Q4_K.gguf"
    assert all(s.qtype.name == "Q4_K" for s in q4.specs if len(s.shape) >= 2 and "gate_inp" not in s.name)


def test_tiny_q4_k_m_file_has_llama_cpp_mix(synth, tmp_path, capsys):
    """--quant Q4_K_M on the tiny shapes (2 layers, 8 experts): every stored type, read back."""
    path = tmp_path / "syn-q4km.gguf"
    assert synth.main([*TINY, "--quant", "Q4_K_M", "--tokenizer", "bytes", "-o", str(path)]) == 0
    assert "Q4_K_M" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(path))
    got = {t.name: gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in reader.tensors}
    file_type = reader.get_field("general.file_type").contents()
    assert file_type == gguf.LlamaFileType.MOSTLY_Q4_K_M

    # Hand-derived: use_more_bits(i, 2) holds for layer 1 only; 8 experts -> llama.cpp's Q8_0 attn_k /
    # attn_v and Q5_K attn_output; every row here (256 values) fits a K-quant block.
    expected = {"token_embd.weight": "Q4_K", "output.weight": "Q6_K", "output_norm.weight": "F32"}
    for i in range(2):
        p = f"blk.{i}."
        expected.update({
            p + "attn_q.weight": "Q4_K", p + "attn_k.weight": "Q8_0", p + "attn_v.weight": "Q8_0",
            p + "attn_output.weight": "Q5_K", p + "ffn_gate_inp.weight": "F32",
            p + "ffn_gate_exps.weight": "Q4_K", p + "ffn_up_exps.weight": "Q4_K",
            p + "ffn_down_exps.weight": "Q6_K" if i == 1 else "Q4_K",
        })
        expected.update({p + f"{n}.weight": "F32" for n in ("attn_norm", "attn_q_norm", "attn_k_norm", "ffn_norm")})
    assert got == expected
    planned = synth.plan([*TINY, "--quant", "Q4_K_M", "--tokenizer", "bytes"])
    assert {s.name: s.qtype.name for s in planned.specs} == got


def test_mixed_plans_at_30b_shapes(synth):
    """48 layers of 128 experts, planned only: half the attn_v / ffn_down_exps layers are Q6_K."""
    more_bits = {0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 42, 43, 44, 45, 46, 47}
    for quant, base in (("Q4_K_M", "Q4_K"), ("q5_k_m", "Q5_K")):
        p = synth.plan(["--tokenizer", "bytes", "--layers", "48", "--quant", quant])
        assert p.path.name == f"qwen3moe-30b-a3b-48L-{quant.upper()}.gguf"
        qtypes = {s.name: s.qtype.name for s in p.specs}
        for i in range(48):
            bumped = "Q6_K" if i in more_bits else base
            assert qtypes[f"blk.{i}.attn_v.weight"] == bumped
            assert qtypes[f"blk.{i}.ffn_down_exps.weight"] == bumped
            assert qtypes[f"blk.{i}.attn_k.weight"] == qtypes[f"blk.{i}.ffn_up_exps.weight"] == base
            assert qtypes[f"blk.{i}.ffn_gate_inp.weight"] == "F32"
        assert (qtypes["token_embd.weight"], qtypes["output.weight"]) == (base, "Q6_K")
    q5 = synth.plan(["--tokenizer", "bytes", "--layers", "1", "--quant", "Q5_K"])
    assert q5.path.name == "qwen3moe-30b-a3b-1L-Q5_K.gguf"
    assert all(s.qtype.name == "Q5_K" for s in q5.specs if len(s.shape) >= 2 and "gate_inp" not in s.name)


def test_router_is_not_flat(synth):
    """On a normalised hidden state, the router's top-8 of 128 experts carry a clear majority."""
    p = synth.plan(["--tokenizer", "bytes", "--layers", "1"])
    router = next(s for s in p.specs if s.name == "blk.0.ffn_gate_inp.weight").produce()
    x = np.random.default_rng(0).standard_normal((64, 2048)).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(x @ router.T), dim=-1)
    top8 = probs.topk(8, dim=-1).values.sum(-1)
    assert 0.3 < float(top8.mean()) < 0.95


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--quant", "Q3_K"], "unknown quant type 'Q3_K'"),
        (["--layers", "0"], "--layers: expected a positive integer"),
        (["--top-k", "200"], "num_experts_per_tok (200)"),
        (["--heads", "6"], "multiple of num_kv_heads"),
        (["--vocab", "10"], "--vocab 10 is smaller"),
        (["--tokenizer", "/no/such.gguf"], "no such GGUF file"),
        (["--hidden", "x"], "expected a positive integer, got 'x'"),
        (["--seed", "-1"], "--seed: expected a non-negative integer"),
    ],
)
def test_bad_flags_one_line_exit_2(synth, tmp_path, capsys, argv, needle):
    out = tmp_path / "never.gguf"
    with pytest.raises(SystemExit) as exc_info:
        raise SystemExit(synth.main([*argv, "--tokenizer", "bytes", "-o", str(out)] if "--tokenizer" not in argv
                                    else [*argv, "-o", str(out)]))
    assert exc_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("make_synthetic.py: error:") and needle in err[0]
    assert not out.exists()


# llama.cpp checks OLMoE's k norm against the hidden size: as many KV heads as heads there.
FAMILY_SHAPES = {"olmoe": ["--kv-heads", "4"], "qwen2moe": ["--shared-inter", "256"], "llama": [],
                 "glm4moe": ["--shared-inter", "256", "--layers", "3"],
                 "deepseek2": ["--shared-inter", "256", "--kv-heads", "4", "--head-dim", "96", "--layers", "3"],
                 # a 128-position window never binds on this prompt; MXFP4 experts as released
                 "gpt-oss": ["--head-dim", "64", "--quant", "MXFP4_MOE"]}


@pytest.mark.parametrize("arch", sorted(FAMILY_SHAPES))
def test_synthetic_family_loads_and_matches_llama_cpp(synth, tmp_path, arch):
    """`--arch NAME` writes a GGUF ktlab loads with the family's features, and, where
    llama-cpp-python is installed, llama.cpp loads too and computes the same logits (named
    tolerance: both Q8_0, activations quantized differently)."""
    path = tmp_path / f"{arch}.gguf"
    assert synth.main([*TINY, *FAMILY_SHAPES[arch], "--arch", arch, "--tokenizer", "bytes", "-o", str(path)]) == 0
    model, _ = load_model(path)
    assert model.cfg.arch == arch
    prompt = [5, 17, 42, 99, 7, 3, 250, 61, 13]
    ours = model.forward(torch.tensor(prompt), model.new_cache(len(prompt))).numpy()
    assert np.isfinite(ours).all() and ours.std() > 0
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(prompt)
    ref = np.asarray(llm.scores[: len(prompt)])
    assert np.mean((ours - ref) ** 2) / np.mean(ref**2) < LLAMA_CPP_NMSE
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
