"""The model with its experts in the C++ engine vs the torch reference path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import nmse

from ktlab.kernels import available_isas
from ktlab.model import load_model
from ktlab.runtime.generate import SamplingConfig, generate

NMSE_CPU_VS_TORCH_Q8_0 = 1e-3  # int8 activations in the kernels vs float activations in torch
# K-quant matrices take int8 activations with one scale per 256 values (Q8_0's: per 32), and in a
# Q4_K_M file every dense projection does too: a coarser rounding of each activation row.
NMSE_CPU_VS_TORCH_KQUANT = 3e-3
NMSE_CPU_VS_TORCH = {"gguf_q8": NMSE_CPU_VS_TORCH_Q8_0, "gguf_q4km": NMSE_CPU_VS_TORCH_KQUANT}
PROMPT = [5, 17, 42, 99, 7, 3, 250, 61, 13]


def logits(model, ids):
    return model.forward(torch.tensor(ids), model.new_cache(len(ids))).numpy()


@pytest.mark.parametrize("file", ["gguf_q8", "gguf_q4km"])
def test_cpu_engine_matches_torch_experts(file, request):
    """Q8_0, and llama.cpp's Q4_K_M mix (Q4_K, Q5_K, Q6_K and Q8_0 matrices): the C++ kernels on
    the stored blocks (experts and dense projections) against torch on the dequantized weights."""
    path = request.getfixturevalue(file)
    cpu, _ = load_model(path)
    ref, _ = load_model(path, experts="torch")
    if file == "gguf_q4km":  # every dense matrix is on the block kernels, so the whole decode step is one call
        assert all(lin.qmat is not None for lin in (cpu.lm_head, cpu.layers[0].attn.wq, cpu.layers[0].attn.wo))
        assert len(cpu.layers[0].attn.qkv.mats) == 3  # q Q4_K, k and v Q8_0: three matrices
        assert cpu._whole_decode_model() is not None
    assert nmse(logits(cpu, PROMPT), logits(ref, PROMPT)) < NMSE_CPU_VS_TORCH[file]


def test_hf_directory_runs_on_cpu_engine(hf_dir, gguf_f32):
    """Float weights are quantized once (BF16) for the engine; close to the F32 reference."""
    cpu, _ = load_model(hf_dir)
    ref, _ = load_model(gguf_f32, experts="torch")
    assert nmse(logits(cpu, PROMPT), logits(ref, PROMPT)) < NMSE_CPU_VS_TORCH_Q8_0


def decode_trajectory(model, tokens: list[int]) -> np.ndarray:
    """Logits [len(tokens), V] of decoding ``tokens`` one by one after PROMPT (teacher-forced)."""
    cache = model.new_cache(len(PROMPT) + len(tokens))
    out = [model.forward(torch.tensor(PROMPT), cache, last_only=True).numpy()[-1]]
    for t in tokens[:-1]:
        out.append(model.forward(torch.tensor([t]), cache).numpy()[-1])
    return np.stack(out)


@pytest.mark.parametrize("file", ["gguf_q8", "gguf_q4km"])
@pytest.mark.parametrize("isa", [i for i in available_isas() if i != "scalar"])
def test_scalar_path_matches_simd_path_while_decoding(file, isa, request):
    """The SIMD kernels compute what their scalar twins compute, up to float summation order.

    Along the scalar path's greedy output (teacher-forced, so both see the same tokens) most
    steps agree to rounding. A router near-tie may pick another expert in one of the two
    (an MoE trait: a 1e-7 nudge of a top-k boundary); that step then differs at the level of
    the int8-activation error, and only a token chosen by a hair may differ. (The K-quant kernels
    give every path the same bits; the Q8_0, attention and router kernels sum in other orders.)
    """
    path = request.getfixturevalue(file)
    tokens = generate(load_model(path, isa="scalar")[0], PROMPT, SamplingConfig(max_tokens=32))[0]
    scalar = decode_trajectory(load_model(path, isa="scalar")[0], tokens)
    fast = decode_trajectory(load_model(path, isa=isa)[0], tokens)
    errors = np.array([nmse(f, s) for f, s in zip(fast, scalar, strict=True)])
    assert errors.max() < NMSE_CPU_VS_TORCH[file]
    assert np.median(errors) < 1e-10
    top2 = np.sort(scalar, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert clear.sum() >= len(tokens) // 2
    assert (fast.argmax(1) == scalar.argmax(1))[clear].all()


def test_unknown_expert_engine_is_rejected(gguf_q8):
    with pytest.raises(ValueError, match="experts must be one of"):
        load_model(gguf_q8, experts="gpu-magic")
