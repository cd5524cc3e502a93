"""Export a tuned expert placement to other engines, and to a ktlab TOML file.

Targets (see ``docs/export.md`` for what each one can and cannot express):

- ``ktransformers``: KTransformers + SGLang (kt-kernel) launch flags, plus the ``.pt`` statistics
  file that ``--init-expert-location`` points at. Per-expert exact: SGLang's ``frequency``
  strategy takes the global top-N of that file, so we write scores whose top-N is our mask.
- ``kt-rules``: the ``mlp.experts`` rules of a KTransformers optimize-rule YAML. Whole layers
  only: a rule sends all experts of the layers it matches to one device.
- ``llama.cpp``: ``--override-tensor`` / ``--n-cpu-moe`` flags. Whole layers only.
- ``toml``: a ktlab TOML file (:func:`load_toml` reads it back exactly).

Everything here is pure Python + numpy except the ``.pt`` writer (torch, imported when used).
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ktlab.sched.placement import ExpertPlacement

TARGETS = ("ktransformers", "kt-rules", "llama.cpp", "toml", "all")
KT_STRATEGIES = ("uniform", "frequency", "front-loading", "random")
KT_MODES = ("exact", "strategy")
TOML_FORMAT = "ktlab-placement"
TOML_VERSION = 1

FILE_NAMES = {
    "kt_flags": "kt_flags.txt",
    "kt_pin": "kt_expert_pin.pt",
    "kt_counts": "kt_expert_counts.pt",
    "kt_rules": "kt_optimize_rules.yaml",
    "llama_cpp_flags": "llama_cpp_flags.txt",
    "toml": "placement.toml",
}

# Our strategy names -> KTransformers' (the nearest one where there is no twin).
_KT_STRATEGY_OF = {
    "uniform": "uniform",
    "frequency": "frequency",
    "front-loading": "front-loading",
    "random": "random",
    # hot/cold threshold = the most used experts above a cut-off: a frequency placement that may stop early
    "threshold": "frequency",
}
# Anything else ("custom", cache policies such as lru / lfu / value / belady) keeps the experts the
# traffic uses, which is what KTransformers' frequency strategy does: see kt_strategy_name().

GGUF_EXPERT_PARTS = ("gate", "up", "down")
KT_EXPERTS_CLASS = "ktransformers.operators.experts.KTransformersExperts"
_KT_ALL_EXPERTS = r"^model\.layers\..*\.mlp\.experts$"


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not (_is_int(value) and value >= minimum):
        _fail(f"ExportOptions.{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}")


def _check_text(name: str, value: Any, optional: bool = False, empty_ok: bool = False) -> None:
    if value is None and optional:
        return
    if not (isinstance(value, str) and (empty_ok or value)):
        kind = "a string" if empty_ok else "a non-empty string"
        _fail(f"ExportOptions.{name} must be {kind}{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class ExportOptions:
    """What an export needs beyond the placement; all of it is saved in the TOML file.

    ``budget`` is the GPU expert slots (None: the placement's own count); whole-layer targets
    (``kt-rules``, ``llama.cpp``) never use more. ``deferral`` is KTransformers' expert deferral
    (``--kt-max-deferred-experts-per-token``). ``kt_mode``: ``"exact"`` pins our per-expert mask
    through the frequency strategy, ``"strategy"`` names the nearest KTransformers strategy and
    lets it choose the experts. ``kt_device`` / ``kt_gpu_op`` / ``kt_experts_class`` shape the
    optimize-rule YAML; ``n_gpu_layers`` is llama.cpp's ``--n-gpu-layers`` (the non-expert weights).
    ``first_moe_layer``: the block of MoE layer 0 (the leading dense layers of GLM-4.5 or DeepSeek), so
    layer i of the placement is named ``blk.{first_moe_layer + i}``.
    ``policy``, ``vram_budget_gb`` and ``accelerator`` are ktlab settings carried along.
    """

    model_name: str = "tiny"
    model_path: str = ""
    budget: int | None = None
    deferral: int = 0
    gpu_prefill_token_threshold: int | None = None
    dynamic_expert_update: bool = False
    policy: str | None = None
    vram_budget_gb: float | None = None
    accelerator: str | None = None
    kt_mode: str = "exact"
    kt_device: str = "cuda"
    kt_gpu_op: str = "KExpertsMarlin"
    kt_experts_class: str = KT_EXPERTS_CLASS
    n_gpu_layers: int = 999
    first_moe_layer: int = 0

    def __post_init__(self) -> None:
        _check_text("model_name", self.model_name)
        _check_text("model_path", self.model_path, empty_ok=True)
        _check_int("budget", self.budget, 0, optional=True)
        _check_int("deferral", self.deferral, 0)
        _check_int("gpu_prefill_token_threshold", self.gpu_prefill_token_threshold, 1, optional=True)
        _check_int("n_gpu_layers", self.n_gpu_layers, 0)
        _check_int("first_moe_layer", self.first_moe_layer, 0)
        if not isinstance(self.dynamic_expert_update, bool):
            _fail(f"ExportOptions.dynamic_expert_update must be True or False, got {self.dynamic_expert_update!r}")
        for name in ("policy", "accelerator"):
            _check_text(name, getattr(self, name), optional=True)
        for name in ("kt_device", "kt_gpu_op", "kt_experts_class"):
            _check_text(name, getattr(self, name))
        if self.kt_mode not in KT_MODES:
            _fail(f"ExportOptions.kt_mode must be one of {', '.join(KT_MODES)}, got {self.kt_mode!r}")
        self._check_vram()

    def _check_vram(self) -> None:
        gb = self.vram_budget_gb
        if gb is None:
            return
        if not (isinstance(gb, (int, float, np.number)) and not isinstance(gb, bool) and math.isfinite(gb) and gb > 0):
            _fail(f"ExportOptions.vram_budget_gb must be a positive number of GB or None, got {gb!r}")
        object.__setattr__(self, "vram_budget_gb", float(gb))


# ----------------------------------------------------------------------------------------------
# Input checks shared by every target
# ----------------------------------------------------------------------------------------------


def _mask(placement: ExpertPlacement) -> np.ndarray:
    """The placement's bool mask [L, E], checked (non-empty, 2-D, bool)."""
    if not isinstance(placement, ExpertPlacement):
        _fail(f"expected an ExpertPlacement, got {type(placement).__name__}")
    gpu = np.asarray(placement.gpu)
    if gpu.ndim != 2 or gpu.dtype != bool or 0 in gpu.shape:
        _fail(f"placement.gpu must be a non-empty bool array [layers, experts], got {gpu.dtype} {gpu.shape}")
    return gpu


def _counts(placement: ExpertPlacement, counts: np.ndarray | None) -> np.ndarray | None:
    """``counts`` (else the placement's own), checked: same shape as the mask, finite, >= 0."""
    counts = placement.counts if counts is None else counts
    if counts is None:
        return None
    counts = np.asarray(counts)
    shape = np.shape(placement.gpu)
    if counts.shape != shape:
        _fail(f"counts shape {counts.shape} does not match the placement's {shape} (layers, experts)")
    if not np.issubdtype(counts.dtype, np.number) or not np.all(np.isfinite(counts)) or np.any(counts < 0):
        _fail("counts must be finite, non-negative activation counts")
    return counts


def _budget(placement: ExpertPlacement, budget: int | None) -> int:
    """The GPU expert slots of an export: ``budget``, else what the placement uses (checked)."""
    gpu = _mask(placement)
    used = int(gpu.sum())
    if budget is not None and not (_is_int(budget) and budget >= 0):
        _fail(f"budget must be an integer >= 0 expert slots or None, got {budget!r}")
    budget = used if budget is None else int(budget)
    if used > budget:
        _fail(f"the placement keeps {used} experts on the GPU, more than the budget of {budget}")
    if budget > gpu.size:
        _fail(f"budget {budget} exceeds the model's {gpu.size} experts ({gpu.shape[0]} layers x {gpu.shape[1]})")
    return budget


def _hit_rate(gpu: np.ndarray, counts: np.ndarray | None) -> float:
    """GPU hit rate of ``gpu`` under ``counts`` (uniform routing when there are none)."""
    weights = np.ones(gpu.shape) if counts is None else counts
    return ExpertPlacement(gpu).hit_rate(weights)


def _alternation(layers: tuple[int, ...]) -> str:
    """``(3|4|7)``: a regex group matching exactly these layer numbers (between delimiters)."""
    return "(" + "|".join(str(layer) for layer in layers) + ")"


# ----------------------------------------------------------------------------------------------
# Whole-layer plans (kt-rules, llama.cpp)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WholeLayerPlan:
    """The per-expert placement rounded to whole layers: the layers whose experts all stay on the
    GPU (at most ``budget // E`` of them), and the hit rates before and after the rounding."""

    gpu_layers: tuple[int, ...]
    num_layers: int
    num_experts: int
    budget: int
    hit_rate_expert: float
    hit_rate_layer: float

    @property
    def cpu_layers(self) -> tuple[int, ...]:
        """Layers whose experts all live on the CPU."""
        return tuple(layer for layer in range(self.num_layers) if layer not in self.gpu_layers)

    @property
    def gpu_slots(self) -> int:
        """GPU expert slots the plan uses (whole layers x experts per layer)."""
        return len(self.gpu_layers) * self.num_experts

    @property
    def hit_rate_lost(self) -> float:
        """Hit rate given up by placing whole layers instead of single experts."""
        return self.hit_rate_expert - self.hit_rate_layer

    def mask(self) -> np.ndarray:
        """The plan as a bool mask [L, E]."""
        return _layers_mask(self.num_layers, self.num_experts, self.gpu_layers)


def _layers_mask(num_layers: int, num_experts: int, layers: tuple[int, ...]) -> np.ndarray:
    """Mask [L, E] with every expert of ``layers`` set."""
    gpu = np.zeros((num_layers, num_experts), dtype=bool)
    gpu[list(layers)] = True
    return gpu


def whole_layer_plan(
    placement: ExpertPlacement, budget: int | None = None, counts: np.ndarray | None = None
) -> WholeLayerPlan:
    """Choose whole layers to keep on the GPU within ``budget`` slots (default: the placement's count).

    Every layer costs E slots, so ``budget // E`` layers fit; we take the ones that cover the most
    activation mass (``counts``, else the placement's counts, else its GPU experts per layer). Ties
    go to the layers where the per-expert placement has more GPU experts, then to later layers, so a
    flat profile gives "the first N layers on CPU" (llama.cpp's ``--n-cpu-moe N``). With complete
    traces every layer carries the same mass, so the hit rate only depends on how many layers fit.
    """
    slots = _budget(placement, budget)
    gpu = _mask(placement)
    counts = _counts(placement, counts)
    L, E = gpu.shape
    per_layer_gpu = gpu.sum(axis=1)
    mass = per_layer_gpu if counts is None else counts.sum(axis=1)
    order = np.lexsort((-np.arange(L), -per_layer_gpu, -mass))  # last key is the primary one
    chosen = tuple(sorted(int(layer) for layer in order[: min(slots // E, L)]))
    layer_rate = _hit_rate(_layers_mask(L, E, chosen), counts)
    return WholeLayerPlan(chosen, L, E, slots, _hit_rate(gpu, counts), layer_rate)


def _plan_summary(plan: WholeLayerPlan, counts: np.ndarray | None) -> str:
    basis = "activation counts" if counts is not None else "uniform routing (no counts)"
    layers = ", ".join(map(str, plan.gpu_layers)) or "none"
    return (
        f"  experts of layers [{layers}] on the GPU ({plan.gpu_slots}/{plan.budget} slots, whole layers only); "
        f"hit rate {plan.hit_rate_layer:.1%} vs {plan.hit_rate_expert:.1%} per expert "
        f"(lost {plan.hit_rate_lost:.1%}, on {basis})"
    )


# ----------------------------------------------------------------------------------------------
# llama.cpp
# ----------------------------------------------------------------------------------------------


def gguf_expert_tensor_names(layer: int) -> list[str]:
    """GGUF names of the stacked expert tensors of ``layer`` (Qwen3-MoE: gate, up, down)."""
    return [f"blk.{layer}.ffn_{part}_exps.weight" for part in GGUF_EXPERT_PARTS]


def llama_cpp_cpu_regex(layers: tuple[int, ...]) -> str | None:
    """Regex for the expert tensors of ``layers`` (None when there are none), e.g.
    ``blk\\.(3|4|7)\\.ffn_(gate|up|down)_exps\\.weight``; llama.cpp applies it with regex_search."""
    if not layers:
        return None
    return rf"blk\.{_alternation(layers)}\.ffn_({'|'.join(GGUF_EXPERT_PARTS)})_exps\.weight"


@dataclass(frozen=True)
class LlamaCppFlags:
    """llama.cpp flags for a whole-layer plan: ``--override-tensor REGEX=CPU`` always works;
    ``n_cpu_moe`` is set when the CPU layers are exactly the first N, and ``argv`` then uses it."""

    plan: WholeLayerPlan
    cpu_regex: str | None
    n_cpu_moe: int | None
    argv: tuple[str, ...]

    @property
    def override_tensor(self) -> str | None:
        """The ``--override-tensor`` value (``REGEX=CPU``), or None when every layer is on the GPU."""
        return None if self.cpu_regex is None else f"{self.cpu_regex}=CPU"

    @property
    def shell(self) -> str:
        """The flags as one shell-quoted line."""
        return shlex.join(self.argv)


def llama_cpp_flags(
    placement: ExpertPlacement, options: ExportOptions | None = None, counts: np.ndarray | None = None
) -> LlamaCppFlags:
    """llama.cpp flags that keep the experts of :func:`whole_layer_plan`'s layers on the GPU and
    send every other layer's experts to the CPU."""
    options = options or ExportOptions()
    plan = whole_layer_plan(placement, options.budget, counts)
    cpu = plan.cpu_layers
    first = options.first_moe_layer  # MoE layer i is block first + i (dense layers come first)
    # --n-cpu-moe N counts blocks from 0; the leading dense blocks have no experts to move
    n_cpu_moe = (len(cpu) + first if cpu else 0) if cpu == tuple(range(len(cpu))) else None
    regex = llama_cpp_cpu_regex(tuple(layer + first for layer in cpu))
    argv = ["--n-gpu-layers", str(options.n_gpu_layers)]
    if n_cpu_moe:
        argv += ["--n-cpu-moe", str(n_cpu_moe)]
    elif regex is not None:
        argv += ["--override-tensor", f"{regex}=CPU"]
    return LlamaCppFlags(plan, regex, n_cpu_moe, tuple(argv))


# ----------------------------------------------------------------------------------------------
# KTransformers + SGLang flags and statistics
# ----------------------------------------------------------------------------------------------


def kt_strategy_name(strategy: str) -> str:
    """KTransformers' name for our ``strategy``: the twin where there is one, else ``frequency``
    (threshold, custom and cache-policy placements keep the experts the traffic uses)."""
    return _KT_STRATEGY_OF.get(strategy, "frequency")


def kt_pin_scores(placement: ExpertPlacement, counts: np.ndarray | None = None) -> np.ndarray:
    """Scores [L, E] whose global top-``num_gpu_experts`` is exactly the placement's mask.

    GPU experts score 2 + share, CPU experts their share (share: fraction of the layer's
    activations, 0 without counts), so the two groups stay apart even in float32.
    """
    gpu = _mask(placement)
    counts = _counts(placement, counts)
    share = np.zeros(gpu.shape) if counts is None else counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return (2.0 * gpu + share).astype(np.float32)


def kt_gpu_count_flags(num_gpu_experts: int, num_layers: int, num_experts: int) -> list[str]:
    """Flags that make SGLang place exactly ``num_gpu_experts`` GPU experts in total.

    ``--kt-num-gpu-experts`` counts experts *per MoE layer* (SGLang multiplies it by the layers),
    so it only fits a multiple of the layer count; otherwise ``--kt-gpu-experts-ratio`` r with
    ``int(L * E * r) == num_gpu_experts``, which is how SGLang turns a ratio into a count.
    """
    if num_gpu_experts % num_layers == 0:
        return ["--kt-num-gpu-experts", str(num_gpu_experts // num_layers)]
    total = num_layers * num_experts
    ratio = num_gpu_experts / total
    while int(total * ratio) < num_gpu_experts:
        ratio = math.nextafter(ratio, math.inf)
    return ["--kt-gpu-experts-ratio", repr(ratio)]


@dataclass(frozen=True)
class KTFlags:
    """KTransformers / SGLang launch flags for a placement (add them to ``sglang.launch_server``)."""

    argv: tuple[str, ...]
    strategy: str
    exact: bool
    stats_path: str | None

    @property
    def shell(self) -> str:
        """The flags as one shell-quoted line."""
        return shlex.join(self.argv)


def kt_flags(
    placement: ExpertPlacement,
    options: ExportOptions | None = None,
    stats_path: str | os.PathLike | None = None,
    counts: np.ndarray | None = None,
) -> KTFlags:
    """Flags for ``placement``; ``stats_path`` is the ``.pt`` file ``--init-expert-location`` names.

    ``kt_mode="exact"``: strategy ``frequency`` over :func:`kt_pin_scores` (default file
    ``kt_expert_pin.pt``) reproduces our mask. ``kt_mode="strategy"``: the nearest KTransformers
    strategy picks its own experts at ``options.budget`` (default: the mask's count); ``frequency``
    then reads the activation counts (default file ``kt_expert_counts.pt``) and needs them.
    """
    options = options or ExportOptions()
    gpu = _mask(placement)
    exact = options.kt_mode == "exact"
    strategy = "frequency" if exact else kt_strategy_name(placement.strategy)
    total = int(gpu.sum()) if exact else _budget(placement, options.budget)
    argv = ["--kt-expert-placement-strategy", strategy, *kt_gpu_count_flags(total, *gpu.shape)]
    path = None
    if strategy == "frequency":
        if not exact and _counts(placement, counts) is None:
            _fail("kt_mode='strategy' maps this placement to KTransformers' frequency strategy, which needs "
                  "activation counts; pass counts or use kt_mode='exact'")
        path = str(stats_path or FILE_NAMES["kt_pin" if exact else "kt_counts"])
        argv += ["--init-expert-location", path]
    argv += ["--kt-max-deferred-experts-per-token", str(options.deferral)]
    if options.gpu_prefill_token_threshold is not None:
        argv += ["--kt-gpu-prefill-token-threshold", str(options.gpu_prefill_token_threshold)]
    if options.dynamic_expert_update:
        argv.append("--kt-enable-dynamic-expert-update")
    return KTFlags(tuple(argv), strategy, exact, path)


def write_kt_stats(path: str | os.PathLike, values: np.ndarray) -> Path:
    """Save ``values`` [L, E] as SGLang's expert-distribution file: ``{"logical_count": [1, L, E]}``.

    SGLang's KT frequency strategy loads it with ``torch.load`` and sums over the first axis.
    """
    import torch  # torch is only needed for this file format

    path = Path(path)
    tensor = torch.from_numpy(np.ascontiguousarray(values)[None])
    try:
        torch.save({"logical_count": tensor}, path)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}")
    return path


# ----------------------------------------------------------------------------------------------
# KTransformers optimize-rule YAML
# ----------------------------------------------------------------------------------------------


def _yaml_str(text: str) -> str:
    """A YAML double-quoted scalar (a JSON string is one)."""
    return json.dumps(text)


def _kt_rule(name_regex: str, cls: str, kwargs: dict[str, str], comment: str) -> list[str]:
    lines = [f"# {comment}", "- match:", f"    name: {_yaml_str(name_regex)}", "  replace:",
             f"    class: {_yaml_str(cls)}", "    kwargs:"]
    lines += [f"      {key}: {_yaml_str(value)}" for key, value in kwargs.items()]
    return [*lines, "  recursive: False"]


def kt_rules_yaml(
    placement: ExpertPlacement, options: ExportOptions | None = None, counts: np.ndarray | None = None
) -> str:
    """The ``mlp.experts`` rules of a KTransformers optimize-rule YAML for :func:`whole_layer_plan`.

    Put them in place of the ``mlp.experts`` rule of the model's YAML (rules apply in order and the
    first match wins): the chosen layers' experts run on ``kt_device`` with ``kt_gpu_op``, the rest
    on the CPU (``KExpertsCPU``). The YAML has no per-expert mask, so single experts are lost.
    """
    options = options or ExportOptions()
    plan = whole_layer_plan(placement, options.budget, counts)
    device = options.kt_device
    lines = [
        f"# ktlab export of a {placement.strategy!r} placement for {options.model_name!r}: "
        f"{plan.num_layers} layers x {plan.num_experts} experts",
        f"# whole layers only: {len(plan.gpu_layers)} GPU layers = {plan.gpu_slots} of {plan.budget} slots; "
        f"hit rate {plan.hit_rate_layer:.4f} vs {plan.hit_rate_expert:.4f} per expert",
    ]
    if plan.gpu_layers:
        gpu_kwargs = {"generate_device": device, "generate_op": options.kt_gpu_op, "prefill_device": device,
                      "prefill_op": "KExpertsTorch", "out_device": device}
        blocks = tuple(layer + options.first_moe_layer for layer in plan.gpu_layers)
        regex = rf"^model\.layers\.{_alternation(blocks)}\.mlp\.experts$"
        lines += _kt_rule(regex, options.kt_experts_class, gpu_kwargs, "experts of these layers stay on the GPU")
    cpu_kwargs = {"prefill_device": device, "prefill_op": "KExpertsTorch", "generate_device": "cpu",
                  "generate_op": "KExpertsCPU", "out_device": device}
    lines += _kt_rule(_KT_ALL_EXPERTS, options.kt_experts_class, cpu_kwargs, "all other experts run on the CPU")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# ktlab TOML
# ----------------------------------------------------------------------------------------------


def _toml_str(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(float(value))


def _toml_value(value: Any, where: str) -> str:
    """TOML text of a scalar (bool, int, float, str) or a list of them."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if _is_int(value):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return _toml_float(float(value))
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item, where) for item in value) + "]"
    _fail(f"{where}: cannot write {type(value).__name__} {value!r} to TOML (use bool, int, float, str or a list)")


def _toml_rows(key: str, rows: list[list], label: str) -> list[str]:
    """A multi-line array of arrays, one row per layer."""
    body = [f"  {_toml_value(row, key)},  # {label} {i}" for i, row in enumerate(rows)]
    return [f"{key} = [", *body, "]"]


def _settings(options: ExportOptions) -> dict[str, Any]:
    """The options saved under [settings]: all but the model's name and path, None left out
    (every optional field defaults to None, so leaving it out reads back the same)."""
    skip = ("model_name", "model_path")
    values = {f.name: getattr(options, f.name) for f in fields(options) if f.name not in skip}
    return {key: value for key, value in values.items() if value is not None}


def placement_to_toml(placement: ExpertPlacement, options: ExportOptions | None = None) -> str:
    """The ktlab TOML text of ``placement`` and ``options`` (read back by :func:`placement_from_toml`)."""
    options = options or ExportOptions()
    gpu = _mask(placement)
    _budget(placement, options.budget)
    lines = [
        "# ktlab expert placement; read it back with ktlab.export.load_toml",
        f"format = {_toml_str(TOML_FORMAT)}",
        f"version = {TOML_VERSION}",
        "",
        "[model]",
        f"name = {_toml_str(options.model_name)}",
        f"path = {_toml_str(options.model_path)}",
        "",
        "[settings]",
        *(f"{key} = {_toml_value(value, f'settings.{key}')}" for key, value in _settings(options).items()),
        "",
        "[placement]",
        f"strategy = {_toml_str(placement.strategy)}",
        f"num_layers = {gpu.shape[0]}",
        f"num_experts = {gpu.shape[1]}",
        f"num_gpu_experts = {int(gpu.sum())}",
        *_toml_rows("gpu_experts", [np.flatnonzero(row).tolist() for row in gpu], "layer"),
        *_toml_counts(placement),
        "",
        "[placement.params]",
        *_toml_params(placement.params),
    ]
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and tuples as plain Python values (TOML has no tuples)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value.item() if isinstance(value, np.generic) else value


def _toml_params(params: dict) -> list[str]:
    """``key = value`` lines of the placement's params (string keys, TOML-able values)."""
    for key in params:
        if not isinstance(key, str):
            _fail(f"params: keys must be strings to be written to TOML, got {key!r}")
    return [f"{_toml_str(key)} = {_toml_value(_plain(value), f'params.{key}')}" for key, value in params.items()]


def _toml_counts(placement: ExpertPlacement) -> list[str]:
    if placement.counts is None:
        return []
    counts = _counts(placement, None)
    kind = "int" if np.issubdtype(counts.dtype, np.integer) else "float"
    return [f"counts_dtype = {_toml_str(kind)}", *_toml_rows("counts", counts.tolist(), "layer")]


def save_toml(path: str | os.PathLike, placement: ExpertPlacement, options: ExportOptions | None = None) -> Path:
    """Write :func:`placement_to_toml` to ``path``."""
    return _write_text(Path(path), placement_to_toml(placement, options))


def _table(data: dict, key: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        _fail(f"ktlab TOML: [{key}] must be a table")
    return value


def _options_from(data: dict) -> ExportOptions:
    model = _table(data, "model")
    settings = _table(data, "settings")
    known = {f.name for f in fields(ExportOptions)}
    unknown = sorted(set(settings) - known) + sorted(f"model.{k}" for k in set(model) - {"name", "path"})
    if unknown:
        _fail(f"ktlab TOML: unknown settings {', '.join(unknown)}")
    return ExportOptions(model_name=model.get("name", "tiny"), model_path=model.get("path", ""), **settings)


def _mask_from(table: dict) -> np.ndarray:
    L, E = table.get("num_layers"), table.get("num_experts")
    rows = table.get("gpu_experts")
    if not (_is_int(L) and _is_int(E) and L > 0 and E > 0 and isinstance(rows, list) and len(rows) == L):
        _fail("ktlab TOML: [placement] needs num_layers, num_experts > 0 and gpu_experts with one list per layer")
    gpu = np.zeros((L, E), dtype=bool)
    for layer, ids in enumerate(rows):
        if not all(_is_int(i) and 0 <= i < E for i in ids) or len(set(ids)) != len(ids):
            _fail(f"ktlab TOML: gpu_experts of layer {layer} must be distinct expert ids in [0, {E})")
        gpu[layer, ids] = True
    if table.get("num_gpu_experts", gpu.sum()) != gpu.sum():
        _fail(f"ktlab TOML: num_gpu_experts = {table['num_gpu_experts']} but gpu_experts lists {gpu.sum()}")
    return gpu


def _counts_from(table: dict, shape: tuple[int, int]) -> np.ndarray | None:
    if "counts" not in table:
        return None
    kind = table.get("counts_dtype", "int")
    if kind not in ("int", "float"):
        _fail(f"ktlab TOML: counts_dtype must be 'int' or 'float', got {kind!r}")
    try:
        counts = np.array(table["counts"], dtype=np.int64 if kind == "int" else np.float64)
    except (TypeError, ValueError, OverflowError):
        _fail("ktlab TOML: counts must be one list of numbers per layer")
    if counts.shape != shape:
        _fail(f"ktlab TOML: counts shape {counts.shape} != {shape}")
    return counts


def placement_from_toml(text: str) -> tuple[ExpertPlacement, ExportOptions]:
    """Parse ktlab TOML text back into the placement and the options it was written with."""
    tomllib = _tomllib()
    data = tomllib.loads(text)  # TOMLDecodeError is a ValueError
    if data.get("format") != TOML_FORMAT or data.get("version") != TOML_VERSION:
        _fail(f"not a ktlab placement file (expected format = {TOML_FORMAT!r}, version = {TOML_VERSION})")
    options = _options_from(data)
    table = _table(data, "placement")
    gpu = _mask_from(table)
    params = table.get("params", {})
    strategy = table.get("strategy", "custom")
    placement = ExpertPlacement(gpu, strategy, _counts_from(table, gpu.shape), dict(params))
    return placement, options


def load_toml(path: str | os.PathLike) -> tuple[ExpertPlacement, ExportOptions]:
    """Read a ktlab TOML file written by :func:`save_toml` / :func:`export`: (placement, options)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}")
    return placement_from_toml(text)


def _tomllib() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


# ----------------------------------------------------------------------------------------------
# One entry point
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: ``paths`` (by role, see :data:`FILE_NAMES`), a readable ``summary``,
    and the flag objects of the targets it ran (None for the others)."""

    target: str
    out_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)
    summary: str = ""
    kt: KTFlags | None = None
    llama_cpp: LlamaCppFlags | None = None
    layer_plan: WholeLayerPlan | None = None


@dataclass
class _Part:
    paths: dict[str, Path]
    lines: list[str]
    kt: KTFlags | None = None
    llama_cpp: LlamaCppFlags | None = None
    layer_plan: WholeLayerPlan | None = None


def _write_text(path: Path, text: str) -> Path:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}")
    return path


def _output_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"cannot create the output folder {out}: {exc.strerror or exc}")
    if not os.access(out, os.W_OK):
        _fail(f"the output folder {out} is not writable")
    return out


def _export_kt(placement: ExpertPlacement, options: ExportOptions, counts: np.ndarray | None, out: Path) -> _Part:
    paths: dict[str, Path] = {}
    if counts is not None:
        paths["kt_counts"] = write_kt_stats(out / FILE_NAMES["kt_counts"], counts)
    stats = out / FILE_NAMES["kt_pin" if options.kt_mode == "exact" else "kt_counts"]
    flags = kt_flags(placement, options, stats, counts)
    if flags.exact:
        paths["kt_pin"] = write_kt_stats(stats, kt_pin_scores(placement, counts))
    paths["kt_flags"] = _write_text(out / FILE_NAMES["kt_flags"], flags.shell + "\n")
    how = ("exact: frequency top-N over the pin file is this mask" if flags.exact
           else f"nearest strategy {flags.strategy!r}: KTransformers picks the experts at this budget")
    lines = ["ktransformers (SGLang + kt-kernel), " + how,
             f"  python -m sglang.launch_server --model {shlex.quote(options.model_path or '<model>')} "
             f"--kt-weight-path <cpu-weights> {flags.shell}"]
    return _Part(paths, lines, kt=flags)


def _export_rules(placement: ExpertPlacement, options: ExportOptions, counts: np.ndarray | None, out: Path) -> _Part:
    path = _write_text(out / FILE_NAMES["kt_rules"], kt_rules_yaml(placement, options, counts))
    plan = whole_layer_plan(placement, options.budget, counts)
    return _Part({"kt_rules": path}, [f"kt-rules: {path}", _plan_summary(plan, counts)], layer_plan=plan)


def _export_llama(placement: ExpertPlacement, options: ExportOptions, counts: np.ndarray | None, out: Path) -> _Part:
    flags = llama_cpp_flags(placement, options, counts)
    path = _write_text(out / FILE_NAMES["llama_cpp_flags"], flags.shell + "\n")
    lines = ["llama.cpp: " + (flags.shell or "(no flags needed)"), _plan_summary(flags.plan, counts)]
    return _Part({"llama_cpp_flags": path}, lines, llama_cpp=flags, layer_plan=flags.plan)


def _export_toml(placement: ExpertPlacement, options: ExportOptions, counts: np.ndarray | None, out: Path) -> _Part:
    path = save_toml(out / FILE_NAMES["toml"], placement, options)
    return _Part({"toml": path}, [f"toml: {path} (ktlab.export.load_toml reads it back)"])


_EXPORTERS = {"ktransformers": _export_kt, "kt-rules": _export_rules, "llama.cpp": _export_llama, "toml": _export_toml}


def export(
    placement: ExpertPlacement,
    target: str,
    out_dir: str | os.PathLike,
    options: ExportOptions | None = None,
    counts: np.ndarray | None = None,
) -> ExportResult:
    """Write ``placement`` for ``target`` (one of :data:`TARGETS`) into ``out_dir`` (created if needed).

    ``counts`` [L, E] (default: the placement's own) are the activation statistics used for the
    KTransformers statistics file and for the hit rates of the whole-layer targets. Bad input
    (unknown target, unwritable folder, shapes that disagree, budget too small) raises ValueError.
    """
    if target not in TARGETS:
        _fail(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    options = options or ExportOptions()
    if not isinstance(options, ExportOptions):
        _fail(f"options must be ExportOptions, got {type(options).__name__}")
    gpu = _mask(placement)
    budget = _budget(placement, options.budget)
    counts = _counts(placement, counts)
    out = _output_dir(out_dir)
    parts = [_EXPORTERS[name](placement, options, counts, out) for name in _EXPORTERS if target in (name, "all")]
    header = (f"ktlab export of a {placement.strategy!r} placement for {options.model_name}: {gpu.shape[0]} layers x "
              f"{gpu.shape[1]} experts, {int(gpu.sum())} on the GPU (budget {budget})")
    return ExportResult(
        target=target,
        out_dir=out,
        paths={key: path for part in parts for key, path in part.paths.items()},
        summary="\n".join([header, *(line for part in parts for line in part.lines)]),
        kt=next((p.kt for p in parts if p.kt), None),
        llama_cpp=next((p.llama_cpp for p in parts if p.llama_cpp), None),
        layer_plan=next((p.layer_plan for p in parts if p.layer_plan), None),
    )
