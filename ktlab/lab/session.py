"""The notebook-facing object: one model, its routing statistics, a placement, and the tools.

    from ktlab.lab import Session
    s = Session("tiny", accelerator="simulated:rtx4090-24g")
    s.generate("A list comprehension")      # streams text into the cell
    s.record()                               # routing trace on the bundled prompt set
    s.place("threshold", t=0.02)             # hot/cold split at a 2% activation share
    s.simulate("value", budget=0.15)         # modeled hit rate and tok/s (simulated)
    s.sweep()                                # hit rate vs budget per policy (a plotly figure)
    s.layer_times(batch=4)                   # per-layer CPU / GPU / PCIe seconds of the placement (modeled)
    s.set_accelerator("simulated:h100-80g")  # re-price everything for another GPU profile
    s.measure_batch((1, 4, 16))              # measured aggregate decode tok/s of the engine (this CPU)
    s.chat_cache(ChatCacheConfig())          # a multi-turn chat over the three-tier prefix cache (measured)
    s.dashboard()                            # sliders + live heatmap
    s.export("llama.cpp", "tuned/")          # flags for production engines

The model is only ever touched by the Session's own methods (one at a time: they share a lock);
the dashboard calls them, from background threads for the long ones.
"""

from __future__ import annotations

import html
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ktlab.lab.telemetry import Telemetry
from ktlab.lab.workloads import ChatCacheConfig, ChatCacheResult, Progress, batched_decode_tok_s, chat_prefix_cache
from ktlab.runtime.device import REAL_ACCELERATORS, make_accelerator
from ktlab.sched import batching
from ktlab.sched import placement as placements
from ktlab.sched.cost import DEFAULT_CPU, PROFILES, ExpertCost
from ktlab.sched.simulate import LayerSplit, SimConfig, SimResult, decode_split, prefill_split, simulate
from ktlab.sched.stats import Trace

SWEEP_POLICIES = ("static:frequency", "lru", "lfu", "value", "belady", "value+prefetch", "belady+prefetch")
SWEEP_BUDGETS = (0.05, 0.10, 0.15, 0.30, 0.50)
ACCELERATORS = tuple(f"simulated:{name}" for name in PROFILES)  # plus "cuda" where one is visible
BATCHES = (1, 2, 4, 8, 16, 32, 64)
PREFILL_TOKENS = 256  # the modeled prompt: the trace's first tokens as one chunk


class Session:
    """A model loaded for exploration, with a simulated (or real CUDA) accelerator profile."""

    def __init__(self, model: str | Path = "tiny", accelerator: str = "simulated:rtx4090-24g",
                 budget: float = 0.15, threads: int | None = None) -> None:
        from ktlab.model import load_model, resolve_model_path

        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"Session budget is a share of all experts in [0, 1], got {budget}")
        self.model_name = str(model)
        self.model_path = resolve_model_path(model)
        self.model, self.tokenizer = load_model(model, threads=threads)
        self.cfg = self.model.cfg
        self._expert_bytes = self.model.expert_bytes()
        self.set_accelerator(accelerator)
        cfg = self.cfg
        self.budget = budget
        self.telemetry = Telemetry()
        self.trace: Trace | None = None
        self.placement = placements.uniform(self.slots(budget), np.zeros((cfg.num_moe_layers, cfg.num_experts)))
        self._model_lock = threading.Lock()  # one model user at a time (notebook, dashboard threads)
        self._stop = threading.Event()
        self._simulated: dict[tuple, SimResult] = {}  # replays by (trace, profile, policy, budget, deferral)

    def set_accelerator(self, spec: str) -> None:
        """Price GPU work with another accelerator: ``simulated:PROFILE`` (:data:`ACCELERATORS`), ``cuda``
        or ``torch:cpu`` (profiles measured on the device); every later modeled figure uses it (the
        model itself keeps running on the CPU)."""
        self.accelerator = make_accelerator(spec)
        self.accelerator_spec = spec if spec in REAL_ACCELERATORS else f"simulated:{self.accelerator.profile.name}"
        self.cost = ExpertCost.for_model(self.cfg, self._expert_bytes, self.accelerator.profile, DEFAULT_CPU)

    def stop(self) -> None:
        """Ask a running :meth:`generate` or :meth:`chat_cache` (e.g. in a dashboard thread) to stop early."""
        self._stop.set()

    # -- running the model ------------------------------------------------------------------
    def generate(self, prompt: str, max_tokens: int = 64, stream: bool = True, **sampling) -> str:
        """Generate from ``prompt`` (greedy unless ``temperature=`` ...), printing as it goes;
        each token's measured speeds go to :attr:`telemetry`."""
        from ktlab.runtime.generate import GenerationStats, SamplingConfig, generate_stream

        config = SamplingConfig(max_tokens=max_tokens, **sampling)
        decoder = self.tokenizer.stream_decoder()
        pieces = []
        stats = GenerationStats()
        with self._model_lock:
            self._stop.clear()
            t0 = time.perf_counter()
            for token in generate_stream(self.model, self.tokenizer.encode(prompt), config,
                                         stop_ids=[self.tokenizer.eos_id], stats=stats):
                self.telemetry.publish(tokens=stats.generated_tokens, prefill_tok_s=stats.prefill_tps,
                                       decode_tok_s=stats.decode_tps, prefill_s=stats.prefill_seconds,
                                       elapsed_s=time.perf_counter() - t0)
                if self._stop.is_set():
                    break
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
        from ktlab.runtime.record import record_trace

        texts = prompts if prompts is not None else read_prompts(PROMPTS)
        with self._model_lock:
            self.trace = record_trace(self.model, self.tokenizer, texts, max_tokens, {"model": self.model_name})
        self._simulated.clear()
        self.place("frequency")
        return self.trace

    # -- placements and the science -----------------------------------------------------------
    @property
    def counts(self) -> np.ndarray:
        """[L, E] activation counts of the recorded trace (zeros before :meth:`record`)."""
        if self.trace is None:
            return np.zeros((self.cfg.num_moe_layers, self.cfg.num_experts), dtype=np.int64)
        return self.trace.counts()

    def slots(self, budget: float | None = None) -> int:
        """GPU expert slots for a budget (share of all experts; default the session's)."""
        b = self.budget if budget is None else budget
        return placements.budget_from_fraction(b, self.cfg.num_moe_layers, self.cfg.num_experts)

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
        """Replay the recorded trace through ``policy`` at ``budget`` (modeled, labeled simulated);
        remembered per (profile, policy, budget, deferral) until the next :meth:`record`."""
        t = self._need_trace()
        config = SimConfig(policy, self.budget if budget is None else budget, deferral=deferral,
                           prefill_tokens=min(PREFILL_TOKENS, t.ids.shape[0]))
        key = (id(t), self.cost, config)
        if key not in self._simulated:
            predicted = None if t.predicted is None else t.predicted[:, :, 0]
            self._simulated[key] = simulate(t.ids, t.num_experts, self.cost, config, t.weights, predicted)
        return self._simulated[key]

    def prediction_accuracy(self) -> np.ndarray:
        """[L, A]: the share of each layer's selected experts its router named from the hidden state
        of 1..A layers earlier (what ``+prefetch`` policies act on), from the recorded trace."""
        return self._need_trace().accuracy()

    def layer_times(self, batch: int = 1, max_steps: int | None = 32) -> dict[str, LayerSplit]:
        """Per-layer CPU / GPU / PCIe seconds of the current placement (modeled, ``simulated`` names the
        profile): ``decode``, a step of ``batch`` concurrent tokens replayed from the trace (all of it
        for one token, else at most ``max_steps`` steps); ``prefill``, the trace's first tokens as one
        chunk (misses may be copied through a staging buffer, so the link shows up there)."""
        t = self._need_trace()
        steps = None if batch == 1 else max_steps
        return {"decode": decode_split(t.ids, self.placement.gpu, self.cost, batch, steps),
                "prefill": prefill_split(t.ids, self.placement.gpu, self.cost, min(PREFILL_TOKENS, t.ids.shape[0]))}

    def batch_model(self, batches=BATCHES) -> dict[str, np.ndarray]:
        """Modeled aggregate decode tok/s of the current placement for each batch size: with the recorded
        routing's frequencies and with uniformly random routing (``E (1 - (1 - k/E)^B)`` distinct experts
        per layer); plus those distinct-expert counts (means over layers)."""
        t = self._need_trace()
        gpu = self.placement.gpu
        recorded = batching.recorded_routing(t.ids, t.num_experts, gpu)
        uniform = batching.random_routing(gpu, self.cfg.num_experts_per_tok)
        return {
            "batch": np.asarray(batches),
            "recorded": batching.batch_tok_s(recorded, gpu, self.cost, batches),
            "random": batching.batch_tok_s(uniform, gpu, self.cost, batches),
            "distinct_recorded": np.array([batching.distinct_experts(recorded, b).mean() for b in batches]),
            "distinct_random": np.array([batching.distinct_experts(uniform, b).mean() for b in batches]),
        }

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

        return hit_rate_curves(rows, self.accelerator.label)

    # -- measured workloads through the serving engine ------------------------------------------
    def measure_batch(self, batches=(1, 2, 4, 8, 16), max_tokens: int = 24,
                      progress: Progress | None = None) -> list[dict]:
        """Measured aggregate decode tok/s of the continuous-batching engine with b concurrent requests
        for each b in ``batches`` (every expert on this CPU: measured, not modeled), beside the
        bandwidth-bound ideal of the same steps (``ideal_tok_s``: the weight bytes they had to read
        at this machine's read bandwidth, measured once) and the measured share of it."""
        from ktlab.benchmarks.machine import measure_read_bandwidth
        from ktlab.benchmarks.policies import PROMPTS, read_prompts

        prompts = [self.tokenizer.encode(text)[:32] for text in read_prompts(PROMPTS)]
        bandwidth = measure_read_bandwidth(passes=2, keep_buffer=False)
        with self._model_lock:
            return batched_decode_tok_s(self.model, prompts, batches, max_tokens, progress, bandwidth_gbs=bandwidth)

    def finetune(self, data: str | Path | None = None, steps: int = 60, lora_rank: int = 8, lr: float = 2e-3,
                 output: str | Path | None = None, plot: bool = True, **config):
        """LoRA-fine-tune the session's model (experts frozen and quantized on the CPU; see
        ``ktlab.train``) on ``data`` (default: the bundled Python Q&A chats), with a live loss plot;
        the adapter is then applied to the session's model (``generate`` uses it). Returns the
        :class:`~ktlab.train.finetune.FinetuneResult` (held-out loss before/after, tok/s, where the
        time went, peak memory)."""
        import tempfile

        from ktlab.train.finetune import BUNDLED_DATA, FinetuneConfig
        from ktlab.train.finetune import finetune as run
        from ktlab.train.lora import load_adapter

        cfg = FinetuneConfig(data=str(data or BUNDLED_DATA), steps=steps, lora_rank=lora_rank, lr=lr, **config)
        out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="ktlab-lora-"))
        on_step = None
        if plot:
            from IPython.display import display

            from ktlab.lab.plots import append_loss, loss_figure

            fig = loss_figure()
            display(fig)

            def on_step(step: int, loss: float) -> None:
                append_loss(fig, step, loss)

        with self._model_lock:
            result = run(str(self.model_path), cfg, output=out, progress=False, on_step=on_step)
            from ktlab.model import open_weights

            load_adapter(self.model, out, open_weights(self.model_path))
        return result

    def chat_cache(self, config: ChatCacheConfig | None = None, progress: Progress | None = None) -> ChatCacheResult:
        """A multi-turn chat through the engine with the three-tier prefix cache of ``config``:
        page hits per tier and prompt tokens served from the cache (measured)."""
        with self._model_lock:
            self._stop.clear()
            return chat_prefix_cache(self.model, self.tokenizer, self.model_path, config or ChatCacheConfig(),
                                     progress, should_stop=self._stop.is_set)

    def export(self, target: str = "all", out_dir: str | Path = "ktlab-export"):
        """Write the current placement for KTransformers/SGLang, llama.cpp or a ktlab TOML."""
        from ktlab.export import ExportOptions, export

        return export(self.placement, target, out_dir,
                      ExportOptions(model_name=self.model_name, first_moe_layer=self.cfg.first_dense_layers))

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
            "model": self.model_name, "layers": cfg.num_moe_layers, "experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_tok, "accelerator": self.accelerator.label,
            "expert_mb": expert_mb, "gpu_experts": p.num_gpu_experts, "strategy": p.strategy,
            "gpu_expert_mb": p.num_gpu_experts * expert_mb,
            "cpu_expert_mb": (cfg.num_moe_layers * cfg.num_experts - p.num_gpu_experts) * expert_mb,
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
