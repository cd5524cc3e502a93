"""LoRA fine-tuning with the experts quantized on the CPU (ktlab.train): the loss falls, the adapter is
PEFT's format (peft loads it onto the transformers model and gives our logits), checkpoints resume to
the same adapter, `ktlab generate --lora` applies it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import hf_logits, nmse, our_logits
from safetensors.torch import load_file

from ktlab.cli import main
from ktlab.model import load_model
from ktlab.train.data import load_examples
from ktlab.train.finetune import BUNDLED_DATA, FinetuneConfig, finetune
from ktlab.train.lora import load_adapter

PROMPT = [5, 17, 42, 99, 7, 64, 3, 150]
LOGITS_NMSE_Q8_0 = 1e-2  # our Q8_0 model + adapter vs transformers float + the same adapter (peft)
# The merged file vs the adapter applied: its projections re-quantized to Q8_0 (measured 1.4e-2: the
# random test model's near-tie routing amplifies the rounding).
LOGITS_NMSE_MERGED = 3e-2


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """Text records of token soup the test vocabulary spells (the random test model has no chat)."""
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    rng = np.random.default_rng(0)
    words = ["def", "main", "return", "print", "import", "value", "list", "class"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 24))}) + "\n" for _ in range(12)))
    return path


def test_cli_finetune_lowers_the_heldout_loss_and_generate_applies_the_adapter(tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(["finetune", "--steps", "24", "--output", str(out), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)["results"]
    assert summary["heldout_after"] < 0.95 * summary["heldout_before"]
    assert summary["tokens"] > 0 and summary["tok_s"] > 0 and 0 < summary["expert_seconds"] < summary["seconds"]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    args = ["generate", "--prompt", "How do I sort a list?", "--chat", "--max-tokens", "12"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--lora", str(out)]) == 0
    assert capsys.readouterr().out != plain


def test_chat_records_learn_only_the_assistant_turns():
    _, tokenizer = load_model("tiny")
    example = load_examples(BUNDLED_DATA, tokenizer, 256)[0]
    learned = [t for t, learn in zip(example.tokens, example.learn, strict=True) if learn]
    text = tokenizer.decode(learned)
    assert text.startswith("len(x) returns") and "What does" not in text


def test_bad_records_are_one_line_errors(tmp_path):
    _, tokenizer = load_model("tiny")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"messages": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        load_examples(path, tokenizer, 64)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not JSON"):
        load_examples(path, tokenizer, 64)


def test_peft_loads_the_adapter_onto_transformers_and_gives_our_logits(gguf_q8, hf_model, text_data, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    finetune(str(gguf_q8), FinetuneConfig(data=str(text_data), steps=6, lr=5e-3, heldout=0.0), output=out,
             progress=False)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert any(float(t.abs().max()) > 0 for name, t in tensors.items() if "lora_B" in name)  # it learned
    ours, _ = load_model(gguf_q8)
    base = our_logits(ours, PROMPT)
    load_adapter(ours, out)
    tuned = our_logits(ours, PROMPT)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(out)).eval()
    reference = hf_logits(peft_model, PROMPT)
    assert nmse(tuned, reference) < LOGITS_NMSE_Q8_0
    assert nmse(base, reference) > 10 * nmse(tuned, reference)  # the adapter is what closes the gap


def test_resumed_training_gives_the_uninterrupted_adapter(gguf_q8, text_data, tmp_path):
    config = FinetuneConfig(data=str(text_data), steps=4, save_every=2, heldout=0.0)
    finetune(str(gguf_q8), config, output=tmp_path / "straight", progress=False)
    finetune(str(gguf_q8), config, output=tmp_path / "resumed", resume=tmp_path / "straight" / "checkpoint-2",
             progress=False)
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_merged_gguf_gives_the_adapted_logits_in_ktlab_and_llama_cpp(gguf_q8, text_data, tmp_path):
    """The adapter merged into the GGUF (re-quantized Q8_0 projections): ktlab's logits of the merged
    file equal the base file with the adapter applied (named tolerance: the re-quantization), the file
    keeps its metadata and tensor list, and llama.cpp (where installed) loads it and agrees."""
    from ktlab.model import open_weights
    from ktlab.train.merge import merge_adapter

    out = tmp_path / "adapter"
    finetune(str(gguf_q8), FinetuneConfig(data=str(text_data), steps=6, lr=5e-3, heldout=0.0), output=out,
             progress=False)
    merged_path = merge_adapter(gguf_q8, out, tmp_path / "merged.gguf", progress=False)
    assert open_weights(merged_path).tensor_names == open_weights(gguf_q8).tensor_names
    assert open_weights(merged_path).config == open_weights(gguf_q8).config
    adapted, _ = load_model(gguf_q8)
    load_adapter(adapted, out)
    want = our_logits(adapted, PROMPT)
    merged = our_logits(load_model(merged_path)[0], PROMPT)
    base = our_logits(load_model(gguf_q8)[0], PROMPT)
    assert nmse(merged, want) < 0.1 * nmse(base, want)  # the merge carries the adapter
    assert nmse(merged, want) < LOGITS_NMSE_MERGED
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(merged_path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(PROMPT)
    assert nmse(np.asarray(llm.scores[: len(PROMPT)]), merged) < LOGITS_NMSE_Q8_0


def test_bench_finetune_runs_both_engines_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench-finetune", "--steps", "2", "--seq-len", "24", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [r["engine"] for r in rows] == ["ktlab", "transformers+peft"] and "tok/s vs ktlab" in table
    assert all(r["tok_s"] > 0 and r["peak_rss_mb"] > 100 for r in rows)
    # both train the same model on the same tokens from the same start: the same loss, nearly
    assert abs(rows[0]["final_loss"] - rows[1]["final_loss"]) < 0.05 * rows[1]["final_loss"]


def test_expert_lora_trains_saves_loads_and_merges(gguf_q8, text_data, tmp_path):
    """--expert-lora: adapters on every expert too; the loss on the training records falls, the saved
    adapter applied to a fresh model gives the trained model's logits, and the merged GGUF (experts
    re-quantized) carries it."""
    from ktlab.model import open_weights
    from ktlab.train.experts import ExpertLora
    from ktlab.train.merge import merge_adapter

    out = tmp_path / "adapter"
    result = finetune(str(gguf_q8), FinetuneConfig(data=str(text_data), steps=12, lr=5e-3, heldout=0.0,
                                                    expert_lora=True), output=out, progress=False)
    assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4])
    adapted, _ = load_model(gguf_q8)
    adapters = load_adapter(adapted, out, open_weights(gguf_q8))
    experts = [a for a in adapters.values() if isinstance(a, ExpertLora)]
    assert len(experts) == adapted.cfg.num_moe_layers and float(experts[0].B["down"].detach().abs().max()) > 0
    want = our_logits(adapted, PROMPT)
    base = our_logits(load_model(gguf_q8)[0], PROMPT)
    merged = our_logits(load_model(merge_adapter(gguf_q8, out, tmp_path / "m.gguf", progress=False))[0], PROMPT)
    assert nmse(merged, want) < 0.1 * nmse(base, want) and nmse(merged, want) < LOGITS_NMSE_MERGED
