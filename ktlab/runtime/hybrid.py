"""The live hybrid runtime: the placement that decides, per layer and step, where experts run.

:class:`HybridPlacement` is the model's ``Placement`` and one of its route observers. A forward
call is seen as one unit: routing at layer 0 begins it, the last layer's ``locate`` ends it. For
each layer it takes the selected experts and their token counts, asks
:func:`ktlab.sched.scheduler.schedule_layer` (hits on the GPU, misses on the CPU or fetched),
and returns ``{"gpu": ids, "cpu": ids}``. A call that is a *step* is counted (one lookup per
(token, layer, slot)), may fetch misses into free cache slots, and at its end steps the cache
policy once with all its tokens' choices (admissions and evictions take effect from the next
call), exactly as :func:`ktlab.sched.simulate.simulate` replays a trace token by token.

Which calls are steps: by default (single-request generation) the one-token decode calls; a
longer call (the prompt) is modeled but neither counted nor fetched, as in the simulator. In
``batched`` mode (the serving engine) every call is a step: its tokens are decode tokens of
many sequences and prefill chunks, run together. The bookkeeping (hits, copies, tokens, steps,
modeled time) is in :attr:`HybridPlacement.stats`.

GPU backends: on a real accelerator (``cuda``, or ``torch:cpu`` running the same device code on the
CPU) the model's dense part and KV cache live on the device (``MoEDecoder(device=...)``), resident
experts are dequantized from the stored blocks and copied there on admission
(:class:`DeviceExperts`), and each layer submits its CPU experts to the C++ pool before the device
computes its own, so the two overlap; the device holds at most the budget's expert slots. On a
simulated accelerator the GPU's experts are computed by the same C++ kernels as the CPU's (so
tokens are identical to all-CPU generation; only the split and the modeled times differ).

Expert deferral (``model.deferral = d``, ``ktlab generate --deferral d``): each token's d
lowest-weight experts of a layer are started after the others (the C++ engine's share submitted
to the pool) and join the next layer's output, so their CPU work overlaps that layer's dense part;
the modeled clock counts it as the simulator does (:func:`ktlab.sched.scheduler.deferred_makespan`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ktlab.model.cpu_experts import EXPERT_TENSORS, CpuExpertBackend
from ktlab.model.layers import SWIGLU, ExpertMlp
from ktlab.model.lookahead import RouterLookahead
from ktlab.runtime.device import Accelerator, make_accelerator
from ktlab.sched import placement as placements
from ktlab.sched.cache import CachePolicy
from ktlab.sched.cost import DEFAULT_CPU, CpuCost, ExpertCost
from ktlab.sched.prefetch import Prefetcher, StepTimeline, split_policy
from ktlab.sched.simulate import build_cache

LIVE_POLICIES = ("lru", "lfu", "value", "lru+prefetch", "lfu+prefetch", "value+prefetch", "static:uniform",
                 "static:frequency", "static:front-loading", "static:random")


def check_accelerator(spec: str) -> None:
    """Raise ValueError (one line) when the accelerator ``spec`` cannot be used on this machine:
    an unknown spec or profile, or ``cuda`` without a visible GPU. A present GPU is not measured."""
    if spec != "cuda" or not torch.cuda.is_available():
        make_accelerator(spec)  # a simulated one is cheap; cuda without a GPU raises its one-line error


@dataclass(frozen=True)
class HybridConfig:
    """How the live runtime places experts.

    ``accelerator``: ``cuda``, ``torch:cpu`` or ``simulated:PROFILE`` (checked on construction: a
    profile must exist, ``cuda`` needs a visible GPU). ``vram_budget_gb``: GPU memory for experts
    on a simulated accelerator; on a real one for the dense part, the KV cache and the experts
    together (None: ``budget`` as a share of all experts). ``counts`` [L, E]: activation statistics for static
    placements (e.g. ``Trace.counts()``; None: every expert counts the same, ties to the lowest ids).
    """

    accelerator: str = "simulated:rtx4090-24g"
    policy: str = "value"
    budget: float = 0.15
    vram_budget_gb: float | None = None
    counts: np.ndarray | None = None
    cpu: CpuCost = DEFAULT_CPU
    horizon: float = 8.0

    def __post_init__(self) -> None:
        if self.policy not in LIVE_POLICIES:
            extra = " (belady needs the future: use it in the simulator)" if self.policy.startswith("belady") else ""
            raise ValueError(f"HybridConfig.policy must be one of {', '.join(LIVE_POLICIES)}, got "
                             f"{self.policy!r}{extra}")
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"HybridConfig.budget is a share of all experts in [0, 1], got {self.budget}")
        if self.vram_budget_gb is not None and self.vram_budget_gb < 0:
            raise ValueError(f"HybridConfig.vram_budget_gb must be >= 0, got {self.vram_budget_gb}")
        check_accelerator(self.accelerator)


@dataclass
class HybridStats:
    """What the live runtime did over its steps (times modeled by the cost model, labeled).

    A step is one counted forward call (see the module docstring): ``tokens`` sums their
    tokens, ``lookups`` their (token, layer, slot) expert lookups, ``hits`` those served by
    GPU-resident experts; ``modeled_seconds`` sums the steps' modeled times. ``batched``: the
    steps are serving steps (every call) rather than one-token decode calls.
    """

    label: str
    lookups: int = 0
    hits: int = 0
    copies: int = 0
    tokens: int = 0
    steps: int = 0
    modeled_seconds: float = 0.0
    last_step_s: float = 0.0
    last_step_tokens: int = 0
    batched: bool = False

    @property
    def hit_rate(self) -> float:
        """Share of expert lookups served by the GPU cache."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def modeled_tok_s(self) -> float:
        """Tokens per second of the modeled timeline (decode tokens unless ``batched``)."""
        return self.tokens / self.modeled_seconds if self.modeled_seconds else 0.0

    @property
    def modeled_s_per_step(self) -> float:
        """Mean modeled time of a step."""
        return self.modeled_seconds / self.steps if self.steps else 0.0

    @property
    def modeled_s_per_token(self) -> float:
        """Modeled time per token (a batched step's time shared by its tokens)."""
        return self.modeled_seconds / self.tokens if self.tokens else 0.0

    def record(self, tokens: int, lookups: int, hits: int, copies: int, seconds: float) -> None:
        """Add one step."""
        self.steps += 1
        self.tokens += tokens
        self.lookups += lookups
        self.hits += hits
        self.copies += copies
        self.modeled_seconds += seconds
        self.last_step_s, self.last_step_tokens = seconds, tokens

    def summary(self) -> str:
        """One line for stderr."""
        if self.batched:
            done, speed = f"{self.tokens} tokens in {self.steps} batched steps", "modeled"
        else:
            done, speed = f"{self.tokens} decode tokens", "modeled decode"
        return (f"hybrid ({self.label}): {done}, expert hit rate {self.hit_rate * 100:.1f}%, "
                f"{self.copies} copies, {speed} {self.modeled_tok_s:.1f} tok/s ({self.label})")


class _Call:
    """One forward call in progress: its routing, fetches, prefetches and modeled timeline so far."""

    def __init__(self, tokens: int, step: bool, num_layers: int, num_experts: int, top_k: int,
                 timeline: StepTimeline) -> None:
        self.tokens, self.step, self.timeline = tokens, step, timeline
        width = tokens * top_k if step else 0  # a call that is not a step keeps no choices
        self.ids = np.zeros((num_layers, width), dtype=np.int64)  # router order, token after token
        self.weights = np.zeros((num_layers, width), dtype=np.float32)
        self.forced = np.zeros((num_layers, num_experts), dtype=bool)  # fetched: resident after the step
        self.observed = 0  # layers whose routing was seen
        self.lookups = self.hits = self.prefetched = 0


class HybridPlacement:
    """The model's ``Placement`` driven by a cache policy and the greedy scheduler; also a
    route observer (``attach_hybrid`` registers it), which is how it sees where calls begin."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, cost: ExpertCost, cache: CachePolicy,
                 static: bool, accelerator: Accelerator, batched: bool = False, policy: str | None = None) -> None:
        self.L, self.E, self.k = num_layers, num_experts, top_k
        self.cost, self.cache, self.static, self.accelerator = cost, cache, static, accelerator
        self.policy = policy or cache.name
        self.stats = HybridStats(accelerator.label, batched=batched)
        # callable(admitted [L, E], evicted [L, E]) for real GPU backends; called when the next call
        # begins (the step's last layer is still computing when the cache steps), or by settle()
        self.on_residency_change = None
        self._residency: tuple[np.ndarray, np.ndarray] | None = None
        self.memory: DeviceMemory | None = None  # what a real accelerator holds (attach_hybrid sets it)
        self._call: _Call | None = None
        #: experts per token deferred one layer (the model's ``deferral``; attach_hybrid reads it live)
        self.deferral: Callable[[], int] = lambda: 0
        #: a ``+prefetch`` policy's prefetcher; callable(layer, admitted ids, evicted ids) applies a
        #: prefetch to the GPU backend at once (its copies overlap the current layer)
        self.prefetcher: Prefetcher | None = None
        self.on_prefetch = None
        self._predicted: dict[int, np.ndarray] = {}  # layer -> its experts predicted one layer ahead
        self.lookahead: RouterLookahead | None = None  # what feeds on_prediction (attach_hybrid sets it)

    @property
    def batched(self) -> bool:
        """Every forward call is a step (serving), not only one-token decode calls."""
        return self.stats.batched

    @batched.setter
    def batched(self, value: bool) -> None:
        self.stats.batched = bool(value)

    def __call__(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Route observer: layer 0 begins a call (a call cut off by an error is dropped); every
        layer's choices are kept in router order with their weights (the cache breaks ties by
        them, as in the simulator)."""
        if layer == 0:
            self.settle()
            n = int(ids.shape[0])
            timeline = StepTimeline(self.cost, n, self.deferral())
            self._call = _Call(n, self.batched or n == 1, self.L, self.E, self.k, timeline)
        call = self._call
        if call is None or call.observed != layer:  # a call whose beginning was not seen: ignore it
            self._call = None
            return
        if call.step:
            call.ids[layer] = ids.numpy().reshape(-1)
            call.weights[layer] = weights.float().numpy().reshape(-1)
        call.observed = layer + 1

    def locate(self, layer: int, experts: np.ndarray, counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Split the selected ``experts`` (with their token ``counts``) into GPU and CPU ids."""
        call = self._call
        if call is None or call.observed != layer + 1:
            raise RuntimeError(f"HybridPlacement.locate(layer {layer}) before that layer's routing was observed: "
                               "register the placement as a route observer (attach_hybrid does)")
        counts = np.ones(len(experts), dtype=np.int64) if counts is None else np.asarray(counts)
        resident = self.cache.resident[layer, experts]
        free = int(self.cache.capacity[layer] - resident.sum())
        max_fetch = free if call.step and not self.static else 0  # not a step (a prompt): misses run on the CPU
        plan = call.timeline.run_layer(layer, experts, counts, resident, max_fetch)
        if call.step:
            call.lookups += int(counts.sum())
            call.hits += int(counts[resident].sum())
            call.forced[layer, plan.experts[plan.fetch]] = True
            self._prefetch(call, layer, experts)
        if layer == self.L - 1:
            self._call = None
            if call.step:
                self._end_step(call)
        return {"gpu": plan.gpu_experts, "cpu": plan.cpu_experts}

    def on_prediction(self, layer: int, ahead: int, ids: np.ndarray) -> None:
        """A :class:`~ktlab.model.lookahead.RouterLookahead` sink: keep layer ``layer``'s experts as
        predicted one layer ahead (made while the previous layer runs, used at its end)."""
        if ahead == 1:
            self._predicted[layer] = ids

    def _prefetch(self, call: _Call, layer: int, selected: np.ndarray) -> None:
        """After planning ``layer``: copy the next layer's predicted experts (as the simulator does)."""
        if self.prefetcher is None:
            return
        self.prefetcher.observe(layer, selected)
        predicted = self._predicted.pop(layer + 1, None)
        if layer + 1 >= self.L or predicted is None:
            return
        admitted, evicted = self.prefetcher.issue(call.timeline, layer + 1, predicted)
        call.prefetched += len(admitted)
        if admitted and self.on_prefetch is not None:
            self.on_prefetch(layer + 1, admitted, evicted)

    def _end_step(self, call: _Call) -> None:
        copies = call.prefetched
        clock = call.timeline.finish()
        if not self.static:
            step = self.cache.step(call.ids, call.weights, call.forced, admit=self.prefetcher is None)
            copies += int(step.admitted.sum())
            if self.on_residency_change is not None:  # applied once the step is over (see settle)
                self._residency = (step.admitted, step.evicted) if self._residency is None else \
                    (self._residency[0] | step.admitted, self._residency[1] | step.evicted)
        self.stats.record(call.tokens, call.lookups, call.hits, copies, max(clock, copies * self.cost.t_pcie()))

    def settle(self) -> None:
        """Bring the GPU backends to the cache's residency of the last finished step (admissions and
        evictions wait until then: the cache steps while the step's last layer still computes)."""
        if self._residency is not None and self.on_residency_change is not None:
            admitted, evicted = self._residency
            self._residency = None
            self.on_residency_change(admitted, evicted)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the server's /metrics (``modeled_*`` come from the cost model; ``simulated``
        is 1 when the accelerator is a simulated profile)."""
        s = self.stats
        return {
            "expert_lookups": s.lookups, "expert_hits": s.hits, "expert_hit_rate": s.hit_rate,
            "expert_copies": s.copies, "steps": s.steps, "tokens": s.tokens,
            "gpu_experts": int(self.cache.resident.sum()), "gpu_expert_slots": int(self.cache.capacity.sum()),
            "modeled_seconds": s.modeled_seconds, "modeled_tokens_per_second": s.modeled_tok_s,
            "simulated": float(self.accelerator.simulated),
        }

    def describe(self) -> str:
        """One line: accelerator, policy and GPU expert slots."""
        slots, total = int(self.cache.capacity.sum()), self.L * self.E
        memory = f"; {self.memory.describe()}" if self.memory is not None else ""
        return (f"{self.accelerator.label}, policy {self.policy}, {slots} of {total} experts fit on the GPU "
                f"({slots / total * 100:.1f}%){memory}")


class SimulatedGpuExperts(CpuExpertBackend):
    """The simulated GPU's experts: the layer's own C++ engine, asked for the GPU's share."""


class DeviceExperts:
    """The resident experts of one layer on a real accelerator (``cuda``, or ``torch:cpu`` running the
    same code), dequantized from the stored blocks at the model's dtype when admitted and computed
    with torch there (the layer's ``ExpertMlp`` form: gpt-oss's biases and clamped SwiGLU too).

    On CUDA an admission is an async copy from pinned memory on a copy stream of its own, so it
    overlaps compute; the next layer that uses the expert waits for that copy only. The device never
    holds more than ``capacity`` experts: an expert fetched into a full layer (the scheduler may
    copy over a slot whose expert this step does not use) first evicts such an expert. ``nbytes``:
    what the resident experts hold on the device now; ``peak_bytes``: the most it ever held."""

    def __init__(self, weights, layer: int, device: torch.device, dtype: torch.dtype, capacity: int,
                 mlp: ExpertMlp = SWIGLU) -> None:
        self.weights, self.names = weights, [f"blk.{layer}.{t}" for t in EXPERT_TENSORS]
        self.device, self.dtype, self.capacity, self.mlp = device, dtype, capacity, mlp
        self.resident: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.nbytes = self.peak_bytes = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # pragma: no cover
        self._ready: dict[int, object] = {}  # expert -> CUDA event of its copy

    def load(self, expert: int, keep: frozenset[int] = frozenset()) -> None:
        """Copy one expert to the device (dequantized on the host first); in a full layer an expert
        not in ``keep`` (this step's selection) makes room first."""
        if expert in self.resident:
            return
        if len(self.resident) >= self.capacity:
            spare = sorted(e for e in self.resident if e not in keep)
            if not spare:
                raise RuntimeError(f"no room for expert {expert}: the layer's {self.capacity} slots all hold "
                                   "experts this step uses")
            self.evict(spare[0])
        mats = [self._host_matrix(name, expert) for name in self.names]
        if self._stream is not None:  # pragma: no cover - needs a GPU
            with torch.cuda.stream(self._stream):
                mats = [m.pin_memory().to(self.device, non_blocking=True) for m in mats]
                event = torch.cuda.Event()
                event.record(self._stream)
            self._ready[expert] = event
        else:
            mats = [m.to(self.device) for m in mats]
        self.resident[expert] = (mats[0], mats[1], mats[2])
        self.nbytes += sum(m.numel() * m.element_size() for m in mats)
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def evict(self, expert: int) -> None:
        """Free one expert's device memory."""
        mats = self.resident.pop(expert, None)
        self._ready.pop(expert, None)
        if mats is not None:
            self.nbytes -= sum(m.numel() * m.element_size() for m in mats)

    def match(self, resident: np.ndarray) -> None:
        """Hold exactly the experts ``resident`` [E] marks (the cache's set after a step): evictions
        first, so the device never holds more than the cache."""
        wanted = set(np.flatnonzero(resident).tolist())
        for e in [e for e in self.resident if e not in wanted]:
            self.evict(e)
        for e in sorted(wanted - self.resident.keys()):
            self.load(e)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: np.ndarray) -> torch.Tensor:
        """See ``ktlab.model.layers.ExpertBackend``; kernels launch asynchronously on CUDA."""
        xd = x.to(self.device, self.dtype)
        ids_d, weights_d = ids.to(self.device), weights.to(self.device)
        keep = frozenset(experts.tolist())  # this layer's device experts (all of them, deferred ones too)
        present = set(np.unique(ids.cpu().numpy()).tolist())
        out = torch.zeros_like(xd)
        for e in experts.tolist():
            self.load(e, keep)  # an expert the scheduler fetched this step
            if e not in present:  # selected by other slots (the deferred ones, or those not deferred)
                continue
            event = self._ready.pop(e, None)
            if event is not None:  # pragma: no cover - needs a GPU
                torch.cuda.current_stream(self.device).wait_event(event)
            token_idx, slot = torch.where(ids_d == e)
            y = self.mlp.expert(xd[token_idx], *self.resident[e], e)
            out.index_add_(0, token_idx, y * weights_d[token_idx, slot].to(self.dtype)[:, None])
        return out.to(x.device, x.dtype)

    def _host_matrix(self, name: str, expert: int) -> torch.Tensor:
        if hasattr(self.weights, "raw"):
            import gguf

            raw = self.weights.raw(name)
            values = gguf.quants.dequantize(np.ascontiguousarray(raw.data[expert]), raw.qtype)
        else:
            values = self.weights.tensor(name)[expert]
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(self.dtype)


def expert_budget(config: HybridConfig, cost: ExpertCost, num_layers: int, num_experts: int,
                  reserved_bytes: int = 0) -> int:
    """Expert slots from the config's VRAM budget (GB; ``reserved_bytes`` of it already held by the
    dense part and the KV cache on a real accelerator) or share of experts."""
    if config.vram_budget_gb is not None:
        free = config.vram_budget_gb * 1e9 - reserved_bytes
        if free < 0:
            raise ValueError(f"--vram-budget {config.vram_budget_gb:g} GB is less than the dense part and KV "
                             f"cache need on the device ({reserved_bytes / 1e9:.2f} GB)")
        return placements.budget_from_bytes(free, cost.expert_bytes, num_layers, num_experts)
    return placements.budget_from_fraction(config.budget, num_layers, num_experts)


@dataclass(frozen=True)
class DeviceMemory:
    """What a real accelerator holds of the model (bytes): the dense part, the KV cache reserved for
    it, and room for the resident experts (slots x one expert at the device dtype)."""

    budget: float | None
    dense: int
    kv: int
    experts: int

    @property
    def total(self) -> int:
        """Most the device holds: dense + KV + every expert slot filled."""
        return self.dense + self.kv + self.experts

    def describe(self) -> str:
        """One line: the split and the budget."""
        budget = f" of a {self.budget / 1e9:.2f} GB budget" if self.budget is not None else ""
        return (f"device memory: dense {self.dense / 1e9:.3f} GB + KV {self.kv / 1e9:.3f} GB + experts "
                f"{self.experts / 1e9:.3f} GB = {self.total / 1e9:.3f} GB{budget}")


def dense_device(config: HybridConfig | None) -> torch.device | None:
    """Where a model should put its dense part for ``config``: the accelerator's device when it is a
    real one (``cuda``, ``torch:cpu``: load the model with ``device=`` this), else None (the CPU
    kernels; a simulated accelerator only prices GPU work)."""
    if config is None:
        return None
    acc = make_accelerator(config.accelerator)
    return acc.device if acc.runs_dense else None


def attach_hybrid(model, weights, config: HybridConfig, batched: bool = False, kv_bytes: int = 0) -> HybridPlacement:
    """Make ``model`` (built with ``experts="cpu"``) hybrid: a :class:`HybridPlacement` and a
    GPU backend per layer. Returns the placement (its ``stats`` tell what happened).

    ``weights``: the model's weight source (``open_weights``; a real accelerator copies experts
    from it, a simulated one needs none: None is fine). ``batched``: every forward call is a step
    (the serving engine's batched steps), not only one-token decode calls. On a real accelerator
    the model must have its dense part there (``MoEDecoder(device=...)``, see :func:`dense_device`);
    ``config.vram_budget_gb`` then covers the dense part, ``kv_bytes`` of KV cache and the resident
    experts (dequantized at the model's dtype), and ``placement.memory`` says how it splits.
    """
    cfg = model.cfg
    if model.experts != "cpu":
        raise ValueError("the hybrid runtime needs the model's experts in the C++ engine (experts='cpu')")
    acc = make_accelerator(config.accelerator)
    if acc.runs_dense and weights is None:
        raise ValueError(f"a {acc.name} accelerator copies experts from the model's weights: pass "
                         "weights=open_weights(...)")
    if acc.runs_dense and (model.device is None or model.device.type != acc.device.type):
        raise ValueError(f"the {acc.name} accelerator runs the model's dense part: load it with "
                         f"device={acc.device.type!r} (see ktlab.runtime.hybrid.dense_device)")
    expert_bytes = model.expert_bytes()
    reserved = 0
    if acc.runs_dense:  # resident experts are dequantized to the model's dtype; the dense part and KV come first
        expert_bytes = (cfg.expert_params + (2 * cfg.moe_intermediate_size + cfg.hidden_size) * cfg.expert_bias) \
            * torch.empty(0, dtype=model.dtype).element_size()
        reserved = model.device_dense_bytes() + kv_bytes
    cost = ExpertCost.for_model(cfg, expert_bytes, acc.profile, config.cpu)
    slots = expert_budget(config, cost, cfg.num_moe_layers, cfg.num_experts, reserved)
    static = config.policy.startswith("static:")
    base, prefetching = split_policy(config.policy)
    cache = build_cache(base, slots, cfg.num_moe_layers, cfg.num_experts, cost, counts=config.counts,
                        horizon=config.horizon)
    hybrid = HybridPlacement(cfg.num_moe_layers, cfg.num_experts, cfg.num_experts_per_tok, cost, cache, static, acc,
                             batched=batched, policy=config.policy)
    if prefetching:
        hybrid.prefetcher = Prefetcher(cache, cost)
        hybrid.lookahead = RouterLookahead(model, 1, hybrid.on_prediction)
    if acc.runs_dense:
        hybrid.memory = DeviceMemory(None if config.vram_budget_gb is None else config.vram_budget_gb * 1e9,
                                     model.device_dense_bytes(), kv_bytes, int(cache.capacity.sum()) * expert_bytes)
    blocks = model.moe_blocks()
    for i, moe in enumerate(blocks):
        if acc.simulated:
            moe.backends["gpu"] = SimulatedGpuExperts(moe.backends["cpu"].experts)
        else:
            moe.backends["gpu"] = DeviceExperts(weights, cfg.moe_layer_ids[i], acc.device, model.dtype,
                                                int(cache.capacity[i]), moe.mlp)
        moe.placement = hybrid
    if not acc.simulated:
        gpu = [moe.backends["gpu"] for moe in blocks]
        for layer, experts in enumerate(gpu):
            experts.match(cache.resident[layer])

        def sync(admitted: np.ndarray, evicted: np.ndarray) -> None:
            # the cache's set after the step; also re-loads what a fetch into a full layer evicted early
            for layer, experts in enumerate(gpu):
                experts.match(cache.resident[layer])

        def prefetch(layer: int, admitted: list[int], evicted: list[int]) -> None:
            for e in evicted:  # evictions first: the device never holds more than the layer's slots
                gpu[layer].evict(e)
            for e in admitted:  # on CUDA an async copy on the copy stream: it overlaps this layer
                gpu[layer].load(e)

        hybrid.on_residency_change = sync
        hybrid.on_prefetch = prefetch
    hybrid.deferral = lambda: model.deferral
    model.placement = hybrid
    model.add_route_observer(hybrid)
    return hybrid
