#!/usr/bin/env python3
"""Write the notebooks under notebooks/ from the cell sources below (outputs stripped).

Maintainer tool: edit the cells here, run it, commit the .ipynb files.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent

TOUR = [
    new_markdown_cell(
        "# ktlab tour\n\n"
        "ktlab is a lab for **hybrid CPU+GPU inference of Mixture-of-Experts (MoE) models**. This tour "
        "loads the bundled tiny Qwen3-MoE (trained on the Python documentation), generates text, and "
        "looks at how its router picks experts: the statistics that hot/cold expert placement is built on.\n\n"
        "Run it top to bottom (Run > Run All Cells). Everything runs on the CPU."
    ),
    new_code_cell(
        "from ktlab.info import describe, format_description\n"
        "from ktlab.model import load_model\n\n"
        "print(format_description(describe('tiny')))"
    ),
    new_markdown_cell(
        "## Generate\n\nThe model is a real Qwen3-MoE: attention, RMSNorm, RoPE and a router that sends every "
        "token to 4 of 64 experts in each of its 6 layers."
    ),
    new_code_cell(
        "from ktlab.runtime.generate import GenerationStats, SamplingConfig, generate_stream\n\n"
        "model, tokenizer = load_model('tiny')\n"
        "prompt = 'The :mod:`json` module'\n"
        "stats = GenerationStats()\n"
        "decoder = tokenizer.stream_decoder()\n"
        "text = prompt\n"
        "for token in generate_stream(model, tokenizer.encode(prompt), SamplingConfig(max_tokens=60),\n"
        "                             stop_ids=[tokenizer.eos_id], stats=stats):\n"
        "    text += decoder.push(token)\n"
        "print(text)\n"
        "print(f'\\nprefill {stats.prefill_tps:.0f} tok/s, decode {stats.decode_tps:.0f} tok/s')"
    ),
    new_markdown_cell(
        "## Which experts does the router pick?\n\n"
        "We record the routing decisions of every layer while the model reads a paragraph. A skewed "
        "histogram means a few *hot* experts do most of the work: those are the ones worth keeping on a GPU."
    ),
    new_code_cell(
        "import numpy as np\n"
        "import plotly.graph_objects as go\n"
        "import torch\n\n"
        "from ktlab.sched.stats import RoutingRecorder, activation_counts, reuse_rate\n\n"
        "paragraph = ('Lists are mutable sequences, typically used to store collections of homogeneous items. '\n"
        "             'The list data type has some more methods. Here are all of the methods of list objects: '\n"
        "             'list.append(x) adds an item to the end of the list.')\n"
        "recorder = RoutingRecorder(model.cfg.num_layers, model.cfg.num_experts_per_tok)\n"
        "model.add_route_observer(recorder)\n"
        "ids = tokenizer.encode(paragraph)\n"
        "model.forward(torch.tensor(ids), model.new_cache(len(ids)))\n"
        "model.remove_route_observer(recorder)\n"
        "trace = recorder.trace()  # [tokens, layers, k]\n"
        "counts = activation_counts(trace, model.cfg.num_experts)\n"
        "go.Figure(go.Heatmap(z=counts, colorscale='Viridis', colorbar_title='tokens'),\n"
        "          layout=dict(title='Expert activations per layer', xaxis_title='expert', yaxis_title='layer',\n"
        "                      height=320))"
    ),
    new_code_cell(
        "k, E = model.cfg.num_experts_per_tok, model.cfg.num_experts\n"
        "print('share of a token\\'s experts already used by the previous token, per layer:')\n"
        "print(np.round(reuse_rate(trace, 1), 2), f'(uniform random routing: {k / E:.2f})')"
    ),
    new_markdown_cell(
        "## The lab: place experts and see what it buys\n\n"
        "A `Session` records the router on a prompt set, makes a placement (which experts live in VRAM) and "
        "replays the routing through a runtime policy on an accelerator profile. Without an NVIDIA GPU the "
        "accelerator is *simulated* from a spec sheet, and every time it reports says so.\n\n"
        "In the dashboard below, lower the **hot if share >** slider: more experts count as hot, the white squares "
        "(GPU-resident) spread over the heatmap, and the modeled speed moves."
    ),
    new_code_cell(
        "from ktlab.lab import Session\n\n"
        "session = Session('tiny', accelerator='simulated:rtx4090-24g', budget=0.15)\n"
        "session.record()\n"
        "result = session.simulate('value')\n"
        "assert 0 < result.hit_rate <= 1 and result.simulated == 'rtx4090-24g'\n"
        "print(f'value-driven cache at 15% VRAM: hit rate {result.hit_rate:.1%}, '\n"
        "      f'decode {result.decode_tok_s:.0f} tok/s (simulated {result.simulated})')\n"
        "session"
    ),
    new_markdown_cell(
        "### Where does a token's time go?\n\n"
        "For the current placement the cost model prices every layer: CPU time for the cold experts, GPU time "
        "for the dense part and the hot experts, PCIe time for copies (a static placement copies nothing in "
        "decode; a prompt's prefill may stream cold experts through a staging buffer when that pays). "
        "`batch` is the number of concurrent decode tokens: they share the experts they pick, so a step reads "
        "about `E (1 - (1 - k/E)^B)` distinct experts per layer with random routing, fewer with this skewed "
        "router."
    ),
    new_code_cell(
        "times = session.layer_times(batch=1)\n"
        "decode, prefill = times['decode'], times['prefill']\n"
        "for layer in range(model.cfg.num_layers):\n"
        "    cpu, gpu, wall = (x[layer] * 1e6 for x in (decode.cpu_s, decode.gpu_s, decode.wall_s))\n"
        "    print(f'layer {layer}: CPU {cpu:5.1f} us  GPU {gpu:5.1f} us  wall {wall:5.1f} us')\n"
        "static = session.simulate('static:frequency')  # the same placement, replayed by the simulator\n"
        "assert abs(decode.tok_s - static.decode_tok_s) < 1e-6 * static.decode_tok_s\n"
        "curve = session.batch_model((1, 4, 16))\n"
        "assert curve['recorded'][2] > curve['recorded'][0]  # 16 tokens share expert reads\n"
        "assert curve['distinct_recorded'][2] < curve['distinct_random'][2]  # a skewed router shares more\n"
        "print(f'decode {decode.tok_s:,.0f} tok/s, prefill {prefill.tok_s:,.0f} tok/s; 16 concurrent tokens: '\n"
        "      f'{curve[\"recorded\"][2]:,.0f} tok/s aggregate (modeled, {session.accelerator.label})')"
    ),
    new_markdown_cell(
        "### The dashboard\n\n"
        "- **placement / hot if share > / VRAM %**: the static placement (heatmap, per-layer time split).\n"
        "- **accelerator**: the GPU profile every modeled number is priced with (re-plans everything).\n"
        "- **runtime / deferral**: a cache policy replayed over the recorded routing.\n"
        "- **batch B**: concurrent decode tokens; the throughput-vs-B plot, and *measure batches* runs the real "
        "engine with B concurrent requests on this CPU (measured).\n"
        "- **generate**: measured decode and prefill tok/s while the model writes, next to the modeled lines.\n"
        "- **prefix cache**: GPU / RAM / disk tier sizes and page size; *run chat* runs a multi-turn chat "
        "through the engine and plots page hits per tier and the prompt tokens the cache saved.\n\n"
        "Modeled numbers say *modeled, simulated ...*; measured ones say *measured*."
    ),
    new_code_cell("session.dashboard()"),
    new_markdown_cell(
        "The same measurements without the dashboard: batched decode on the real engine, and the three-tier "
        "prefix cache on a multi-turn chat (the second turn of a conversation re-reads the first from the cache)."
    ),
    new_code_cell(
        "from ktlab.lab import ChatCacheConfig\n\n"
        "rows = session.measure_batch((1, 8))\n"
        "for r in rows:\n"
        "    print(f\"B={r['batch']}: {r['decode_tok_s']:.0f} tok/s aggregate decode (measured, this CPU); \"\n"
        "          f\"bandwidth-bound ideal {r['ideal_tok_s']:,.0f} tok/s -> {r['share_of_ideal']:.1%}\")\n"
        "assert rows[1]['decode_tok_s'] > rows[0]['decode_tok_s']\n"
        "# The tiny model's weights are a few MB: its steps are bound by per-step overhead, far from the\n"
        "# bandwidth-bound ideal (on a 30B-shape model at 8-16 tokens the same engine reaches 50-79% of a probed\n"
        "# ideal and 65-93% of a read of each step's own bytes right after it, ktlab serve --paired-reads, on\n"
        "# AVX-512 and AVX2 hosts alike: docs/benchmarks.md)\n"
        "assert all(0 < r['share_of_ideal'] < 0.5 for r in rows)\n"
        "chat = session.chat_cache(ChatCacheConfig(conversations=3, turns=3))\n"
        "print('page hits per tier:', chat.hits, f'; {chat.saved_tokens} of {sum(chat.prompt_tokens)} prompt tokens '\n"
        "      'served from the cache')\n"
        "assert chat.completed and chat.cached_tokens[-1] > 0 and chat.saved_tokens <= sum(chat.prompt_tokens)"
    ),
]


EXPLAINED = [
    new_markdown_cell(
        "# Hybrid MoE inference, explained\n\n"
        "Why does decode crawl when experts live in CPU memory, when is it worth copying an expert to the GPU, "
        "and why is deciding *which* experts stay in VRAM a caching problem? Each section asks you to predict, "
        "then the numbers answer. GPU figures come from a spec-sheet profile: they are **simulated**."
    ),
    new_markdown_cell(
        "## 1. Decode is memory-bound\n\n"
        "One Qwen3-30B-A3B expert has 3 x 2048 x 768 weights. In decode a token multiplies each of its 8 experts "
        "once: about 2 multiply-adds per weight byte read. **Predict:** is a 2-core CPU limited by its "
        "arithmetic or by reading the weights?"
    ),
    new_code_cell(
        "from ktlab.sched.cost import DEFAULT_CPU, ExpertCost, get_profile\n\n"
        "cost = ExpertCost.for_shape(2048, 768, 34 / 32, get_profile('rtx4090-24g'), DEFAULT_CPU)\n"
        "read_s = cost.expert_bytes / (DEFAULT_CPU.bandwidth_gbps * 1e9)\n"
        "compute_s = cost.ops_per_token / (DEFAULT_CPU.gops * 1e9)\n"
        "print(f'one expert: {cost.expert_bytes / 1e6:.1f} MB of Q8_0 weights')\n"
        "print(f'reading them: {read_s * 1e3:.3f} ms; computing one token: {compute_s * 1e3:.3f} ms')\n"
        "assert read_s > 5 * compute_s  # memory-bound by a wide margin\n"
        "print(f'so decode is memory-bound: {read_s / compute_s:.0f}x more time reading than computing')"
    ),
    new_markdown_cell(
        "## 2. When should an expert move to the GPU?\n\n"
        "Copying an expert over PCIe costs time once; every later use on the GPU saves `t_cpu - t_gpu`. And in "
        "prefill, one expert may serve hundreds of tokens at once. **Predict:** from how many tokens does "
        "copy-then-GPU beat the CPU for one use?"
    ),
    new_code_cell(
        "import plotly.graph_objects as go\n\n"
        "tokens = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]\n"
        "cpu = [cost.t_cpu(n) * 1e3 for n in tokens]\n"
        "fetch = [(cost.t_pcie() + cost.t_gpu(n)) * 1e3 for n in tokens]\n"
        "crossover = next(n for n, c, f in zip(tokens, cpu, fetch) if f < c)\n"
        "print(f'copy-then-GPU wins from {crossover} tokens on '\n"
        "      f'(simulated rtx4090-24g, PCIe {cost.gpu.pcie_gbps} GB/s)')\n"
        "print(f'break-even for a resident expert in decode: {cost.t_pcie() / cost.saving(1):.1f} later uses')\n"
        "assert crossover > 1\n"
        "lines = [go.Scatter(x=tokens, y=cpu, name='CPU'),\n"
        "         go.Scatter(x=tokens, y=fetch, name='copy + GPU (simulated)')]\n"
        "go.Figure(lines, layout=dict(title='One expert, n tokens', xaxis_type='log', xaxis_title='tokens',\n"
        "                             yaxis_title='ms', height=320))"
    ),
    new_markdown_cell(
        "## 3. VRAM as an expert cache\n\n"
        "Only a fraction of the experts fit in VRAM. LRU keeps the recently used, LFU the often used; our "
        "value-driven policy learns online how likely each expert is to be picked next from its recency and "
        "frequency; Belady's policy knows the future and is the upper bound. **Predict:** at 5% of experts "
        "resident (fewer than a token's 8), does LRU still hit?"
    ),
    new_code_cell(
        "from ktlab.sched.cache import hit_rate\n"
        "from ktlab.sched.traces import PRESETS, generate_trace\n\n"
        "ids, weights = generate_trace(PRESETS['qwen3-30b-a3b'], 200, seed=0)\n"
        "budgets = [0.05, 0.15, 0.30]\n"
        "rates = {p: [hit_rate(ids, p, round(b * 128), 128, weights) for b in budgets]\n"
        "         for p in ('lru', 'lfu', 'value', 'belady')}\n"
        "for p, r in rates.items():\n"
        "    print(f'{p:7s}', '  '.join(f'{b:.0%}: {x:.1%}' for b, x in zip(budgets, r)))\n"
        "for b, v, l, f in zip(rates['belady'], rates['value'], rates['lru'], rates['lfu']):\n"
        "    assert b >= v >= min(l, f)\n"
        "lines = [go.Scatter(x=[b * 100 for b in budgets], y=[x * 100 for x in r], name=p) for p, r in rates.items()]\n"
        "go.Figure(lines,\n"
        "          layout=dict(title='Hit rate vs VRAM budget (synthetic Qwen3-30B-A3B trace)',\n"
        "                      xaxis_title='% of experts resident', yaxis_title='hit rate %', height=320))"
    ),
    new_markdown_cell(
        "The gap between the online policies and Belady is the part of the future a policy cannot see from the "
        "past. `ktlab bench-policies` puts every policy side by side, with the greedy scheduler deciding per "
        "token what runs where, and models the decode speed each one buys."
    ),
]

TUNE = [
    new_markdown_cell(
        "# Tune a placement and export it\n\n"
        "Record the router on your prompts, choose the accelerator profile you will deploy on, sweep VRAM budgets "
        "and policies for it, pick a configuration, and export it as KTransformers/SGLang flags and llama.cpp "
        "`-ot` rules."
    ),
    new_code_cell(
        "from ktlab.lab import Session\n"
        "from ktlab.lab.session import ACCELERATORS\n\n"
        "session = Session('tiny', accelerator='simulated:rtx4090-24g')\n"
        "trace = session.record()\n"
        "print(f'recorded {trace.ids.shape[0]} tokens')"
    ),
    new_markdown_cell(
        "## The accelerator profile\n\n"
        "Every modeled number is priced with a GPU profile (spec-sheet bandwidth, TFLOP/s, PCIe; *simulated* "
        "without that GPU here, `'cuda'` measures the real one). On the tiny model a GPU expert costs little more "
        "than a kernel launch, so profiles differ mostly in prefill; on a 30B model they differ a lot."
    ),
    new_code_cell(
        "by_profile = {}\n"
        "for spec in ACCELERATORS:\n"
        "    session.set_accelerator(spec)\n"
        "    r = session.simulate('value', budget=0.2)\n"
        "    by_profile[spec] = r\n"
        "    print(f'{spec:24s} decode {r.decode_tok_s:7,.0f} tok/s  prefill {r.prefill_tok_s:9,.0f} tok/s '\n"
        "          f'(simulated {r.simulated})')\n"
        "names = ('rtx3090-24g', 'rtx4090-24g', 'h100-80g')\n"
        "prefill = [by_profile[f'simulated:{name}'].prefill_tok_s for name in names]\n"
        "assert prefill == sorted(prefill) and prefill[0] < prefill[-1]  # faster GPUs prefill faster\n"
        "TARGET = 'simulated:rtx4090-24g'  # the GPU you deploy on\n"
        "session.set_accelerator(TARGET)\n"
        "assert session.accelerator.label == 'simulated rtx4090-24g'\n"
        "session.sweep(budgets=(0.05, 0.1, 0.2, 0.4))"
    ),
    new_code_cell(
        "rows = session.sweep(policies=('static:frequency', 'value'), budgets=(0.1, 0.2, 0.4), plot=False)\n"
        "best = max(rows, key=lambda r: r['decode_tok_s_simulated'] / (1 + r['budget']))  # speed per VRAM spent\n"
        "print('picked:', best, 'for', session.accelerator.label)\n"
        "placement = session.place('frequency', budget=best['budget'])\n"
        "assert placement.num_gpu_experts == session.slots(best['budget'])\n"
        "session"
    ),
    new_code_cell(
        "import re\n"
        "import tempfile\n\n"
        "out = tempfile.mkdtemp(prefix='ktlab-tuned-')\n"
        "result = session.export('all', out)\n"
        "print(result.summary)\n"
        "assert result.llama_cpp is not None and result.kt is not None\n"
        "for path in result.paths.values():\n"
        "    assert path.exists(), path\n"
        "plan = result.llama_cpp.plan  # llama.cpp places whole layers' experts\n"
        "if plan.cpu_layers:\n"
        "    rx = re.compile(result.llama_cpp.cpu_regex)\n"
        "    assert rx.search(f'blk.{plan.cpu_layers[0]}.ffn_up_exps.weight')\n"
        "    if plan.gpu_layers:\n"
        "        assert not rx.search(f'blk.{plan.gpu_layers[0]}.ffn_up_exps.weight')\n"
        "print('llama.cpp:', result.llama_cpp.shell)"
    ),
]


FINETUNE = [
    new_markdown_cell(
        "# Fine-tune an MoE with its experts quantized on the CPU\n\n"
        "KTransformers' fifth pillar: train small **LoRA** adapters on the attention projections of a big MoE "
        "while its experts stay frozen, quantized, in CPU memory. Each MoE layer runs forward in ktlab's C++ "
        "expert kernels on the stored Q8_0 blocks and backward through the *transposed* products of the same "
        "blocks (a row dequantized at a time, never a whole matrix); the dense part is torch.\n\n"
        "Here: the bundled tiny Qwen3-MoE (trained on the Python docs, never on chats) learns to answer "
        "40 short Python questions (`ktlab/data/finetune/python_qa.jsonl`, CC0), 10% held out."
    ),
    new_code_cell(
        "from ktlab.lab import Session\n\n"
        "session = Session('tiny')\n"
        "question = 'How do I reverse a list?'\n"
        "chat = session.tokenizer.apply_chat_template([{'role': 'user', 'content': question}])\n"
        "before = session.generate(chat, max_tokens=24, stream=False)\n"
        "print('before:', before)"
    ),
    new_markdown_cell(
        "## Train\n\nOne chat a step, AdamW on the adapters only, loss on the assistant's words only. "
        "The plot fills in as it trains (measured, this machine)."
    ),
    new_code_cell(
        "result = session.finetune(steps=80, lora_rank=8, lr=2e-3)\n"
        "drop = 1 - result.heldout_after / result.heldout_before\n"
        "print(f'held-out loss {result.heldout_before:.3f} -> {result.heldout_after:.3f} ({drop:.0%} lower) '\n"
        "      f'in {result.seconds:.1f} s, {result.tok_s:.0f} tok/s, peak RSS {result.peak_rss_mb:.0f} MB')\n"
        "assert drop >= 0.10, drop"
    ),
    new_markdown_cell("## What changed\n\nThe same question, greedy, with the adapter applied (not merged):"),
    new_code_cell(
        "after = session.generate(chat, max_tokens=24, stream=False)\n"
        "print('before:', before)\n"
        "print('after: ', after)\n"
        "assert after != before"
    ),
    new_markdown_cell(
        "## Where the time goes\n\nThe frozen experts' forward and backward (C++ kernels, recomputing gate and "
        "up in backward instead of storing them) against everything else (torch: attention, norms, adapters, "
        "the optimizer)."
    ),
    new_code_cell(
        "import plotly.graph_objects as go\n\n"
        "experts = result.expert_seconds\n"
        "rest = result.seconds - experts\n"
        "go.FigureWidget(go.Bar(x=['experts fwd+bwd (C++)', 'the rest (torch)'], y=[experts, rest]),\n"
        "                layout=dict(title='seconds of the run (measured)', height=320))"
    ),
    new_markdown_cell(
        "`ktlab finetune --model FILE.gguf --data FILE.jsonl --steps N --output DIR` does the same from a shell "
        "(`--merge OUT.gguf` also writes a GGUF with the adapter merged in, which llama.cpp loads); "
        "`ktlab generate --lora DIR` applies an adapter; `peft` loads it onto the transformers model."
    ),
]


def keep_cell_ids(cells: list, path: Path) -> None:
    """Give unchanged cells (same place, type and source) the ids they already have in ``path``, so a
    regeneration only changes the cells that changed."""
    if not path.exists():
        return
    old = nbformat.read(path, as_version=4).cells
    for new, before in zip(cells, old, strict=False):
        if new.cell_type == before.cell_type and new.source == before.source and "id" in before:
            new["id"] = before["id"]


def write(name: str, cells: list) -> Path:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
    path = ROOT / "notebooks" / name
    keep_cell_ids(nb.cells, path)
    path.parent.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    print(write("01_tour.ipynb", TOUR))
    print(write("02_hybrid_inference_explained.ipynb", EXPLAINED))
    print(write("03_tune_and_export.ipynb", TUNE))
    print(write("04_finetune.ipynb", FINETUNE))
