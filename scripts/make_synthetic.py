#!/usr/bin/env python3
"""Write a random-weight MoE GGUF with a real model's layer shapes (Qwen3-30B-A3B by default;
``--arch olmoe`` OLMoE-1B-7B, ``--arch qwen2moe`` Qwen1.5-MoE-A2.7B, ``--arch llama`` Mixtral-8x7B).

The full model (48 layers, ~18 GB at Q4_K_M) is not needed to measure what hybrid inference is
about: one layer of Qwen3-30B-A3B has exactly the real expert shapes, so a few layers of random
weights give realistic kernel timings, byte counts and cache behaviour. Weights are seeded
random normals (std ~ 1/sqrt(fan_in), norms ~ 1, router spread so top-k is not a tie); every
tensor is generated and quantized only when the writer reaches it, so memory stays near the
largest tensor (one stacked expert tensor: 800 MB as float32 at the default shapes).

    python scripts/make_synthetic.py                       # 4 layers, Q8_0, ~2.6 GB
    python scripts/make_synthetic.py --layers 2 --quant Q4_K
    python scripts/make_synthetic.py --layers 48 --quant Q4_K_M   # llama.cpp's mix, ~18 GB
    python scripts/make_synthetic.py --hidden 256 --experts 8 --top-k 2 -o /tmp/small.gguf
    python scripts/make_synthetic.py --arch qwen2moe --layers 2 --quant Q4_K_M
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ktlab.config import ModelConfig  # noqa: E402
from ktlab.errors import KtlabError  # noqa: E402
from ktlab.model.gguf_write import (  # noqa: E402
    WRITABLE_QTYPES,
    GGUFTokenizerData,
    TensorSpec,
    check_quant,
    quant_file_type,
    tensor_qtype,
    write_gguf,
)
from ktlab.model.mixes import QUANT_MIXES  # noqa: E402
from ktlab.model.registry import architecture  # noqa: E402
from ktlab.model.tokenizer import CHATML_TEMPLATE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED  # noqa: E402

PROG = "make_synthetic.py"
BUNDLED_TINY = ROOT / "models" / "tiny-qwen3moe-q8_0.gguf"
OUTPUT_DIR = ROOT / "models" / "synthetic"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B), all but the layer count and vocabulary.
QWEN3_30B_A3B = {
    "hidden": 2048,
    "experts": 128,
    "top_k": 8,
    "expert_inter": 768,
    "heads": 32,
    "kv_heads": 4,
    "head_dim": 128,
    "shared_inter": 0,
}
SHAPE_KEYS = tuple(QWEN3_30B_A3B)


@dataclass(frozen=True)
class Preset:
    """The real model whose layer shapes an --arch writes (from its config.json)."""

    model: str
    tag: str
    shapes: dict[str, int]
    rope_theta: float
    norm_topk_prob: bool
    # Further ModelConfig fields (latent ranks, routing, dense layers), plus ``dense_inter`` (the dense
    # MLP width) and ``rope_part`` (RoPE on head_dim / rope_part dims).
    extra: tuple[tuple[str, object], ...] = ()


PRESETS = {
    "qwen3moe": Preset("Qwen3-30B-A3B", "30b-a3b", QWEN3_30B_A3B, 1_000_000.0, True),
    # allenai/OLMoE-1B-7B-0125: 16 layers, hidden 2048, 64 experts of 1024, top-8, 16 heads x 128.
    "olmoe": Preset("OLMoE-1B-7B", "1b-7b", {"hidden": 2048, "experts": 64, "top_k": 8, "expert_inter": 1024,
                                              "heads": 16, "kv_heads": 16, "head_dim": 128, "shared_inter": 0},
                    10_000.0, False),
    # Qwen/Qwen1.5-MoE-A2.7B: 24 layers, hidden 2048, 60 experts of 1408, top-4, a shared expert of 5632.
    "qwen2moe": Preset("Qwen1.5-MoE-A2.7B", "a2.7b", {"hidden": 2048, "experts": 60, "top_k": 4,
                                                       "expert_inter": 1408, "heads": 16, "kv_heads": 16,
                                                       "head_dim": 128, "shared_inter": 5632},
                       1_000_000.0, False),
    # mistralai/Mixtral-8x7B-v0.1 (GGUF arch llama): 32 layers, hidden 4096, 8 experts of 14336, top-2.
    "llama": Preset("Mixtral-8x7B", "8x7b", {"hidden": 4096, "experts": 8, "top_k": 2, "expert_inter": 14336,
                                             "heads": 32, "kv_heads": 8, "head_dim": 128, "shared_inter": 0},
                    1_000_000.0, True),
    # zai-org/GLM-4.5-Air: 46 layers (the first dense, MLP 10944), hidden 4096, 128 experts of 1408,
    # top-8, one shared expert, 96 heads / 8 KV heads x 128, RoPE on half a head.
    "glm4moe": Preset("GLM-4.5-Air", "air", {"hidden": 4096, "experts": 128, "top_k": 8, "expert_inter": 1408,
                                             "heads": 96, "kv_heads": 8, "head_dim": 128, "shared_inter": 1408},
                      1_000_000.0, True, (("first_dense_layers", 1), ("dense_inter", 10944), ("rope_part", 2))),
    # deepseek-ai/DeepSeek-V3 (and R1; Kimi-K2 has 384 experts): 61 layers (the first 3 dense, MLP 18432),
    # hidden 7168, 256 experts of 2048, top-8 in 4 of 8 groups, one shared expert, 128 heads of 128 + 64
    # RoPE dims through a 1536 q latent and a 512 kv latent.
    "deepseek2": Preset("DeepSeek-V3", "v3", {"hidden": 7168, "experts": 256, "top_k": 8, "expert_inter": 2048,
                                              "heads": 128, "kv_heads": 128, "head_dim": 192, "shared_inter": 2048},
                        10_000.0, True, (("first_dense_layers", 3), ("dense_inter", 18432), ("rope_part", 3),
                                         ("q_lora_rank", 1536), ("kv_lora_rank", 512), ("v_head_dim", 128),
                                         ("router", "sigmoid"), ("router_bias", True), ("router_groups", 8),
                                         ("router_topk_groups", 4), ("routed_scale", 2.5))),
    # openai/gpt-oss-20b (gpt-oss-120b: 36 layers, 128 experts): 24 layers, hidden 2880, 32 experts of
    # 2880, top-4, 64 heads / 8 KV heads x 64, every other layer a 128-position window, YaRN x32 over
    # 4096 (released as MXFP4 experts: --quant MXFP4_MOE).
    "gpt-oss": Preset("gpt-oss-20b", "20b", {"hidden": 2880, "experts": 32, "top_k": 4, "expert_inter": 2880,
                                             "heads": 64, "kv_heads": 8, "head_dim": 64, "shared_inter": 0},
                      150_000.0, True, (("sliding_window", 128), ("swiglu_limit", 7.0), ("rope_scaling", "yarn"),
                                        ("rope_factor", 32.0), ("rope_original_context", 4096),
                                        ("rope_yarn_truncate", False))),
}
RMS_NORM_EPS = 1e-6
CONTEXT_LENGTH = 4096
# Standard deviation of the router logits on a normalised hidden state: softmax over 128 experts
# of N(0, 2^2) logits puts ~60% of the mass on the top 8, far from flat and far from one-hot.
ROUTER_LOGIT_STD = 2.0


class UsageError(Exception):
    """A bad flag value: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_tokenizer() -> GGUFTokenizerData:
    """The 256 byte symbols, one merge, then ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``.

    The single merge (two spaces -> one token) is there because GGUF cannot store an empty
    array: without ``tokenizer.ggml.merges`` neither ktlab nor llama.cpp load a BPE vocabulary.
    """
    symbols = bytes_to_unicode()
    space = symbols[ord(" ")]
    tokens = [*symbols.values(), space + space, *SPECIAL_TOKENS]
    types = [TOKEN_TYPE_NORMAL] * 257 + [TOKEN_TYPE_CONTROL] * len(SPECIAL_TOKENS)
    return GGUFTokenizerData(
        tokens=tokens, merges=[f"{space} {space}"], token_types=types, pre="qwen2",
        eos_id=tokens.index("<|im_end|>"), bos_id=tokens.index("<|endoftext|>"), chat_template=CHATML_TEMPLATE,
    )


def tokenizer_from_gguf(path: Path) -> GGUFTokenizerData:
    """The tokenizer stored in a GGUF file (tokens, merges, types, pre, eos/bos, chat template)."""
    from ktlab.model.gguf import GGUFFile

    f = GGUFFile(path)
    tokens = [str(t) for t in f.require("tokenizer.ggml.tokens")]
    merges = [str(m) for m in f.get("tokenizer.ggml.merges")] if f.has("tokenizer.ggml.merges") else []
    if f.has("tokenizer.ggml.token_type"):
        types = [int(t) for t in f.get("tokenizer.ggml.token_type")]
    else:
        types = [TOKEN_TYPE_NORMAL] * len(tokens)
    bos = int(f.get("tokenizer.ggml.bos_token_id")) if f.has("tokenizer.ggml.bos_token_id") else None
    return GGUFTokenizerData(
        tokens=tokens, merges=merges, token_types=types,
        pre=str(f.get("tokenizer.ggml.pre")) if f.has("tokenizer.ggml.pre") else "qwen2",
        eos_id=int(f.require("tokenizer.ggml.eos_token_id")), bos_id=bos,
        chat_template=str(f.get("tokenizer.chat_template")) if f.has("tokenizer.chat_template") else None,
    )


def load_tokenizer(source: str) -> tuple[GGUFTokenizerData, str]:
    """(tokenizer, description) for ``auto`` (bundled tiny model if present), ``bytes`` or a GGUF path."""
    if source == "bytes" or (source == "auto" and not BUNDLED_TINY.is_file()):
        return byte_level_tokenizer(), "byte-level fallback"
    path = BUNDLED_TINY if source == "auto" else Path(source)
    if not path.is_file():
        raise UsageError(f"--tokenizer: no such GGUF file {path}")
    return tokenizer_from_gguf(path), str(path)


def pad_vocab(tok: GGUFTokenizerData, vocab: int | None) -> GGUFTokenizerData:
    """``tok`` padded with user-defined ``<|extra_N|>`` tokens up to ``vocab`` entries."""
    n = len(tok.tokens)
    if vocab is None or vocab == n:
        return tok
    if vocab < n:
        raise UsageError(f"--vocab {vocab} is smaller than the tokenizer's {n} tokens")
    extra = [f"<|extra_{i}|>" for i in range(vocab - n)]
    return GGUFTokenizerData(
        tokens=tok.tokens + extra, merges=tok.merges,
        token_types=list(tok.token_types) + [TOKEN_TYPE_USER_DEFINED] * len(extra), pre=tok.pre,
        eos_id=tok.eos_id, bos_id=tok.bos_id, padding_id=tok.padding_id, chat_template=tok.chat_template,
    )


# ----------------------------------------------------------------------------------------- weights


def synthetic_config(vocab_size: int, layers: int = 4, arch: str = "qwen3moe", **shapes: int) -> ModelConfig:
    """The ModelConfig of a synthetic ``arch`` model: its preset's shapes unless ``shapes`` (keys of
    SHAPE_KEYS) override them, the family's features (``FEATURES`` of its module)."""
    preset = PRESETS[arch]
    if shapes.get("shared_inter") and not preset.shapes["shared_inter"]:
        raise ValueError(f"--shared-inter: {arch} has no shared expert")
    d = {**preset.shapes, **{k: v for k, v in shapes.items() if v is not None}}
    extra = dict(preset.extra)
    dense = min(int(extra.pop("first_dense_layers", 0)), layers - 1)
    rope_part = int(extra.pop("rope_part", 1))
    rope_dim = d["head_dim"] // rope_part // 2 * 2 if rope_part > 1 else 0  # even
    dense_inter = int(extra.pop("dense_inter", 3 * d["hidden"]))
    groups = int(extra.get("router_groups", 1))
    if d["experts"] % groups or d["experts"] // groups < 2:
        extra.update(router_groups=1, router_topk_groups=1)  # --experts too few for the preset's groups
    if "v_head_dim" in extra:  # latent attention: value heads as wide as the keys' non-RoPE part
        extra["v_head_dim"] = d["head_dim"] - rope_dim
    if d["hidden"] != preset.shapes["hidden"]:  # --hidden: the dense MLP keeps its ratio, whole super-blocks
        dense_inter = -(-dense_inter * d["hidden"] // preset.shapes["hidden"] // 256) * 256
    return ModelConfig(
        arch=arch, vocab_size=vocab_size, hidden_size=d["hidden"], num_layers=layers, num_heads=d["heads"],
        num_kv_heads=d["kv_heads"], head_dim=d["head_dim"], num_experts=d["experts"], num_experts_per_tok=d["top_k"],
        moe_intermediate_size=d["expert_inter"], intermediate_size=dense_inter,
        rms_norm_eps=RMS_NORM_EPS, rope_theta=preset.rope_theta, context_length=CONTEXT_LENGTH,
        norm_topk_prob=preset.norm_topk_prob, tie_word_embeddings=False, shared_expert_size=d["shared_inter"],
        first_dense_layers=dense, rope_dim=rope_dim,
        **{**architecture(arch).FEATURES, **extra},
    )


def _init(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[float, float]:
    """(mean, std) of the random values of tensor ``name``."""
    if name.endswith(".bias"):  # q/k/v/o biases, the routers' biases, gpt-oss's expert biases
        return 0.0, 0.1
    if name.endswith("attn_sinks.weight"):  # gpt-oss's sink logits, about as large as the scores
        return 0.0, 1.0
    if name.endswith("ffn_gate_inp_shexp.weight"):  # the shared expert's gate vector
        return 0.0, 1.0 / np.sqrt(shape[0])
    if len(shape) == 1:  # RMSNorm weights
        return 1.0, 0.1
    if name == "token_embd.weight":
        return 0.0, 1.0  # the residual stream starts at unit scale
    if name.endswith("ffn_gate_inp.weight"):
        return 0.0, ROUTER_LOGIT_STD / np.sqrt(cfg.hidden_size)
    return 0.0, 1.0 / np.sqrt(shape[-1])  # fan_in = row length


def _producer(shape: tuple[int, ...], mean: float, std: float, seed: int, index: int):
    """A callable making the float32 values in place (no float64 or full-size temporaries)."""

    def produce() -> np.ndarray:
        rng = np.random.default_rng([seed, index])
        out = np.empty(shape, dtype=np.float32)
        rng.standard_normal(out=out.reshape(-1), dtype=np.float32)
        out *= np.float32(std)
        out += np.float32(mean)
        return out

    return produce


def synthetic_specs(cfg: ModelConfig, qtype: str = "Q8_0", seed: int = 0) -> list[TensorSpec]:
    """Every tensor of ``cfg`` with its storage type and a lazy, seeded producer (nothing generated).

    ``qtype`` is one type for all matrices or a llama.cpp mix (Q4_K_M, Q5_K_M): see QUANT_CHOICES.
    """
    qtype = check_quant(qtype)
    specs = []
    for index, (name, shape) in enumerate(architecture(cfg.arch).expected_tensor_shapes(cfg).items()):
        mean, std = _init(name, shape, cfg)
        stored = tensor_qtype(qtype, name, shape, cfg)
        specs.append(TensorSpec(name, shape, stored, _producer(shape, mean, std, seed, index)))
    return specs


def spec_bytes(spec: TensorSpec) -> int:
    """Bytes of ``spec``'s data in the file."""
    block, size = gguf.GGML_QUANT_SIZES[spec.qtype]
    return int(np.prod(spec.shape)) // block * size


# --------------------------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class Plan:
    """What ``main`` will write: config, tensor specs, tokenizer, path and data bytes."""

    cfg: ModelConfig
    specs: list[TensorSpec]
    tokenizer: GGUFTokenizerData
    tokenizer_source: str
    path: Path
    quant: str
    data_bytes: int


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + error)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _quant(text: str) -> str:
    try:
        return check_quant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    d = QWEN3_30B_A3B
    p = _Parser(
        prog=PROG,
        description="Write a random-weight MoE GGUF with a real model's layer shapes and fewer layers: by "
        f"default qwen3moe at Qwen3-30B-A3B's (hidden {d['hidden']}, {d['experts']} experts of width "
        f"{d['expert_inter']}, top-{d['top_k']}, {d['heads']} heads / {d['kv_heads']} KV heads x {d['head_dim']}, "
        f"rms eps 1e-6, rope theta 1e6, context {CONTEXT_LENGTH}). Weights are seeded "
        "random normals with std 1/sqrt(fan_in); the file streams to disk one tensor at a time. "
        "Loads with ktlab (ktlab info PATH, ktlab generate --model PATH).",
        epilog="Shape flags exist for tests and experiments; without them the layer shapes are exactly "
        "the preset's. Output goes to models/synthetic/ (git-ignored) unless -o is given.",
    )
    p.add_argument("--arch", choices=sorted(PRESETS), default="qwen3moe",
                   help="family and the real model whose shapes to use: "
                   + ", ".join(f"{a} = {pr.model}" for a, pr in PRESETS.items()) + " (default qwen3moe)")
    p.add_argument("--layers", type=_positive, default=4,
                   help="number of decoder layers (default 4; the real model has 48)")
    p.add_argument("--quant", type=_quant, default="Q8_0", metavar="TYPE",
                   help=f"storage type of the matrices: one type for all, {', '.join(WRITABLE_QTYPES)} "
                   f"(default Q8_0), or a llama.cpp mix, {' or '.join(QUANT_MIXES)}: Q4_K (Q5_K) matrices "
                   "and token embeddings, Q6_K output.weight, and Q6_K attn_v and ffn_down_exps on the "
                   "layers where llama.cpp's use_more_bits holds (the first and last eighth and every "
                   "third in between: about half the layers); with exactly 8 experts also Q8_0 attn_k/attn_v "
                   "and Q5_K attn_output, as llama-quantize does. Norms and routers stay F32, rows that do "
                   "not fit a block fall back to Q8_0/F16")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="PATH",
                   help="output file (default models/synthetic/qwen3moe-30b-a3b-{layers}L-{quant}.gguf)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default 0); same seed, same file")
    p.add_argument("--tokenizer", default="auto", metavar="SOURCE",
                   help="'auto' (default): the bundled tiny model's tokenizer if models/tiny-qwen3moe-q8_0.gguf "
                   "exists, else 'bytes'; 'bytes': the 256 byte-level symbols, one merge (two spaces) and "
                   "<|endoftext|>, <|im_start|>, <|im_end|>; "
                   "or a path to a GGUF file whose tokenizer to copy")
    p.add_argument("--vocab", type=_positive, default=None,
                   help="vocabulary size; pads the tokenizer with <|extra_N|> tokens (default: the tokenizer's size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    shapes = p.add_argument_group("shape overrides (default: the --arch preset's; Qwen3-30B-A3B's shown)")
    for flag, key, what in (
        ("--hidden", "hidden", "hidden size"),
        ("--experts", "experts", "routed experts per layer"),
        ("--top-k", "top_k", "experts used per token"),
        ("--expert-inter", "expert_inter", "hidden width of one expert"),
        ("--heads", "heads", "attention heads"),
        ("--kv-heads", "kv_heads", "key/value heads (GQA)"),
        ("--head-dim", "head_dim", "dimension of one head"),
        ("--shared-inter", "shared_inter", "hidden width of the shared expert (families that have one)"),
    ):
        shapes.add_argument(flag, type=_positive, default=None, metavar="N", help=f"{what} (default {d[key]})")
    return p


def default_output(args: argparse.Namespace) -> Path:
    """models/synthetic/{arch}-{preset tag}-{layers}L-{quant}.gguf (a shape-tagged name when overridden)."""
    preset = PRESETS[args.arch]
    shapes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.shapes.items()}
    overridden = [k for k, v in preset.shapes.items() if shapes[k] != v]
    if args.vocab is not None:
        overridden.append("vocab")
    if not overridden:
        return OUTPUT_DIR / f"{args.arch}-{preset.tag}-{args.layers}L-{args.quant}.gguf"
    tag = f"h{shapes['hidden']}-e{shapes['experts']}k{shapes['top_k']}-i{shapes['expert_inter']}"
    return OUTPUT_DIR / f"{args.arch}-synthetic-{tag}-{args.layers}L-{args.quant}.gguf"


def plan(argv: Sequence[str] | None = None) -> Plan:
    """Parse ``argv`` and build everything but the file (no weights are generated)."""
    return plan_from_args(build_parser().parse_args(argv))


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The Plan for parsed arguments; UsageError for inconsistent values."""
    tok, source = load_tokenizer(args.tokenizer)
    tok = pad_vocab(tok, args.vocab)
    try:
        cfg = synthetic_config(len(tok.tokens), layers=args.layers, arch=args.arch,
                               **{k: getattr(args, k) for k in SHAPE_KEYS})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    specs = synthetic_specs(cfg, args.quant, args.seed)
    path = args.output if args.output is not None else default_output(args)
    return Plan(cfg, specs, tok, source, path, args.quant, sum(spec_bytes(s) for s in specs))


def write(p: Plan, progress: bool = True) -> Path:
    """Write the planned file and return its path (a partly written file is removed)."""
    c = p.cfg
    name = (f"synthetic {c.arch} {c.num_layers}L h{c.hidden_size} {c.num_experts}x{c.moe_intermediate_size} "
            f"top-{c.num_experts_per_tok} {p.quant} (random weights)")
    done = False
    try:
        write_gguf(p.path, c, p.specs, p.tokenizer, name=name, progress=progress, file_type=quant_file_type(p.quant))
        done = True
    finally:
        if not done:
            p.path.unlink(missing_ok=True)
    return p.path


def _check_disk(p: Plan) -> None:
    p.path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(p.path.parent).free
    if p.data_bytes > free:
        raise UsageError(f"{p.path.parent}: {p.data_bytes / 2**30:.2f} GiB needed, only {free / 2**30:.2f} GiB free")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 on success, 2 on a bad flag value or an unwritable output."""
    args = build_parser().parse_args(argv)
    try:
        p = plan_from_args(args)
        _check_disk(p)
        start = time.perf_counter()
        path = write(p, progress=not args.no_progress)
    except (UsageError, KtlabError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    size, layers = path.stat().st_size, p.cfg.num_layers
    print(f"wrote {path}: {size / 2**30:.2f} GiB ({size:,} bytes), {layers} layer{'s' * (layers != 1)}, "
          f"{p.quant}, vocab {p.cfg.vocab_size} ({p.tokenizer_source}), {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
