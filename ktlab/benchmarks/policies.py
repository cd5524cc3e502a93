"""``ktlab bench-policies``: every placement and cache policy side by side at several VRAM budgets.

Traces: the calibrated synthetic preset (Qwen3-30B-A3B shapes), the bundled tiny model's real
routing on a bundled prompt set (``ktlab/data/prompts.txt``), or ``.npz`` files written by
``ktlab record``. Each is replayed by :func:`ktlab.sched.simulate.simulate` through every
policy at every budget, with the cost model of its expert shape on the chosen accelerator
profile: hit rate, PCIe copies, modeled decode and prefill tok/s. The GPU side is a profile,
so every time figure is *simulated* (the table says so).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ktlab.sched.cache import POLICIES, hit_rate
from ktlab.sched.cost import DEFAULT_CPU, CpuCost, ExpertCost, get_profile
from ktlab.sched.placement import budget_from_fraction, even_split
from ktlab.sched.prefetch import PREFETCH_SUFFIX, needs_predictions
from ktlab.sched.simulate import SimConfig, SimResult, simulate
from ktlab.sched.stats import Trace, accuracy_json, format_accuracy

POLICY_ORDER = ("static:uniform", "static:frequency", "redistribute", "lru", "lfu", "value", "belady",
                "value+prefetch", "belady+prefetch")
DEFAULT_BUDGETS = (0.05, 0.10, 0.15, 0.30)
PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts.txt"


@dataclass(frozen=True)
class TraceSource:
    """A trace with the expert cost that goes with it (its model's expert shape)."""

    name: str
    trace: Trace
    hidden: int
    inter: int
    bytes_per_weight: float = 34 / 32  # Q8_0
    dense_params: int = 0


@dataclass
class PolicyReport:
    """All rows of one run plus what was used to get them."""

    profile: str
    cpu: CpuCost
    rows: list[tuple[str, SimResult]] = field(default_factory=list)
    #: (trace, budget, policy) -> hit rate of the bare cache (every policy admitting for hits
    #: alone, no transfer costs): the figure the policies are compared by
    cache_hits: dict[tuple[str, float, str], float] = field(default_factory=dict)
    #: trace -> [L, A] accuracy of its next-layer predictions (``Trace.accuracy``), where it has them
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict:
        """JSON-ready dict; every time is simulated on ``profile``."""
        return {
            "profile": self.profile, "simulated": True,
            "cpu": {"bandwidth_gbps": self.cpu.bandwidth_gbps, "gops": self.cpu.gops,
                    "call_overhead_s": self.cpu.call_overhead_s, "source": self.cpu.source},
            "results": [
                {"trace": name, **r.to_dict(), "cache_hit_rate": self.cache_hits.get((name, r.budget, r.policy))}
                for name, r in self.rows
            ],
            "prediction_accuracy": {name: accuracy_json(acc) for name, acc in self.accuracy.items()},
        }

    def format_table(self) -> str:
        """Plain-text table; the value policy's share of the LRU/LFU-to-Belady gap closed."""
        head = (f"{'trace':<20} {'budget':>6} {'policy':<17} {'cache hit%':>10} {'hit%':>6} {'copies/tok':>10} "
                f"{'PCIe MB/tok':>11} "
                f"{'decode tok/s':>12} {'x static':>8} {'prefill tok/s':>13}")
        lines = [head, "-" * len(head)]
        by_key: dict[tuple[str, float], dict[str, SimResult]] = {}
        for name, r in self.rows:
            by_key.setdefault((name, r.budget), {})[r.policy] = r
        for (name, budget), group in by_key.items():
            ref = group.get("static:frequency")
            for policy, r in group.items():
                speedup = r.decode_tok_s / ref.decode_tok_s if ref else float("nan")
                cache_hit = self.cache_hits.get((name, budget, policy), r.hit_rate)
                lines.append(
                    f"{name:<20} {budget * 100:>5.0f}% {policy:<17} {cache_hit * 100:>10.1f} {r.hit_rate * 100:>6.1f} "
                    f"{r.transfers_per_token:>10.1f} {r.pcie_gb_per_token * 1e3:>11.1f} {r.decode_tok_s:>12.1f} "
                    f"{speedup:>8.2f} {r.prefill_tok_s or 0:>13.0f}"
                )
            gap = _gap_closed({p: self.cache_hits.get((name, budget, p), r.hit_rate) for p, r in group.items()})
            if gap is not None:
                lines.append(f"{'':<20} {'':>6} value closes {gap * 100:.0f}% of the gap from max(LRU, LFU) to Belady")
            lines += [f"{'':<20} {'':>6} {line}" for line in _prefetch_lines(group)]
            lines.append("")
        lines.append("cache hit%: the bare cache (admissions for hits alone); hit% and the rest: the scheduled "
                     "runtime (fetches when they pay, value admits only what pays for its copy)")
        lines.append("static:frequency uses the whole trace's counts (an oracle profile), static:uniform none (a "
                     "neutral baseline); caches start empty")
        lines.append("+prefetch: copies of the experts predicted from the previous layer's hidden state, made while "
                     "it computes (belady+prefetch: the oracle); their hit% counts prefetched experts")
        for name, acc in self.accuracy.items():
            lines.append(f"{name}: {format_accuracy(acc).splitlines()[0]}")
        lines.append(f"times simulated on {self.profile}; CPU experts: {self.cpu.bandwidth_gbps:.1f} GB/s, "
                     f"{self.cpu.gops:.0f} GOP/s ({self.cpu.source})")
        return "\n".join(lines)


def _prefetch_lines(group: dict[str, SimResult]) -> list[str]:
    """How the prefetching policies' modeled decode compares with Belady on demand (the issue's bar)."""
    ref = group.get("belady")
    if ref is None:
        return []
    return [f"{policy} decodes at {r.decode_tok_s / ref.decode_tok_s * 100:.1f}% of Belady on demand"
            for policy, r in group.items() if policy.endswith(PREFETCH_SUFFIX)]


def _gap_closed(hits: dict[str, float]) -> float | None:
    """Share of the gap from the better of LRU and LFU to Belady that value closes."""
    if not {"lru", "lfu", "value", "belady"} <= set(hits):
        return None
    online = max(hits["lru"], hits["lfu"])
    gap = hits["belady"] - online
    return (hits["value"] - online) / gap if gap > 1e-9 else 1.0


def preset_source(name: str = "qwen3-30b-a3b", tokens: int = 384, seed: int = 0) -> TraceSource:
    """The synthetic preset at real Qwen3-30B-A3B expert shapes."""
    from ktlab.sched.traces import PRESETS, SYNTHETIC_ACCURACY, generate_trace, synthetic_predictions

    if name not in PRESETS:
        raise ValueError(f"unknown trace preset {name!r}; one of {', '.join(PRESETS)}")
    spec = PRESETS[name]
    ids, w = generate_trace(spec, tokens, seed)
    predicted = synthetic_predictions(ids, spec.num_experts, seed=seed)
    attention = (32 * 128 + 2 * 4 * 128) * 2048 + 2048 * 32 * 128 + 128 * 2048
    meta = {"preset": spec.to_dict(), "prediction_accuracy": SYNTHETIC_ACCURACY}
    return TraceSource(f"preset:{name}", Trace(ids, spec.num_experts, w, meta, predicted), 2048, 768,
                       dense_params=attention)


def model_source(model: str = "tiny", prompts: Path = PROMPTS, max_tokens: int = 256) -> TraceSource:
    """A model's real routing on a prompt file (paragraphs separated by blank lines)."""
    from ktlab.model import load_model
    from ktlab.runtime.record import record_trace

    net, tok = load_model(model)
    trace = record_trace(net, tok, read_prompts(prompts), max_tokens, {"model": str(model), "prompts": str(prompts)})
    cfg = net.cfg
    return TraceSource(str(model), trace, cfg.hidden_size, cfg.moe_intermediate_size,
                       dense_params=cfg.attention_params + cfg.num_experts * cfg.hidden_size)


def file_source(path: Path) -> TraceSource:
    """A trace file from ``ktlab record`` (which stores the expert shape in its metadata)."""
    trace = Trace.load(path)
    try:
        hidden, inter = int(trace.meta["hidden_size"]), int(trace.meta["moe_intermediate_size"])
    except (KeyError, ValueError):
        raise ValueError(f"{path}: the trace does not record its expert shape (use `ktlab record`)") from None
    return TraceSource(Path(path).name, trace, hidden, inter)


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file, one per paragraph (blank-line separated)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read prompts ({exc.strerror or exc})") from None
    prompts = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (paragraphs separated by blank lines expected)")
    return prompts


def run_policies(sources: list[TraceSource], budgets=DEFAULT_BUDGETS, policies=POLICY_ORDER,
                 profile: str = "rtx4090-24g", cpu: CpuCost = DEFAULT_CPU, prefill_tokens: int = 256,
                 deferral: int = 0, progress: bool = True) -> PolicyReport:
    """Every (source, budget, policy) simulated; see the module docstring."""
    from tqdm import tqdm

    gpu = get_profile(profile)
    report = PolicyReport(gpu.name, cpu)
    for source in sources:
        if source.trace.predicted is not None:
            report.accuracy[source.name] = source.trace.accuracy()
    jobs = [(s, b, p) for s in sources for b in budgets for p in policies]
    for source, budget, policy in tqdm(jobs, desc="policies", file=sys.stderr, disable=not progress, leave=False):
        cost = ExpertCost.for_shape(source.hidden, source.inter, source.bytes_per_weight, gpu, cpu,
                                    source.dense_params)
        config = SimConfig(policy, budget, prefill_tokens=prefill_tokens, deferral=deferral)
        t = source.trace
        if needs_predictions(policy) and t.predicted is None:
            continue  # a trace recorded without predictions: only the oracle can prefetch
        predicted = None if t.predicted is None else t.predicted[:, :, 0]
        result = simulate(t.ids, t.num_experts, cost, config, t.weights, predicted)
        report.rows.append((source.name, result))
        if policy in POLICIES:
            L, E = t.ids.shape[1], t.num_experts
            capacity = even_split(budget_from_fraction(budget, L, E), L, E)  # as the simulator splits it
            report.cache_hits[(source.name, budget, policy)] = hit_rate(t.ids, policy, capacity, E, t.weights)
    return report


def parse_budgets(text: str) -> tuple[float, ...]:
    """'5,10,15,30' (percent) -> (0.05, 0.1, 0.15, 0.3)."""
    try:
        values = tuple(float(v) / 100 for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated percentages, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise ValueError(f"--budgets must be percentages in [0, 100], got {text!r}")
    return values

