"""The model with its experts in the C++ engine vs the torch reference path."""

from __future__ import annotations

import pytest
import torch
from conftest import nmse

from ktlab.kernels import available_isas
from ktlab.model import load_model
from ktlab.runtime.generate import SamplingConfig, generate

NMSE_CPU_VS_TORCH_Q8_0 = 1e-3  # int8 activations in the kernels vs float activations in torch
PROMPT = [5, 17, 42, 99, 7, 3, 250, 61, 13]


def logits(model, ids):
    return model.forward(torch.tensor(ids), model.new_cache(len(ids))).numpy()


def test_cpu_engine_matches_torch_experts(gguf_q8):
    cpu, _ = load_model(gguf_q8)
    ref, _ = load_model(gguf_q8, experts="torch")
    assert nmse(logits(cpu, PROMPT), logits(ref, PROMPT)) < NMSE_CPU_VS_TORCH_Q8_0


def test_hf_directory_runs_on_cpu_engine(hf_dir, gguf_f32):
    """Float weights are quantized once (BF16) for the engine; close to the F32 reference."""
    cpu, _ = load_model(hf_dir)
    ref, _ = load_model(gguf_f32, experts="torch")
    assert nmse(logits(cpu, PROMPT), logits(ref, PROMPT)) < NMSE_CPU_VS_TORCH_Q8_0


@pytest.mark.parametrize("isa", [i for i in available_isas() if i != "scalar"])
def test_scalar_path_gives_identical_greedy_tokens(gguf_q8, isa):
    sampling = SamplingConfig(max_tokens=32)
    scalar, _ = load_model(gguf_q8, isa="scalar")
    fast, _ = load_model(gguf_q8, isa=isa)
    assert generate(scalar, PROMPT, sampling)[0] == generate(fast, PROMPT, sampling)[0]


def test_unknown_expert_engine_is_rejected(gguf_q8):
    with pytest.raises(ValueError, match="experts must be one of"):
        load_model(gguf_q8, experts="gpu-magic")
