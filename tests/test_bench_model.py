"""``ktlab bench``'s engines: ktlab's runs the serving path (paged KV, forward_batch) and must
decode what plain generation decodes."""

from __future__ import annotations

from ktlab.benchmarks.model import KtlabEngine
from ktlab.runtime.generate import SamplingConfig, generate


def test_ktlab_engine_decodes_the_greedy_tokens_of_generate(gguf_q4km):
    """Prefill in chunks, then one forward_batch call a token (the whole decode step in C++ on the
    Q4_K_M mix): the same greedy tokens as ``generate`` (the per-layer model.forward path)."""
    engine = KtlabEngine(gguf_q4km, 96, None)
    prompt = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    engine.prefill(prompt[:-1])
    tokens, token = [], prompt[-1]
    for _ in range(24):
        token = int(engine._step([token])[-1].argmax())
        tokens.append(token)
    assert engine.length == len(prompt) - 1 + 24
    assert tokens == list(generate(engine.model, prompt, SamplingConfig(max_tokens=24))[0])
