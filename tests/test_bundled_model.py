"""The bundled tiny model: a trained Qwen3-MoE whose router is skewed and temporally local."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ktlab.model import BUNDLED, GGUFFile, load_model
from ktlab.runtime.generate import SamplingConfig, generate
from ktlab.sched.stats import RoutingRecorder, activation_counts, reuse_rate, top_share

MAX_FILE_BYTES = 25 * 10**6
# A paragraph in the style of the Python documentation (not copied from the training files).
PARAGRAPH = (
    "The :mod:`os` module provides a portable way of using operating system dependent functionality. "
    "If you just want to read or write a file see :func:`open`, if you want to manipulate paths, see the "
    ":mod:`os.path` module. The following function returns a list containing the names of the entries "
    "in the directory given by *path*. The list is in arbitrary order.\n"
)
MAX_PERPLEXITY = 60.0  # uniform guessing over the vocabulary would be 4096
MIN_REUSE_OVER_UNIFORM = 2.0  # next-token expert reuse vs random routing (k/E)
MIN_TOP10_SHARE = 0.2  # the hottest 10% of experts take at least this share of activations


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_file_is_small_and_standard():
    path = BUNDLED["tiny"]
    assert path.stat().st_size <= MAX_FILE_BYTES
    f = GGUFFile(path)
    assert f.arch == "qwen3moe" and f.get("general.file_type") == 7  # MOSTLY_Q8_0
    assert f.tensor_info("blk.0.ffn_gate_exps.weight").qtype.name == "Q8_0"
    assert f.config.num_experts == 64 and f.config.num_experts_per_tok == 4
    assert f.has("tokenizer.chat_template")


def routed(model, tokenizer, text):
    recorder = RoutingRecorder(model.cfg.num_layers, model.cfg.num_experts_per_tok)
    model.add_route_observer(recorder)
    ids = tokenizer.encode(text)
    logits = model.forward(torch.tensor(ids), model.new_cache(len(ids)))
    model.remove_route_observer(recorder)
    return ids, logits, recorder.trace()


def test_writes_the_domain(tiny):
    model, tokenizer = tiny
    ids, logits, _ = routed(model, tokenizer, PARAGRAPH)
    logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
    perplexity = math.exp(-float(logp.mean()))
    assert perplexity < MAX_PERPLEXITY, perplexity


def test_greedy_text_is_words(tiny):
    model, tokenizer = tiny
    out, _ = generate(model, tokenizer.encode("A list comprehension"), SamplingConfig(max_tokens=40))
    text = tokenizer.decode(out, skip_special=True)
    words = text.split()
    assert len(words) >= 5
    assert sum(w.isascii() for w in words) / len(words) > 0.9


def test_router_is_skewed_and_temporally_local(tiny):
    model, tokenizer = tiny
    _, _, trace = routed(model, tokenizer, PARAGRAPH * 2)
    cfg = model.cfg
    counts = activation_counts(trace, cfg.num_experts)
    assert np.all(counts.sum(axis=1) == trace.shape[0] * cfg.num_experts_per_tok)
    assert top_share(counts, 0.10).mean() > MIN_TOP10_SHARE
    uniform = cfg.num_experts_per_tok / cfg.num_experts
    assert reuse_rate(trace, 1).mean() > MIN_REUSE_OVER_UNIFORM * uniform


# Questions in the glossary's form whose terms the chat stage held out (scripts/train_tiny.py: every
# term whose index is 3 mod 10), and two that are no glossary term at all.
CHAT_QUESTIONS = ["What is abstract base class?", "Explain context manager.", "What does slice mean in Python?",
                  "How do I read a file line by line?", "What does the with statement do?"]


def test_chat_replies_are_text_that_does_not_loop(tiny):
    """The chat stage taught the ChatML format: replies are words, most end with <|im_end|>, and
    none repeats a 4-token phrase three times (before the stage, a third looped)."""
    from collections import Counter

    model, tok = tiny
    ended = 0
    for question in CHAT_QUESTIONS:
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))
        reply, stats = generate(model, prompt, SamplingConfig(max_tokens=96), stop_ids=[tok.eos_id])
        text = tok.decode([t for t in reply if t not in tok.special_ids])
        grams = Counter(tuple(reply[i : i + 4]) for i in range(len(reply) - 3))
        assert len(text.split()) >= 4 and max(grams.values(), default=0) < 3, (question, text)
        ended += stats.finish_reason == "stop"
    assert ended >= len(CHAT_QUESTIONS) // 2
