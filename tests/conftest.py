"""Shared fixtures: a tiny random Qwen3-MoE in Hugging Face transformers and its files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ktlab.config import ModelConfig
from ktlab.model.gguf_write import GGUFTokenizerData, write_gguf_from_hf_state
from ktlab.model.tokenizer import CHATML_TEMPLATE, Tokenizer, byte_level_pretokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. def main(): return 42\n",
    "Mixture-of-Experts models route each token to a few experts; caches keep hot experts close.\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)  # café, naïve, 日本語\n",
] * 20


def train_test_tokenizer(vocab_size: int = 320) -> GGUFTokenizerData:
    """A small byte-level BPE trained on a fixed corpus (deterministic)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = byte_level_pretokenizer("qwen2")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    import json

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return GGUFTokenizerData(
        tokens=tokens, merges=merges, token_types=[3 if t in SPECIALS else 1 for t in tokens], pre="qwen2",
        eos_id=tokens.index("<|im_end|>"), bos_id=tokens.index("<|endoftext|>"), chat_template=CHATML_TEMPLATE,
    )


def train_spm(vocab_size: int = 400):
    """A SentencePiece BPE model (llama's kind: byte fallback, no normalisation, spaces kept) trained
    on the fixed corpus, and its vocabulary as a GGUF writes it (model "llama": pieces, scores, types)."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    n = sp.get_piece_size()

    def gguf_type(i: int) -> int:  # llama.cpp: 1 normal, 2 unknown, 3 control, 6 byte
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    data = GGUFTokenizerData(
        tokens=[sp.id_to_piece(i) for i in range(n)], merges=[], token_types=[gguf_type(i) for i in range(n)],
        pre="default", eos_id=2, bos_id=1, model="llama", scores=[float(sp.get_score(i)) for i in range(n)],
    )
    return sp, data


@pytest.fixture(scope="session")
def spm_tokenizer():
    """(sentencepiece processor, its GGUF vocabulary data)."""
    return train_spm()


@pytest.fixture(scope="session")
def tokenizer_data() -> GGUFTokenizerData:
    return train_test_tokenizer()


@pytest.fixture(scope="session")
def test_tokenizer(tokenizer_data) -> Tokenizer:
    d = tokenizer_data
    return Tokenizer.from_vocab(d.tokens, d.merges, d.token_types, d.pre, d.eos_id, d.bos_id, d.chat_template)


def hf_tiny_config(vocab_size: int, **overrides):
    from transformers import Qwen3MoeConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=256,
    )
    kwargs.update(overrides)
    config = Qwen3MoeConfig(**kwargs)
    config._experts_implementation = "eager"  # the plain per-expert loop: works in float64 too
    return config


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights with enough spread that routing and attention are far from ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "mlp.gate" in name or "mlp.router" in name:  # routers (gpt-oss: mlp.router)
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


@pytest.fixture(scope="session")
def hf_model(tokenizer_data):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(hf_tiny_config(len(tokenizer_data.tokens))).eval()
    randomize(model)
    return model


@pytest.fixture(scope="session")
def hf_dir(hf_model, test_tokenizer, tmp_path_factory) -> Path:
    import json

    path = tmp_path_factory.mktemp("hf_tiny")
    hf_model.save_pretrained(path, safe_serialization=True)
    test_tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE})
    )
    return path


def config_from_hf_model(hf_model) -> ModelConfig:
    from ktlab.model.qwen3_moe import config_from_hf

    return config_from_hf(hf_model.config.to_dict())


def write_test_gguf(hf_model, tokenizer_data, path: Path, qtype: str) -> Path:
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    return write_gguf_from_hf_state(path, config_from_hf_model(hf_model), state, tokenizer_data, qtype=qtype)


@pytest.fixture(scope="session")
def gguf_f32(hf_model, tokenizer_data, tmp_path_factory) -> Path:
    return write_test_gguf(hf_model, tokenizer_data, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "F32")


@pytest.fixture(scope="session")
def gguf_q8(hf_model, tokenizer_data, tmp_path_factory) -> Path:
    return write_test_gguf(hf_model, tokenizer_data, tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf", "Q8_0")


@pytest.fixture(scope="session")
def gguf_q8_long(hf_model, tokenizer_data, tmp_path_factory) -> Path:
    """The Q8_0 tiny test model with an 8192-position context: requests long enough that their
    decode outlasts a client's few reads on any host (the server's timing tests)."""
    import dataclasses

    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    cfg = dataclasses.replace(config_from_hf_model(hf_model), context_length=8192)
    return write_gguf_from_hf_state(tmp_path_factory.mktemp("gguf") / "tiny-q8_0-long.gguf", cfg, state,
                                    tokenizer_data, qtype="Q8_0")


@pytest.fixture(scope="session")
def hf_kquant_model(tokenizer_data):
    """The tiny Qwen3-MoE at K-quant-friendly widths: every matrix row a whole 256-value super-block."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(1)
    config = hf_tiny_config(len(tokenizer_data.tokens), hidden_size=256, intermediate_size=256, head_dim=64,
                            moe_intermediate_size=256)
    model = Qwen3MoeForCausalLM(config).eval()
    randomize(model, seed=1)
    return model


@pytest.fixture(scope="session")
def gguf_q4km(hf_kquant_model, tokenizer_data, tmp_path_factory) -> Path:
    """llama.cpp's Q4_K_M mix of the K-quant tiny model: Q4_K, Q5_K, Q6_K and Q8_0 matrices
    (8 experts: Q8_0 k/v and Q5_K output projections; Q6_K down projection in layer 1 and head)."""
    return write_test_gguf(hf_kquant_model, tokenizer_data, tmp_path_factory.mktemp("gguf") / "tiny-q4_k_m.gguf",
                           "Q4_K_M")


def reference_int8_blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's activation quantization, as the kernels define it: per block an fp32 d = amax / 127
    and q = roundf(x * (1 / d)) (ties away from zero), d = 0 blocks all zeros. (d, q [n, block])."""
    d = (np.abs(x.reshape(-1, block)).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    p = x.reshape(-1, block) * inv[:, None]
    t = np.trunc(p)
    return d, (t + np.where(np.abs(p - t) >= 0.5, np.sign(p), 0)).astype(np.int8)


def activation_test_rows(block: int) -> list[np.ndarray]:
    """Rows that test an activation quantizer: random blocks of three magnitudes, exact ties
    (x * (1/d) is k + 0.5; amax 127 gives d = 1) of both signs, and all-zero blocks."""
    rng = np.random.default_rng(7)
    scales = rng.choice(np.array([1e-4, 1.0, 300.0], dtype=np.float32), size=(400 * 32 // block, 1))
    random = (rng.standard_normal((400 * 32 // block, block)).astype(np.float32) * scales).reshape(-1)
    ties = (np.arange(max(256, block * 2), dtype=np.float32) % 64 - 32) + np.float32(0.5)
    ties[::block] = 127.0
    return [random, ties, -ties, np.zeros(2 * block, dtype=np.float32)]


def hf_logits(hf_model, ids: list[int]) -> np.ndarray:
    """Logits [T, V] of Hugging Face ``hf_model`` for one prompt."""
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def our_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [T, V] of a ktlab model for one prompt in a fresh cache."""
    return model.forward(torch.tensor(ids), model.new_cache(len(ids))).numpy()


def assert_greedy_equals_transformers(gguf_path: Path, hf_model, prompt: list[int], steps: int) -> None:
    """``steps`` greedy tokens of the ktlab model of ``gguf_path`` equal Hugging Face's, float64 on
    both sides so near-ties cannot flip; and they are a real sequence, not one token repeated."""
    from ktlab.model import load_model
    from ktlab.runtime.generate import SamplingConfig, generate

    model, _ = load_model(gguf_path, dtype=torch.float64, experts="torch")
    ours, _ = generate(model, prompt, SamplingConfig(max_tokens=steps))
    ids = list(prompt)
    hf64 = hf_model.to(torch.float64)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(hf64(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    hf_model.to(torch.float32)
    assert ours == ids[len(prompt):]
    assert len(set(ours)) > 3


def nmse(a: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    """Normalised mean squared error of ``a`` against ``ref``."""
    a, ref = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.sum((a - ref) ** 2) / max(np.sum(ref**2), 1e-300))
