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
    new_code_cell("session.dashboard()"),
]


def write(name: str, cells: list) -> Path:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
    path = ROOT / "notebooks" / name
    path.parent.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    print(write("01_tour.ipynb", TOUR))
