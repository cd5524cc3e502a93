#!/usr/bin/env python3
"""Train the bundled tiny Qwen3-MoE on the Python 3.11 documentation and export it as GGUF.

Maintainer tool: users never need to run it (the result is committed under ``models/``).

Corpus: the reST sources of the Python 3.11 documentation from Debian's ``python3-doc``
package (``apt-get install python3-doc``), PSF licence. The glossary is also turned into a few
hundred ChatML question/answer pairs so that ``--chat`` has something to imitate.

    python scripts/train_tiny.py                  # tokenizer + training + chat stage + export (~45 min)
    python scripts/train_tiny.py --export-only    # re-export the cached checkpoint
    python scripts/train_tiny.py --chat-only      # only the chat stage, from the bundled GGUF (~8 min)

The chat stage: after pre-training, a few minutes on the glossary chats alone (the loss on the
assistant's answers and their <|im_end|> only), every other step a batch of documentation windows
so the model keeps its text and its routing; a tenth of the glossary terms is held out, and the
share of their answers that end (<|im_end|> within 96 tokens) without looping is printed before and
after.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, trainers
from tokenizers.pre_tokenizers import ByteLevel
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ktlab.config import ModelConfig  # noqa: E402
from ktlab.model.tokenizer import CHATML_TEMPLATE, byte_level_pretokenizer  # noqa: E402

DEFAULT_CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHECKPOINT_EVERY_S = 300

TINY = ModelConfig(
    arch="qwen3moe", vocab_size=4096, hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2,
    head_dim=64, num_experts=64, num_experts_per_tok=4, moe_intermediate_size=64, intermediate_size=512,
    rms_norm_eps=1e-6, rope_theta=10000.0, context_length=1024, norm_topk_prob=True, tie_word_embeddings=True,
)


def read_corpus(corpus: Path) -> tuple[list[str], list[str]]:
    """All documentation files as texts, split deterministically into train and validation."""
    files = sorted(corpus.rglob("*.txt"))
    if not files:
        sys.exit(f"error: no documentation sources under {corpus} (apt-get install python3-doc)")
    texts = [f.read_text(encoding="utf-8", errors="replace").replace("\t", "    ") for f in files]
    train = [t for i, t in enumerate(texts) if i % 50 != 7]
    val = [t for i, t in enumerate(texts) if i % 50 == 7]
    return train, val


def glossary_chats(corpus: Path) -> list[str]:
    """ChatML question/answer pairs from the glossary: 'What is X?' -> the first paragraph."""
    path = corpus / "glossary.rst.txt"
    if not path.exists():
        return []
    chats, term, body = [], None, []

    def flush() -> None:
        if term and body:
            answer = " ".join(" ".join(body).split())
            answer = re.sub(r":\w+:`~?([^`<]+?)(?:\s*<[^>]+>)?`", r"\1", answer)
            for question in (f"What is {term}?", f"Explain {term}.", f"What does {term} mean in Python?"):
                chats.append(
                    f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
                )

    for line in path.read_text(encoding="utf-8").splitlines():
        if re.match(r"^   \S", line):
            flush()
            term, body = line.strip().strip("`"), []
        elif re.match(r"^      \S", line) and term is not None:
            body.append(line.strip())
        elif not line.strip() and body:
            flush()
            term, body = None, []
    flush()
    return chats


def glossary_pairs(corpus: Path) -> list[tuple[str, str]]:
    """(question, answer) pairs of :func:`glossary_chats`, in order."""
    pairs = []
    for chat in glossary_chats(corpus):
        user, assistant = chat.split("<|im_end|>\n<|im_start|>assistant\n")
        pairs.append((user.removeprefix("<|im_start|>user\n"), assistant.removesuffix("<|im_end|>\n")))
    return pairs


def split_held_out(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """Train pairs and held-out questions: every term whose index is 3 mod 10 (its three questions)."""
    train, held = [], []
    for i, (q, a) in enumerate(pairs):
        (held.append(q) if (i // 3) % 10 == 3 else train.append((q, a)))
    return train, held


def chat_example(encode, question: str, answer: str) -> tuple[list[int], list[bool]]:
    """Token ids of one ChatML exchange and the mask of what is learned (the answer and its end)."""
    prompt = encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    reply = encode(f"{answer}<|im_end|>\n")
    return prompt + reply, [False] * len(prompt) + [True] * len(reply)


def chat_batches(examples: list[tuple[list[int], list[bool]]], batch: int, pad: int, max_len: int,
                 rng: np.random.Generator):
    """Endless batches of chats, right-padded; labels -100 where nothing is learned."""
    while True:
        chosen = [examples[i] for i in rng.integers(0, len(examples), size=batch)]
        width = min(max_len, max(len(ids) for ids, _ in chosen))
        ids = torch.full((batch, width), pad, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for row, (tokens, learn) in enumerate(chosen):
            tokens, learn = tokens[:width], learn[:width]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, : len(tokens)] = torch.where(torch.tensor(learn), torch.tensor(tokens), -100)
        yield ids, labels


def optimizer_step(model, opt, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """One AdamW step on the next-token loss of ``ids`` (``labels`` -100: not learned); the loss."""
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def chat_stage(args, model, encode, pad: int, pairs: list[tuple[str, str]], doc_ids: np.ndarray) -> dict:
    """Fine-tune ``model`` on the chats for ``args.chat_minutes`` (see the module docstring)."""
    examples = [chat_example(encode, q, a) for q, a in pairs]
    rng = np.random.default_rng(args.seed + 1)
    chats = chat_batches(examples, args.batch, pad, args.seq, rng)
    docs = batches(doc_ids, args.seq, args.batch, rng)
    opt = torch.optim.AdamW(model.parameters(), lr=args.chat_lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0, budget, step = time.time(), args.chat_minutes * 60, 0
    bar = tqdm(total=int(budget), desc="chat stage", unit="s")
    model.train()
    while (elapsed := time.time() - t0) < budget:
        lr = args.chat_lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        for g in opt.param_groups:
            g["lr"] = lr
        if step % 2 == 0:
            ids, labels = next(chats)
        else:
            x = next(docs)
            ids, labels = x[:, :-1], x[:, :-1]
        loss = optimizer_step(model, opt, ids, labels)
        step += 1
        bar.update(min(int(time.time() - t0), bar.total) - bar.n)
        bar.set_postfix_str(f"step {step} loss {loss:.3f}")
    bar.close()
    return {"chat_steps": step, "chat_minutes": round((time.time() - t0) / 60, 1), "chat_pairs": len(pairs),
            "chat_lr": args.chat_lr}


def chat_quality(model_path: Path, questions: list[str], max_tokens: int = 96) -> dict:
    """Greedy replies of the GGUF at ``model_path`` (ktlab's engine) to ``questions``: the share that
    end (<|im_end|>) within ``max_tokens`` and the share that loop (a 4-gram of tokens three times)."""
    from collections import Counter

    from ktlab.model import load_model
    from ktlab.runtime.generate import SamplingConfig, generate

    model, tok = load_model(str(model_path))
    ended = looped = 0
    samples = []
    for q in questions:
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
        reply, stats = generate(model, prompt, SamplingConfig(max_tokens=max_tokens), stop_ids=[tok.eos_id])
        ended += stats.finish_reason == "stop"
        grams = Counter(tuple(reply[i : i + 4]) for i in range(len(reply) - 3))
        looped += bool(grams) and max(grams.values()) >= 3
        if len(samples) < 3:
            samples.append({"question": q, "reply": tok.decode([t for t in reply if t not in tok.special_ids])})
    n = max(len(questions), 1)
    return {"questions": len(questions), "ended": round(ended / n, 3), "looped": round(looped / n, 3),
            "samples": samples}


def train_tokenizer(texts: list[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer and ChatML special tokens at ids 0..2."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = byte_level_pretokenizer("qwen2")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=ByteLevel.alphabet(),
        show_progress=True, min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_all(tok: HFTokenizer, texts: list[str]) -> np.ndarray:
    """One long stream of token ids, documents separated by <|endoftext|>."""
    eos = tok.token_to_id("<|endoftext|>")
    out: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eos)
    return np.asarray(out, dtype=np.int64)


def hf_config(cfg: ModelConfig, aux_coef: float):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob, tie_word_embeddings=cfg.tie_word_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.context_length, output_router_logits=aux_coef > 0,
        router_aux_loss_coef=aux_coef, bos_token_id=0, eos_token_id=0,
    )


def batches(data: np.ndarray, seq: int, batch: int, rng: np.random.Generator):
    """Endless random windows of ``seq + 1`` tokens."""
    while True:
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        yield torch.from_numpy(np.stack([data[s : s + seq + 1] for s in starts]))


@torch.no_grad()
def evaluate(model, data: np.ndarray, seq: int, max_windows: int = 64) -> float:
    """Mean next-token loss on consecutive windows of the validation stream."""
    model.eval()
    losses = []
    for s in range(0, min(len(data) - seq - 1, max_windows * seq), seq):
        x = torch.from_numpy(data[s : s + seq + 1])[None]
        losses.append(model(input_ids=x[:, :-1], labels=x[:, :-1]).loss.item())
    model.train()
    return float(np.mean(losses))


def train(args, tok: HFTokenizer, train_ids: np.ndarray, val_ids: np.ndarray) -> dict:
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(hf_config(TINY, args.aux_coef))
    if args.init_from:
        model.load_state_dict(torch.load(args.init_from, map_location="cpu"))
        print(f"continuing from {args.init_from}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f} M parameters, {len(train_ids) / 1e6:.2f} M training tokens")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    rng = np.random.default_rng(args.seed)
    stream = batches(train_ids, args.seq, args.batch, rng)
    t0 = time.time()
    budget = args.max_minutes * 60
    # The bar counts whole seconds and never passes its total (tqdm drops the total when n
    # overflows it, which once crashed a finished run before it saved anything).
    bar = tqdm(total=int(budget), desc="train", unit="s")
    step = 0
    last_save = t0
    args.cache.mkdir(parents=True, exist_ok=True)
    # The schedule follows wall time, not steps: a busy machine trains fewer steps but always
    # finishes its cosine decay inside the budget.
    while (elapsed := time.time() - t0) < budget and step < args.steps:
        progress = max(elapsed / budget, step / args.steps)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * cosine
        for g in opt.param_groups:
            g["lr"] = lr
        x = next(stream)
        loss = optimizer_step(model, opt, x[:, :-1], x[:, :-1])
        step += 1
        bar.update(min(int(time.time() - t0), bar.total) - bar.n)
        bar.set_postfix_str(f"step {step} loss {loss:.3f} lr {lr:.1e}")
        if time.time() - last_save > CHECKPOINT_EVERY_S:  # a crash or a kill loses minutes, not the run
            torch.save(model.state_dict(), args.cache / "model.pt")
            last_save = time.time()
    bar.close()
    minutes = (time.time() - t0) / 60
    val_loss = evaluate(model, val_ids, args.seq)
    print(f"validation loss {val_loss:.3f} (perplexity {math.exp(val_loss):.1f}) after {minutes:.1f} min")
    torch.save(model.state_dict(), args.cache / "model.pt")
    info = {
        "steps": step, "minutes": round(minutes, 1), "val_loss": round(val_loss, 4),
        "val_perplexity": round(math.exp(val_loss), 2), "train_tokens_seen": step * args.batch * args.seq,
        "corpus_tokens": int(len(train_ids)), "params": n_params, "seq": args.seq, "batch": args.batch,
        "lr": args.lr, "aux_coef": args.aux_coef, "seed": args.seed,
    }
    (args.cache / "train_info.json").write_text(json.dumps(info, indent=2))
    return info


def tokenizer_data(tokens: list[str], merges: list[str]):
    """The GGUF tokenizer of the tiny model from its vocabulary (in id order) and merges."""
    from ktlab.model.gguf_write import GGUFTokenizerData

    return GGUFTokenizerData(
        tokens=tokens, merges=merges, token_types=[3 if t in SPECIAL_TOKENS else 1 for t in tokens], pre="qwen2",
        eos_id=tokens.index("<|im_end|>"), bos_id=tokens.index("<|endoftext|>"),
        padding_id=tokens.index("<|endoftext|>"), chat_template=CHATML_TEMPLATE,
    )


def hf_tokenizer_data(tok: HFTokenizer):
    """:func:`tokenizer_data` of a trained ``tokenizers`` BPE."""
    spec = json.loads(tok.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    return tokenizer_data(tokens, [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])


def gguf_tokenizer_data(path: Path):
    """:func:`tokenizer_data` of the GGUF at ``path`` (the chat stage alone keeps its tokenizer)."""
    from ktlab.model.gguf import GGUFFile

    f = GGUFFile(path)
    return tokenizer_data(list(f.require("tokenizer.ggml.tokens")), list(f.require("tokenizer.ggml.merges")))


def export(args, tokdata) -> Path:
    """Write the cached checkpoint as a Q8_0 GGUF under ``models/``."""
    from ktlab.model.gguf_write import write_gguf_from_hf_state

    state = torch.load(args.cache / "model.pt", map_location="cpu")
    out = args.out / "tiny-qwen3moe-q8_0.gguf"
    write_gguf_from_hf_state(
        out, TINY, {k: v.float().numpy() for k, v in state.items()}, tokdata, qtype="Q8_0",
        name="ktlab tiny Qwen3-MoE (Python docs)",
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="directory of the docs' reST sources")
    p.add_argument("--out", type=Path, default=ROOT / "models", help="where the GGUF goes")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "tiny", help="tokenizer/checkpoint cache")
    p.add_argument("--steps", type=int, default=100_000, help="stop after this many optimizer steps")
    p.add_argument("--max-minutes", type=float, default=40.0, help="training wall time (the LR schedule spans it)")
    p.add_argument("--seq", type=int, default=256, help="training window length")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=60, help="warm-up steps")
    p.add_argument("--aux-coef", type=float, default=0.001, help="router load-balancing loss weight")
    p.add_argument("--chat-repeat", type=int, default=3, help="times the glossary chats are repeated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default; 1 on a busy box)")
    p.add_argument("--init-from", type=Path, default=None, help="start from this checkpoint (model.pt)")
    p.add_argument("--reuse-tokenizer", action="store_true", help="keep the cached tokenizer.json")
    p.add_argument("--export-only", action="store_true", help="only re-export the cached checkpoint")
    p.add_argument("--chat-minutes", type=float, default=8.0, help="the chat stage's wall time (0: skip it)")
    p.add_argument("--chat-lr", type=float, default=5e-4, help="the chat stage's peak learning rate")
    p.add_argument("--chat-only", action="store_true",
                   help="only the chat stage, starting from the GGUF in --out (its tokenizer kept)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok_path = args.cache / "tokenizer.json"
    gguf_path = args.out / "tiny-qwen3moe-q8_0.gguf"
    if args.export_only:
        export(args, hf_tokenizer_data(HFTokenizer.from_file(str(tok_path))))
        return
    train_texts, val_texts = read_corpus(args.corpus)
    pairs, held_out = split_held_out(glossary_pairs(args.corpus))
    chats = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for q, a in pairs]
    print(f"corpus: {len(train_texts)} train / {len(val_texts)} validation files, {len(chats)} chat pairs "
          f"({len(held_out)} questions held out)")
    args.cache.mkdir(parents=True, exist_ok=True)
    from transformers import Qwen3MoeForCausalLM

    if args.chat_only:
        from ktlab.benchmarks.finetune import hf_model_from_gguf
        from ktlab.model import load_model

        tokdata = gguf_tokenizer_data(gguf_path)
        _, ktok = load_model(str(gguf_path))
        encode, pad = ktok.encode, tokdata.padding_id
        model = hf_model_from_gguf(gguf_path)
        info = json.loads((args.out / "train_info.json").read_text()) if (args.out / "train_info.json").exists() \
            else {}
    else:
        if args.reuse_tokenizer and tok_path.exists():
            tok = HFTokenizer.from_file(str(tok_path))
        else:
            tok = train_tokenizer(train_texts + chats, TINY.vocab_size)
            tok.save(str(tok_path))
        tokdata = hf_tokenizer_data(tok)
        train_ids = encode_all(tok, train_texts + chats * args.chat_repeat)
        val_ids = encode_all(tok, val_texts)
        info = train(args, tok, train_ids, val_ids)
        encode, pad = (lambda text: tok.encode(text, add_special_tokens=False).ids), tokdata.padding_id
        model = Qwen3MoeForCausalLM(hf_config(TINY, 0.0))
        model.load_state_dict(torch.load(args.cache / "model.pt", map_location="cpu"))
    if args.chat_minutes > 0:
        before = chat_quality(gguf_path, held_out) if args.chat_only else None
        doc_ids = np.concatenate([np.asarray(encode(t), dtype=np.int64) for t in train_texts])
        info.update(chat_stage(args, model, encode, pad, pairs, doc_ids))
        torch.save(model.state_dict(), args.cache / "model.pt")
        export(args, tokdata)
        after = chat_quality(gguf_path, held_out)
        info.update({"chat_held_out_before": before, "chat_held_out_after": after})
        print(f"held-out chat questions: {json.dumps({'before': before, 'after': after}, indent=2)}")
    else:
        export(args, tokdata)
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
