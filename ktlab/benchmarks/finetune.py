"""``ktlab bench-finetune``: LoRA training speed and memory, ktlab vs Hugging Face transformers + peft.

Both train rank-r LoRA adapters on q/k/v/o of the same model (ktlab on the GGUF with its experts
quantized on the CPU; transformers on the same weights dequantized to float32, experts included) on
the same random token sequences (every token learned), same optimizer, same torch threads. Each
engine runs in its own process, so its peak resident memory is its own; the first step is warm-up.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ENGINES = ("ktlab", "transformers+peft")


@dataclass(frozen=True)
class FinetuneBenchResult:
    """One engine's training speed (tokens of the timed steps / their seconds) and peak RSS."""

    engine: str
    steps: int
    seq_len: int
    tok_s: float
    peak_rss_mb: float
    final_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


def hf_model_from_gguf(path: str | Path):
    """A transformers Qwen3-MoE holding the GGUF's weights dequantized to float32 (qwen3moe files)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from ktlab.model import open_weights
    from ktlab.model.arch_common import HF_LAYER_NAMES

    weights = open_weights(path)
    cfg = weights.config
    if cfg.arch != "qwen3moe":
        raise ValueError(f"bench-finetune compares Qwen3-MoE files; {path} is {cfg.arch}")
    config = Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size or 1,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.context_length,
        tie_word_embeddings=cfg.tie_word_embeddings)
    config._experts_implementation = "eager"
    model = Qwen3MoeForCausalLM(config)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(cfg.num_layers):
        names.update({f"model.layers.{i}.{hf}": f"blk.{i}.{gg}" for hf, gg in HF_LAYER_NAMES.items()})
        names.update({f"model.layers.{i}.self_attn.{n}_norm.weight": f"blk.{i}.attn_{n}_norm.weight" for n in "qk"})
        names[f"model.layers.{i}.mlp.gate.weight"] = f"blk.{i}.ffn_gate_inp.weight"
    state = {hf: torch.from_numpy(np.array(weights.tensor(gg), dtype=np.float32)) for hf, gg in names.items()}
    for i in range(cfg.num_layers):
        gate, up, down = (weights.tensor(f"blk.{i}.ffn_{k}_exps.weight") for k in ("gate", "up", "down"))
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.from_numpy(np.concatenate([gate, up], axis=1))
        state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.from_numpy(np.array(down, dtype=np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if cfg.tie_word_embeddings:
        model.tie_weights()
    if [m for m in missing if "rotary" not in m and m not in tied] or unexpected:
        raise ValueError(f"weights do not fit the transformers model: missing {missing}, unexpected {unexpected}")
    return model


def _sequences(vocab: int, steps: int, seq_len: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(10, vocab, size=(steps, seq_len)).tolist()


def _run_ktlab(path: str, seqs: list[list[int]], rank: int, threads: int) -> tuple[float, float]:
    import torch

    from ktlab.train.data import Example
    from ktlab.train.finetune import FinetuneConfig, Trainer

    torch.set_num_threads(threads)
    trainer = Trainer(path, FinetuneConfig(data="", lora_rank=rank, lora_alpha=2.0 * rank, steps=len(seqs)))
    examples = [Example(s, [True] * len(s)) for s in seqs]
    trainer.train_step(examples[0])  # warm-up
    t0 = time.perf_counter()
    loss = 0.0
    for e in examples[1:]:
        loss = trainer.train_step(e)
    return time.perf_counter() - t0, loss


def _run_hf(path: str, seqs: list[list[int]], rank: int, threads: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(threads)
    model = get_peft_model(hf_model_from_gguf(path), LoraConfig(
        r=rank, lora_alpha=2.0 * rank, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)

    def step(tokens: list[int]) -> float:
        optimizer.zero_grad()
        ids = torch.tensor([tokens])
        logits = model(input_ids=ids[:, :-1]).logits[0]
        loss = F.cross_entropy(logits.float(), ids[0, 1:])
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step(seqs[0])  # warm-up
    t0 = time.perf_counter()
    loss = 0.0
    for s in seqs[1:]:
        loss = step(s)
    return time.perf_counter() - t0, loss


def _child(engine: str, path: str, seqs: list[list[int]], rank: int, threads: int, queue) -> None:
    try:
        seconds, loss = (_run_ktlab if engine == "ktlab" else _run_hf)(path, seqs, rank, threads)
        queue.put((seconds, loss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None))
    except Exception as exc:  # reported by the parent as one line
        queue.put((0.0, 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


def run_bench(path: str | Path, steps: int = 8, seq_len: int = 128, rank: int = 8, threads: int | None = None,
              seed: int = 0) -> list[FinetuneBenchResult]:
    """Both engines on the same sequences, each in a fresh process."""
    from ktlab.kernels import default_threads
    from ktlab.model import open_weights, resolve_model_path

    path = str(resolve_model_path(path))
    seqs = _sequences(open_weights(path).config.vocab_size, steps + 1, seq_len + 1, seed)
    threads = threads or default_threads()
    ctx = multiprocessing.get_context("spawn")
    results = []
    for engine in ENGINES:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(engine, path, seqs, rank, threads, queue))
        proc.start()
        seconds, loss, rss, error = queue.get()
        proc.join()
        if error is not None:
            raise ValueError(f"bench-finetune: {engine} failed: {error}")
        results.append(FinetuneBenchResult(engine, steps, seq_len, steps * seq_len / seconds, rss, loss))
    return results


def format_results(results: list[FinetuneBenchResult]) -> str:
    """A table with each engine's ratio to the first."""
    base = results[0]
    lines = ["| engine | steps x tokens | train tok/s | peak RSS MB | last loss | tok/s vs ktlab | RSS vs ktlab |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.engine} | {r.steps} x {r.seq_len} | {r.tok_s:.1f} | {r.peak_rss_mb:.0f} | "
                     f"{r.final_loss:.3f} | {r.tok_s / base.tok_s:.2f}x | {r.peak_rss_mb / base.peak_rss_mb:.2f}x |")
    return "\n".join(lines)
