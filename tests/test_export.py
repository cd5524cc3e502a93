"""ktlab.export: every format parses back and says what the placement says."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktlab.export import (
    FILE_NAMES,
    KT_STRATEGIES,
    ExportOptions,
    export,
    gguf_expert_tensor_names,
    kt_flags,
    kt_gpu_count_flags,
    kt_rules_yaml,
    kt_strategy_name,
    llama_cpp_flags,
    load_toml,
    placement_from_toml,
    placement_to_toml,
    save_toml,
    whole_layer_plan,
)
from ktlab.sched.placement import ExpertPlacement, make_placement

yaml = pytest.importorskip("yaml")
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

L, E = 6, 64
OTHER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "attn_q_norm", "attn_k_norm",
                 "ffn_norm", "ffn_gate_inp")


def skewed_counts(rng: np.random.Generator, num_layers: int = L, num_experts: int = E) -> np.ndarray:
    """Zipf-like activation counts with a random hot set per layer."""
    base = 1000.0 / np.arange(1, num_experts + 1)
    return np.stack([rng.permutation(base) for _ in range(num_layers)]).round().astype(np.int64)


def placements() -> list[ExpertPlacement]:
    """One placement of every strategy at 100 slots, plus a custom mask without counts."""
    rng = np.random.default_rng(0)
    counts = skewed_counts(rng)
    made = [make_placement(s, 100, counts) for s in ("uniform", "frequency", "front-loading", "random")]
    made.append(make_placement("threshold", 100, counts, t=0.02))
    made.append(ExpertPlacement(rng.random((L, E)) < 0.3, "custom"))
    return made


PLACEMENTS = placements()
IDS = [p.strategy for p in PLACEMENTS]


def all_gguf_names(num_layers: int) -> list[str]:
    """Every tensor name of a Qwen3-MoE GGUF with ``num_layers`` blocks."""
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for layer in range(num_layers):
        names += [f"blk.{layer}.{t}.weight" for t in OTHER_TENSORS] + gguf_expert_tensor_names(layer)
    return names


def kt_parser() -> argparse.ArgumentParser:
    """A mirror of the SGLang/KTransformers flags we emit, with their types."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--kt-num-gpu-experts", type=int)
    parser.add_argument("--kt-gpu-experts-ratio", type=float)
    parser.add_argument("--kt-expert-placement-strategy", choices=KT_STRATEGIES, default="uniform")
    parser.add_argument("--init-expert-location", type=str, default="trivial")
    parser.add_argument("--kt-max-deferred-experts-per-token", type=int)
    parser.add_argument("--kt-gpu-prefill-token-threshold", type=int)
    parser.add_argument("--kt-enable-dynamic-expert-update", action="store_true")
    return parser


def kt_total(args: argparse.Namespace, num_layers: int, num_experts: int) -> int:
    """Total GPU experts as SGLang derives it (ratio wins over the per-layer count)."""
    if args.kt_gpu_experts_ratio is not None:
        return int(num_layers * num_experts * args.kt_gpu_experts_ratio)
    return args.kt_num_gpu_experts * num_layers


def kt_frequency_mask(path: str, total: int) -> np.ndarray:
    """SGLang's frequency strategy: load logical_count [X, L, E], sum X, global top-``total``."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)["logical_count"]
    assert loaded.dim() == 3
    freq = loaded.sum(dim=0).float()
    mask = torch.zeros(freq.numel(), dtype=torch.bool)
    mask[torch.topk(freq.view(-1), k=total, largest=True, sorted=False).indices] = True
    return mask.view(freq.shape).numpy()


# --- KTransformers / SGLang ------------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS, ids=IDS)
def test_kt_exact_flags_reproduce_the_mask(placement, tmp_path):
    options = ExportOptions(deferral=2, gpu_prefill_token_threshold=512, dynamic_expert_update=True)
    result = export(placement, "ktransformers", tmp_path, options)
    args = kt_parser().parse_args(result.kt.argv)
    assert args.kt_expert_placement_strategy == "frequency"
    assert args.kt_max_deferred_experts_per_token == 2
    assert args.kt_gpu_prefill_token_threshold == 512 and args.kt_enable_dynamic_expert_update
    assert args.init_expert_location == str(result.paths["kt_pin"])
    assert kt_total(args, L, E) == placement.num_gpu_experts
    np.testing.assert_array_equal(kt_frequency_mask(args.init_expert_location, placement.num_gpu_experts),
                                  placement.gpu)
    assert (tmp_path / FILE_NAMES["kt_flags"]).read_text().strip() == result.kt.shell


def test_kt_counts_file_holds_the_activation_counts(tmp_path):
    placement = PLACEMENTS[1]
    result = export(placement, "ktransformers", tmp_path)
    loaded = torch.load(result.paths["kt_counts"], weights_only=True)["logical_count"]
    np.testing.assert_array_equal(loaded.numpy(), placement.counts[None])


@pytest.mark.parametrize("placement", PLACEMENTS[:5], ids=IDS[:5])
def test_kt_strategy_mode_names_the_nearest_strategy(placement, tmp_path):
    result = export(placement, "ktransformers", tmp_path, ExportOptions(kt_mode="strategy"))
    args = kt_parser().parse_args(result.kt.argv)
    assert args.kt_expert_placement_strategy == kt_strategy_name(placement.strategy)
    assert kt_total(args, L, E) == placement.num_gpu_experts
    assert "kt_pin" not in result.paths
    if args.kt_expert_placement_strategy == "frequency":
        assert args.init_expert_location == str(result.paths["kt_counts"])
    else:
        assert args.init_expert_location == "trivial"  # not passed


def test_kt_strategy_mode_fills_the_budget():
    placement = PLACEMENTS[4]  # threshold: may use fewer slots than the budget
    flags = kt_flags(placement, ExportOptions(kt_mode="strategy", budget=120))
    assert kt_total(kt_parser().parse_args(flags.argv), L, E) == 120


def test_kt_strategy_names():
    assert [kt_strategy_name(s) for s in ("uniform", "frequency", "front-loading", "random")] == list(
        ("uniform", "frequency", "front-loading", "random"))
    assert {kt_strategy_name(s) for s in ("threshold", "custom", "lru", "belady")} == {"frequency"}


def test_kt_strategy_mode_frequency_without_counts_is_an_error():
    with pytest.raises(ValueError, match="needs activation counts"):
        kt_flags(PLACEMENTS[-1], ExportOptions(kt_mode="strategy"))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(1, 256), st.data())
def test_kt_gpu_count_flags_give_the_exact_total(num_layers, num_experts, data):
    n = data.draw(st.integers(0, num_layers * num_experts))
    args = kt_parser().parse_args(kt_gpu_count_flags(n, num_layers, num_experts))
    assert kt_total(args, num_layers, num_experts) == n


# --- KTransformers optimize-rule YAML ------------------------------------------------------------


def first_matching_rule(rules: list[dict], module: str) -> dict | None:
    """KTransformers applies the first rule whose name regex matches the module."""
    return next((r for r in rules if re.match(r["match"]["name"], module)), None)


@pytest.mark.parametrize("placement", PLACEMENTS, ids=IDS)
def test_kt_rules_yaml_places_the_intended_layers(placement):
    options = ExportOptions(kt_device="cuda:0", model_name="odd\n- match: {}")  # must stay in the comment
    rules = yaml.safe_load(kt_rules_yaml(placement, options))
    plan = whole_layer_plan(placement)
    for layer in range(L):
        rule = first_matching_rule(rules, f"model.layers.{layer}.mlp.experts")
        kwargs = rule["replace"]["kwargs"]
        expected = ("cuda:0", "KExpertsMarlin") if layer in plan.gpu_layers else ("cpu", "KExpertsCPU")
        assert (kwargs["generate_device"], kwargs["generate_op"]) == expected
        assert kwargs["out_device"] == "cuda:0" and rule["recursive"] is False
        assert rule["replace"]["class"] == "ktransformers.operators.experts.KTransformersExperts"
    for module in ("model.layers.1.mlp", "model.layers.1.mlp.experts.3", "model.layers.1.self_attn"):
        assert first_matching_rule(rules, module) is None
    assert len(rules) == (2 if plan.gpu_layers else 1)


# --- llama.cpp ----------------------------------------------------------------------------------


def cpu_matched(regex: str | None, num_layers: int) -> set[str]:
    """Names llama.cpp would send to the CPU (it applies the pattern with regex_search)."""
    if regex is None:
        return set()
    pattern = re.compile(regex)
    return {name for name in all_gguf_names(num_layers) if pattern.search(name)}


def n_cpu_moe_matched(n: int, num_layers: int) -> set[str]:
    """What llama.cpp's own --n-cpu-moe N overrides match (llm_ffn_exps_block_regex)."""
    patterns = [re.compile(rf"blk\.{i}\.ffn_(up|down|gate|gate_up)_(ch|)exps") for i in range(n)]
    return {name for name in all_gguf_names(num_layers) if any(p.search(name) for p in patterns)}


def check_llama_flags(placement: ExpertPlacement) -> None:
    L_, E_ = placement.gpu.shape
    flags = llama_cpp_flags(placement)
    plan = flags.plan
    expected = {name for layer in plan.cpu_layers for name in gguf_expert_tensor_names(layer)}
    assert cpu_matched(flags.cpu_regex, L_) == expected
    assert plan.gpu_slots <= placement.num_gpu_experts
    assert len(plan.gpu_layers) == min(placement.num_gpu_experts // E_, L_)
    if flags.n_cpu_moe is not None:
        assert plan.cpu_layers == tuple(range(flags.n_cpu_moe))
        assert n_cpu_moe_matched(flags.n_cpu_moe, L_) == expected
    if flags.n_cpu_moe:
        assert flags.argv[-2:] == ("--n-cpu-moe", str(flags.n_cpu_moe))
    elif flags.cpu_regex is not None:
        assert flags.argv[-2:] == ("--override-tensor", flags.override_tensor)


@pytest.mark.parametrize("placement", PLACEMENTS, ids=IDS)
def test_llama_cpp_regex_matches_exactly_the_cpu_layers(placement):
    check_llama_flags(placement)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24), st.integers(1, 16), st.data())
def test_llama_cpp_regex_property(num_layers, num_experts, data):
    bits = data.draw(st.lists(st.booleans(), min_size=num_layers * num_experts, max_size=num_layers * num_experts))
    gpu = np.array(bits, dtype=bool).reshape(num_layers, num_experts)
    check_llama_flags(ExpertPlacement(gpu, "custom"))


def test_llama_cpp_keeps_the_heaviest_layers_and_reports_the_loss():
    counts = np.ones((L, E), dtype=np.int64)
    counts[2] *= 5  # layer 2 carries the most activations, then 4
    counts[4] *= 3
    placement = make_placement("frequency", 2 * E + 10, counts)
    flags = llama_cpp_flags(placement)
    assert flags.plan.gpu_layers == (2, 4)
    assert flags.n_cpu_moe is None and flags.cpu_regex == r"blk\.(0|1|3|5)\.ffn_(gate|up|down)_exps\.weight"
    layer_mask = np.zeros((L, E), dtype=bool)
    layer_mask[[2, 4]] = True
    np.testing.assert_array_equal(flags.plan.mask(), layer_mask)
    assert flags.plan.hit_rate_expert == placement.hit_rate(counts)
    assert flags.plan.hit_rate_layer == ExpertPlacement(layer_mask).hit_rate(counts)
    assert flags.plan.hit_rate_lost == pytest.approx(placement.hit_rate(counts) - flags.plan.hit_rate_layer)


def test_llama_cpp_flat_profile_is_n_cpu_moe():
    counts = np.full((L, E), 7)
    flags = llama_cpp_flags(make_placement("uniform", 3 * E, counts), ExportOptions(n_gpu_layers=99))
    assert flags.n_cpu_moe == 3 and flags.argv == ("--n-gpu-layers", "99", "--n-cpu-moe", "3")


def test_llama_cpp_all_experts_on_gpu_needs_no_override():
    flags = llama_cpp_flags(ExpertPlacement(np.ones((L, E), dtype=bool)))
    assert flags.cpu_regex is None and flags.n_cpu_moe == 0 and flags.argv == ("--n-gpu-layers", "999")


# --- TOML ----------------------------------------------------------------------------------------


def assert_same_placement(a: ExpertPlacement, b: ExpertPlacement) -> None:
    np.testing.assert_array_equal(a.gpu, b.gpu)
    assert a.strategy == b.strategy and a.params == b.params
    assert (a.counts is None) == (b.counts is None)
    if a.counts is not None:
        np.testing.assert_array_equal(a.counts, b.counts)
        assert a.counts.dtype.kind == b.counts.dtype.kind


FULL_OPTIONS = ExportOptions(model_name='Qwen3 "30B" \\ A3B\n', model_path="/models/q.gguf", budget=120, deferral=3,
                             gpu_prefill_token_threshold=1024, dynamic_expert_update=True, policy="lru",
                             vram_budget_gb=23.5, accelerator="rtx4090-24g", kt_mode="strategy", n_gpu_layers=40)


@pytest.mark.parametrize("placement", PLACEMENTS, ids=IDS)
def test_toml_round_trip_is_exact(placement, tmp_path):
    path = save_toml(tmp_path / "p.toml", placement, FULL_OPTIONS)
    tomllib.loads(path.read_text())  # plain TOML
    loaded, options = load_toml(path)
    assert_same_placement(placement, loaded)
    assert options == FULL_OPTIONS


def test_toml_round_trip_of_params_and_float_counts():
    counts = np.random.default_rng(1).random((L, E)) * 1e-3
    params = {"t": 0.1 + 0.2, "seed": np.int64(7), "name": "tab\there", "odd key": [1, 2.5, "x", True],
              "tiny": 1e-300, "inf": float("inf")}
    placement = ExpertPlacement(counts > 5e-4, "value-driven", counts, params)
    loaded, options = placement_from_toml(placement_to_toml(placement))
    assert_same_placement(placement, loaded)
    assert options == ExportOptions()


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1), st.text())
def test_toml_strings_round_trip(name, strategy):
    placement = ExpertPlacement(np.eye(3, 5, dtype=bool), strategy)
    loaded, options = placement_from_toml(placement_to_toml(placement, ExportOptions(model_name=name)))
    assert options.model_name == name and loaded.strategy == strategy


def test_toml_human_readable_per_layer_lists():
    text = placement_to_toml(PLACEMENTS[1])
    data = tomllib.loads(text)
    assert data["placement"]["gpu_experts"][3] == PLACEMENTS[1].gpu_experts(3).tolist()
    assert "# layer 3" in text


@pytest.mark.parametrize("text, message", [
    ('format = "other"\nversion = 1\n', "not a ktlab placement"),
    ("format = = 1", "Invalid"),
    ('format = "ktlab-placement"\nversion = 1\n[placement]\nnum_layers = 1\nnum_experts = 2\ngpu_experts = [[2]]\n',
     "distinct expert ids"),
    ('format = "ktlab-placement"\nversion = 1\n[settings]\ncolour = "red"\n', "unknown settings colour"),
])
def test_toml_bad_files(text, message):
    with pytest.raises(ValueError, match=message):
        placement_from_toml(text)


def test_load_toml_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_toml(tmp_path / "nope.toml")


@pytest.mark.parametrize("params", [{"x": None}, {"x": {"nested": 1}}, {3: 1}])
def test_toml_rejects_params_it_cannot_write(params):
    with pytest.raises(ValueError, match="params"):
        placement_to_toml(ExpertPlacement(np.eye(2, dtype=bool), "custom", params=params))


# --- export() -----------------------------------------------------------------------------------


def test_export_all_writes_every_file(tmp_path):
    placement = PLACEMENTS[1]
    result = export(placement, "all", tmp_path / "out", ExportOptions(model_path="/m/q.gguf"))
    assert set(result.paths) == set(FILE_NAMES)
    assert all(path.is_file() and path.parent == tmp_path / "out" for path in result.paths.values())
    for word in ("ktransformers", "kt-rules", "llama.cpp", "toml", "lost"):
        assert word in result.summary
    assert result.kt is not None and result.llama_cpp is not None and result.layer_plan is not None
    assert_same_placement(placement, load_toml(result.paths["toml"])[0])
    flags_line = result.paths["llama_cpp_flags"].read_text().strip()
    assert flags_line == result.llama_cpp.shell


def test_export_errors(tmp_path):
    placement = PLACEMENTS[0]
    with pytest.raises(ValueError, match="unknown export target 'vllm'"):
        export(placement, "vllm", tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot create the output folder"):
        export(placement, "toml", blocker / "sub")
    with pytest.raises(ValueError, match=r"counts shape \(6, 8\)"):
        export(placement, "llama.cpp", tmp_path, counts=np.ones((L, 8)))
    with pytest.raises(ValueError, match="more than the budget"):
        export(placement, "llama.cpp", tmp_path, ExportOptions(budget=10))
    with pytest.raises(ValueError, match="non-negative"):
        export(placement, "llama.cpp", tmp_path, counts=-np.ones((L, E)))
    with pytest.raises(ValueError, match="expected an ExpertPlacement"):
        export(np.zeros((L, E), dtype=bool), "toml", tmp_path)


@pytest.mark.parametrize("field, value", [
    ("model_name", ""), ("budget", -1), ("budget", 2.5), ("deferral", True), ("gpu_prefill_token_threshold", 0),
    ("policy", ""), ("vram_budget_gb", 0), ("vram_budget_gb", float("nan")), ("kt_mode", "fast"),
    ("dynamic_expert_update", 1), ("n_gpu_layers", -1),
])
def test_export_options_validate(field, value):
    with pytest.raises(ValueError, match=f"ExportOptions.{field}"):
        ExportOptions(**{field: value})


@pytest.mark.parametrize("heavy", [(0, 1), (2, 4)])
def test_llama_cpp_and_kt_rules_name_blocks_after_leading_dense_layers(heavy):
    """GLM-4.5 / DeepSeek: MoE layer i is block first_moe_layer + i. The regex and --n-cpu-moe that
    llama.cpp applies send exactly the CPU layers' expert tensors (blocks shifted) to the CPU, and
    the KTransformers rules name the shifted blocks."""
    first = 3
    counts = np.ones((L, E), dtype=np.int64)
    counts[list(heavy)] *= 9
    placement = make_placement("frequency", 2 * E, counts)
    options = ExportOptions(first_moe_layer=first)
    flags = llama_cpp_flags(placement, options)
    expected = {name for layer in flags.plan.cpu_layers for name in gguf_expert_tensor_names(layer + first)}
    if flags.n_cpu_moe is not None:
        assert n_cpu_moe_matched(flags.n_cpu_moe, L + first) == expected
    else:
        assert cpu_matched(flags.cpu_regex, L + first) == expected
    rules = yaml.safe_load(kt_rules_yaml(placement, options, counts))
    gpu_blocks = {layer + first for layer in flags.plan.gpu_layers}
    for block in range(L + first):
        rule = first_matching_rule(rules, f"model.layers.{block}.mlp.experts")
        on_gpu = rule["replace"]["kwargs"]["generate_device"] != "cpu"
        assert on_gpu == (block in gpu_blocks), block
