"""The live hybrid runtime: the placement that decides, per layer and token, where experts run.

:class:`HybridPlacement` is the model's ``Placement``. For each layer call it takes the
selected experts and their token counts, asks :func:`ktlab.sched.scheduler.schedule_layer`
(hits on the GPU, misses on the CPU or fetched), and returns ``{"gpu": ids, "cpu": ids}``;
after a decode token's last layer it steps the cache policy (admissions and evictions take
effect from the next token), exactly as :func:`ktlab.sched.simulate.simulate` replays a
trace. Its bookkeeping (hits, copies, modeled time per token) is in :attr:`stats`.

GPU backends: on a real CUDA device, resident experts are dequantized from the GGUF blocks
and copied to the GPU on admission (torch computes them; its kernels run asynchronously, so
the CPU engine works meanwhile). On a simulated accelerator the GPU's experts are computed
by the same C++ kernels as the CPU's (so tokens are identical to all-CPU generation; only
the split and the modeled times differ).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ktlab.runtime.device import Accelerator, make_accelerator
from ktlab.runtime.experts import EXPERT_TENSORS, CpuExpertBackend
from ktlab.sched import placement as placements
from ktlab.sched.cache import CachePolicy
from ktlab.sched.cost import DEFAULT_CPU, CpuCost, ExpertCost
from ktlab.sched.scheduler import schedule_layer
from ktlab.sched.simulate import build_cache

LIVE_POLICIES = ("lru", "lfu", "value", "static:uniform", "static:frequency", "static:front-loading",
                 "static:random")


@dataclass(frozen=True)
class HybridConfig:
    """How the live runtime places experts.

    ``vram_budget_gb``: GPU memory for experts (None: ``budget`` as a share of all experts).
    ``counts`` [L, E]: activation statistics for static placements (e.g. ``Trace.counts()``;
    None: every expert counts the same, ties to the lowest ids).
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
            extra = " (belady needs the future: use it in the simulator)" if self.policy == "belady" else ""
            raise ValueError(f"HybridConfig.policy must be one of {', '.join(LIVE_POLICIES)}, got "
                             f"{self.policy!r}{extra}")
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"HybridConfig.budget is a share of all experts in [0, 1], got {self.budget}")
        if self.vram_budget_gb is not None and self.vram_budget_gb < 0:
            raise ValueError(f"HybridConfig.vram_budget_gb must be >= 0, got {self.vram_budget_gb}")


@dataclass
class HybridStats:
    """What the live runtime did, per decode token (times modeled by the cost model)."""

    label: str
    lookups: int = 0
    hits: int = 0
    copies: int = 0
    tokens: int = 0
    modeled_s: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        """Share of decode expert lookups served by the GPU cache."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def modeled_tok_s(self) -> float:
        """Decode tokens per second of the modeled timeline."""
        return len(self.modeled_s) / sum(self.modeled_s) if self.modeled_s else 0.0

    def summary(self) -> str:
        """One line for stderr."""
        return (f"hybrid ({self.label}): {self.tokens} decode tokens, expert hit rate {self.hit_rate * 100:.1f}%, "
                f"{self.copies} copies, modeled decode {self.modeled_tok_s:.1f} tok/s ({self.label})")


class HybridPlacement:
    """The model's ``Placement`` driven by a cache policy and the greedy scheduler."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, cost: ExpertCost, cache: CachePolicy,
                 static: bool, accelerator: Accelerator) -> None:
        self.L, self.E, self.k = num_layers, num_experts, top_k
        self.cost, self.cache, self.static, self.accelerator = cost, cache, static, accelerator
        self.stats = HybridStats(accelerator.label)
        self.on_residency_change = None  # callable(admitted [L, E], evicted [L, E]) for real GPU backends
        self._token_ids = np.zeros((num_layers, top_k), dtype=np.int64)
        self._token_weights = np.zeros((num_layers, top_k), dtype=np.float32)
        self._forced = np.zeros((num_layers, num_experts), dtype=bool)
        self._clock = self._link = 0.0

    def __call__(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Route observer: keeps a decode token's choices in router order with their weights
        (the cache breaks ties by them, as in the simulator)."""
        if ids.shape[0] == 1:
            self._token_ids[layer] = ids[0].numpy()
            self._token_weights[layer] = weights[0].float().numpy()

    def locate(self, layer: int, experts: np.ndarray, counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Split the selected ``experts`` (with their token ``counts``) into GPU and CPU ids."""
        counts = np.ones(len(experts), dtype=np.int64) if counts is None else np.asarray(counts)
        decode = int(counts.sum()) == self.k and len(experts) == self.k
        resident = self.cache.resident[layer, experts]
        if decode:
            free = int(self.cache.capacity[layer] - resident.sum())
            max_fetch = 0 if self.static else free
        else:
            max_fetch = 0  # prefill: no staging buffers in the live runtime (yet); misses run on the CPU
        if layer == 0:
            self._clock, self._link = 0.0, 0.0
            self._forced[:] = False
        self._clock += self.cost.t_dense(int(counts.sum() // self.k) or 1)
        plan = schedule_layer(experts, counts, resident, self.cost, max_fetch=max_fetch,
                              link_free=self._link - self._clock)
        self._link = self._clock + plan.link_free
        self._clock += plan.makespan
        if decode:
            self.stats.lookups += self.k
            self.stats.hits += int(resident.sum())
            self._forced[layer, plan.experts[plan.fetch]] = True
            if layer == self.L - 1:
                self._end_token()
        return {"gpu": plan.gpu_experts, "cpu": plan.cpu_experts}

    def _end_token(self) -> None:
        self.stats.tokens += 1
        copies = 0
        if not self.static:
            step = self.cache.step(self._token_ids, self._token_weights, self._forced)
            copies = int(step.admitted.sum())
            if self.on_residency_change is not None:
                self.on_residency_change(step.admitted, step.evicted)
        self.stats.copies += copies
        self.stats.modeled_s.append(max(self._clock, copies * self.cost.t_pcie()))


class SimulatedGpuExperts(CpuExpertBackend):
    """The simulated GPU's experts: the layer's own C++ engine, asked for the GPU's share."""


class CudaExperts:
    """GPU-resident experts of one layer on a CUDA device (dequantized from the GGUF blocks)."""

    def __init__(self, weights, layer: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> None:
        self.raw = [weights.raw(f"blk.{layer}.{t}") for t in EXPERT_TENSORS]
        self.device, self.dtype = device, dtype
        self.resident: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def load(self, expert: int) -> None:
        """Copy one expert to the device (dequantized on the host first)."""
        import gguf

        mats = []
        for r in self.raw:
            w = gguf.quants.dequantize(np.ascontiguousarray(r.data[expert]), r.qtype)
            mats.append(torch.from_numpy(w).to(self.dtype).pin_memory().to(self.device, non_blocking=True))
        self.resident[expert] = (mats[0], mats[1], mats[2])

    def evict(self, expert: int) -> None:
        """Free one expert's device memory."""
        self.resident.pop(expert, None)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: np.ndarray) -> torch.Tensor:
        """See ``ktlab.model.layers.ExpertBackend``; launches are asynchronous."""
        xd = x.to(self.device, self.dtype, non_blocking=True)
        out = torch.zeros_like(xd)
        for e in experts.tolist():
            if e not in self.resident:  # fetched by the scheduler this step
                self.load(e)
            token_idx, slot = torch.where(ids == e)
            gate, up, down = self.resident[e]
            xs = xd[token_idx.to(self.device)]
            h = F.silu(xs @ gate.T) * (xs @ up.T)
            w = weights[token_idx, slot].to(self.device, self.dtype)[:, None]
            out.index_add_(0, token_idx.to(self.device), (h @ down.T) * w)
        return out.to("cpu", x.dtype)


def expert_budget(config: HybridConfig, cost: ExpertCost, num_layers: int, num_experts: int) -> int:
    """Expert slots from the config's VRAM budget (GB) or share of experts."""
    if config.vram_budget_gb is not None:
        return placements.budget_from_bytes(config.vram_budget_gb * 1e9, cost.expert_bytes, num_layers, num_experts)
    return placements.budget_from_fraction(config.budget, num_layers, num_experts)


def attach_hybrid(model, weights, config: HybridConfig) -> HybridPlacement:
    """Make ``model`` (built with ``experts="cpu"``) hybrid: a :class:`HybridPlacement` and a
    GPU backend per layer. Returns the placement (its ``stats`` tell what happened)."""
    cfg = model.cfg
    if model.experts != "cpu":
        raise ValueError("the hybrid runtime needs the model's experts in the C++ engine (experts='cpu')")
    if model.deferral:
        raise ValueError("the live hybrid runtime does not defer experts yet (model.deferral must be 0)")
    acc = make_accelerator(config.accelerator)
    cpu0 = model.layers[0].moe.backends["cpu"].experts
    cost = ExpertCost.for_model(cfg, cpu0.expert_bytes, acc.profile, config.cpu)
    slots = expert_budget(config, cost, cfg.num_layers, cfg.num_experts)
    static = config.policy.startswith("static:")
    cache = build_cache(config.policy, slots, cfg.num_layers, cfg.num_experts, cost, counts=config.counts,
                        horizon=config.horizon)
    hybrid = HybridPlacement(cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok, cost, cache, static, acc)
    for i, layer in enumerate(model.layers):
        if acc.simulated:
            layer.moe.backends["gpu"] = SimulatedGpuExperts(layer.moe.backends["cpu"].experts)
        else:  # pragma: no cover - needs a GPU
            layer.moe.backends["gpu"] = CudaExperts(weights, i, acc.device)
        layer.moe.placement = hybrid
    if not acc.simulated:  # pragma: no cover - needs a GPU
        gpu = [layer.moe.backends["gpu"] for layer in model.layers]
        for layer, expert in np.argwhere(cache.resident):
            gpu[layer].load(int(expert))

        def sync(admitted: np.ndarray, evicted: np.ndarray) -> None:
            for layer, expert in np.argwhere(evicted):
                gpu[layer].evict(int(expert))
            for layer, expert in np.argwhere(admitted):
                gpu[layer].load(int(expert))

        hybrid.on_residency_change = sync
    model.placement = hybrid
    model.add_route_observer(hybrid)
    return hybrid
