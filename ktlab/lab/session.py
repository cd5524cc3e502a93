"""The notebook-facing object: one model, its routing statistics, a placement, and the tools.

    from ktlab.lab import Session
    s = Session("tiny", accelerator="simulated:rtx4090-24g")
    s.generate("A list comprehension")      # streams text into the cell
    s.record()                               # routing trace on the bundled prompt set
    s.place("threshold", t=0.02)             # hot/cold split at a 2% activation share
    s.simulate("value", budget=0.15)         # modeled hit rate and tok/s (simulated)
    s.sweep()                                # hit rate vs budget per policy (a plotly figure)
    s.dashboard()                            # sliders + live heatmap
    s.export("llama.cpp", "tuned/")          # flags for production engines

The model is only ever touched by the Session's own methods; the dashboard calls them.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path

import numpy as np

from ktlab.lab.telemetry import Telemetry
from ktlab.runtime.device import make_accelerator
from ktlab.sched import placement as placements
from ktlab.sched.cost import DEFAULT_CPU, ExpertCost
from ktlab.sched.simulate import SimConfig, SimResult, simulate
from ktlab.sched.stats import Trace

SWEEP_POLICIES = ("static:frequency", "lru", "lfu", "value", "belady")
SWEEP_BUDGETS = (0.05, 0.10, 0.15, 0.30, 0.50)


class Session:
    """A model loaded for exploration, with a simulated (or real CUDA) accelerator profile."""

    def __init__(self, model: str | Path = "tiny", accelerator: str = "simulated:rtx4090-24g",
                 budget: float = 0.15, threads: int | None = None) -> None:
        from ktlab.model import load_model

        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"Session budget is a share of all experts in [0, 1], got {budget}")
        self.model_name = str(model)
        self.model, self.tokenizer = load_model(model, threads=threads)
        self.cfg = self.model.cfg
        self.accelerator = make_accelerator(accelerator)
        cpu0 = self.model.layers[0].moe.backends["cpu"].experts
        cfg = self.cfg
        self.cost = ExpertCost.for_model(cfg, cpu0.expert_bytes, self.accelerator.profile, DEFAULT_CPU)
        self.budget = budget
        self.telemetry = Telemetry()
        self.trace: Trace | None = None
        self.placement = placements.uniform(self.slots(budget), np.zeros((cfg.num_layers, cfg.num_experts)))

    # -- running the model ------------------------------------------------------------------
    def generate(self, prompt: str, max_tokens: int = 64, stream: bool = True, **sampling) -> str:
        """Generate from ``prompt`` (greedy unless ``temperature=`` ...), printing as it goes;
        each token's measured speeds go to :attr:`telemetry`."""
        from ktlab.runtime.generate import GenerationStats, SamplingConfig, generate_stream

        config = SamplingConfig(max_tokens=max_tokens, **sampling)
        decoder = self.tokenizer.stream_decoder()
        pieces = []
        stats = GenerationStats()
        for token in generate_stream(self.model, self.tokenizer.encode(prompt), config,
                                     stop_ids=[self.tokenizer.eos_id], stats=stats):
            self.telemetry.publish(tokens=stats.generated_tokens, prefill_tok_s=stats.prefill_tps,
                                   decode_tok_s=stats.decode_tps)
            if token in self.tokenizer.special_ids:
                continue
            piece = decoder.push(token)
            pieces.append(piece)
            if stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        self.telemetry.flush()
        if stream:
            sys.stdout.write("\n")
        return "".join(pieces)

    def record(self, prompts: list[str] | None = None, max_tokens: int = 256) -> Trace:
        """Record the router on ``prompts`` (default: the bundled prompt set); the placement is
        then re-made by frequency at the session's budget."""
        from ktlab.benchmarks.policies import PROMPTS, read_prompts
        from ktlab.sched.stats import record_trace

        texts = prompts if prompts is not None else read_prompts(PROMPTS)
        self.trace = record_trace(self.model, self.tokenizer, texts, max_tokens, {"model": self.model_name})
        self.place("frequency")
        return self.trace

    # -- placements and the science -----------------------------------------------------------
    @property
    def counts(self) -> np.ndarray:
        """[L, E] activation counts of the recorded trace (zeros before :meth:`record`)."""
        if self.trace is None:
            return np.zeros((self.cfg.num_layers, self.cfg.num_experts), dtype=np.int64)
        return self.trace.counts()

    def slots(self, budget: float | None = None) -> int:
        """GPU expert slots for a budget (share of all experts; default the session's)."""
        b = self.budget if budget is None else budget
        return placements.budget_from_fraction(b, self.cfg.num_layers, self.cfg.num_experts)

    def place(self, strategy: str = "frequency", budget: float | None = None, **params) -> placements.ExpertPlacement:
        """Make (and keep) a static placement: uniform, frequency, front-loading, random, threshold (t=)."""
        if budget is not None:
            if not 0.0 <= budget <= 1.0:
                raise ValueError(f"budget is a share of all experts in [0, 1], got {budget}")
            self.budget = budget
        self.placement = placements.make_placement(strategy, self.slots(), self.counts, **params)
        return self.placement

    def _need_trace(self) -> Trace:
        if self.trace is None:
            raise ValueError("no routing trace yet: call session.record() first")
        return self.trace

    def simulate(self, policy: str = "value", budget: float | None = None, deferral: int = 0) -> SimResult:
        """Replay the recorded trace through ``policy`` at ``budget`` (modeled, labeled simulated)."""
        t = self._need_trace()
        config = SimConfig(policy, self.budget if budget is None else budget, deferral=deferral,
                           prefill_tokens=min(256, t.ids.shape[0]))
        return simulate(t.ids, t.num_experts, self.cost, config, t.weights)

    def sweep(self, policies=SWEEP_POLICIES, budgets=SWEEP_BUDGETS, plot: bool = True):
        """Bare-cache hit rate (and modeled decode tok/s) for policies x budgets: a figure, or the rows."""
        from ktlab.sched.cache import POLICIES, hit_rate

        t = self._need_trace()
        L, E = t.ids.shape[1], t.num_experts
        rows = []
        for budget in budgets:
            for policy in policies:
                result = self.simulate(policy, budget)
                capacity = placements.even_split(self.slots(budget), L, E)
                hit = hit_rate(t.ids, policy, capacity, E, t.weights) if policy in POLICIES else result.hit_rate
                rows.append({"policy": policy, "budget": budget, "hit_rate": hit,
                             "decode_tok_s_simulated": result.decode_tok_s})
        if not plot:
            return rows
        from ktlab.lab.plots import hit_rate_curves

        return hit_rate_curves(rows)

    def export(self, target: str = "all", out_dir: str | Path = "ktlab-export"):
        """Write the current placement for KTransformers/SGLang, llama.cpp or a ktlab TOML."""
        from ktlab.export import ExportOptions, export

        return export(self.placement, target, out_dir, ExportOptions(model_name=self.model_name))

    def dashboard(self):
        """The interactive dashboard (ipywidgets + plotly)."""
        from ktlab.lab.widgets import Dashboard

        return Dashboard(self).widget

    # -- display ------------------------------------------------------------------------------
    def summary(self) -> dict:
        """What the HTML view shows, as plain data."""
        cfg, p = self.cfg, self.placement
        expert_mb = self.cost.expert_bytes / 1e6
        return {
            "model": self.model_name, "layers": cfg.num_layers, "experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_tok, "accelerator": self.accelerator.label,
            "expert_mb": expert_mb, "gpu_experts": p.num_gpu_experts, "strategy": p.strategy,
            "gpu_expert_mb": p.num_gpu_experts * expert_mb,
            "cpu_expert_mb": (cfg.num_layers * cfg.num_experts - p.num_gpu_experts) * expert_mb,
            "trace_tokens": 0 if self.trace is None else int(self.trace.ids.shape[0]),
            "hit_rate": p.hit_rate(self.counts) if self.trace is not None else None,
        }

    def _repr_html_(self) -> str:
        s = self.summary()
        hit = "record() to measure" if s["hit_rate"] is None else f"{s['hit_rate'] * 100:.1f}% of recorded routing"
        rows = [
            ("model", f"{s['model']}: {s['layers']} layers x {s['experts']} experts, top-{s['top_k']}"),
            ("accelerator", s["accelerator"]),
            ("experts on GPU", f"{s['gpu_experts']} ({s['strategy']}), {s['gpu_expert_mb']:.1f} MB"),
            ("experts on CPU", f"{s['cpu_expert_mb']:.1f} MB"),
            ("GPU hit rate", hit),
            ("trace", f"{s['trace_tokens']} tokens"),
        ]
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                       for k, v in rows)
        return f"<table><caption><b>ktlab Session</b></caption>{body}</table>"
