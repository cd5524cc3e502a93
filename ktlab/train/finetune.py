"""LoRA fine-tuning of an MoE whose experts stay quantized on the CPU (``ktlab finetune``).

The dense part runs in torch (float32, ``MoEDecoder(device="cpu")``) with LoRA adapters on the
attention projections; each MoE layer's frozen experts run forward in the C++ engine and backward
through ``ktlab.train.experts`` (their stored blocks, a row at a time). AdamW on the adapters only;
one example a step; held-out loss before and after; checkpoints that resume.
"""

from __future__ import annotations

import json
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ktlab.config import _ints_at_least, _require
from ktlab.train.data import Example, load_examples
from ktlab.train.experts import FrozenExperts, LoraExperts
from ktlab.train.lora import TARGETS, attach_expert_lora, attach_lora, load_adapter, lora_parameters, save_adapter

STATE_FILE = "trainer_state.pt"
#: The bundled tutorial data (40 chat records about Python, CC0; ktlab/data/finetune/README.md).
BUNDLED_DATA = Path(__file__).resolve().parent.parent / "data" / "finetune" / "python_qa.jsonl"


@dataclass(frozen=True)
class FinetuneConfig:
    """What ``finetune`` runs: data, adapter size, steps and optimizer, checkpoints."""

    data: str
    lora_rank: int = 8
    lora_alpha: float = 16.0
    steps: int = 100
    lr: float = 2e-3
    max_len: int = 256
    heldout: float = 0.1
    seed: int = 0
    save_every: int = 0
    targets: tuple[str, ...] = tuple(TARGETS)
    expert_lora: bool = False  # adapters on every expert's gate, up and down too

    def __post_init__(self) -> None:
        _ints_at_least(self, ("lora_rank", "steps", "max_len"), 1)
        _ints_at_least(self, ("save_every",), 0)
        _require(self.lr > 0, f"FinetuneConfig.lr must be > 0, got {self.lr}")
        _require(0 <= self.heldout < 1, f"FinetuneConfig.heldout is a share in [0, 1), got {self.heldout}")
        _require(self.lora_alpha > 0, f"FinetuneConfig.lora_alpha must be > 0, got {self.lora_alpha}")


@dataclass
class FinetuneResult:
    """What a run did: losses per step, held-out loss before and after, speed and memory."""

    steps: int
    losses: list[float] = field(default_factory=list)
    heldout_before: float | None = None
    heldout_after: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    expert_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    output: str | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tok_s": self.tok_s}


class Trainer:
    """A model prepared for LoRA fine-tuning (dense part in torch, experts frozen on the C++ engine)."""

    def __init__(self, model_path: str, config: FinetuneConfig, adapter: str | Path | None = None) -> None:
        from ktlab.model import load_model, open_weights

        self.config, self.model_path = config, str(model_path)
        self.model, self.tokenizer = load_model(model_path, device="cpu")
        weights = open_weights(model_path)
        if not hasattr(weights, "raw"):
            raise ValueError(f"{model_path}: fine-tuning reads the experts' stored blocks: give a GGUF file")
        if adapter:
            self.adapters = load_adapter(self.model, adapter, weights)
        else:
            self.adapters = dict(attach_lora(self.model, config.lora_rank, config.lora_alpha, config.targets,
                                             seed=config.seed))
            if config.expert_lora:
                self.adapters.update(attach_expert_lora(self.model, weights, config.lora_rank, config.lora_alpha,
                                                        seed=config.seed))
        self.frozen = []  # each MoE layer's frozen experts, under its expert adapters where it has them
        for moe, index in zip(self.model.moe_blocks(), self.model.cfg.moe_layer_ids, strict=True):
            if moe.autograd_experts is None:
                moe.autograd_experts = FrozenExperts.of_layer(moe, weights, index)
            lora = isinstance(moe.autograd_experts, LoraExperts)
            self.frozen.append(moe.autograd_experts.frozen if lora else moe.autograd_experts)
        self.params = lora_parameters(self.adapters)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        self.step = 0

    @property
    def expert_seconds(self) -> float:
        """Seconds the frozen experts took so far, forward and backward."""
        return sum(f.seconds for f in self.frozen)

    def loss(self, example: Example) -> torch.Tensor:
        """Mean cross-entropy of the example's learned tokens."""
        tokens = torch.tensor(example.tokens)
        logits = self.model.forward_train(tokens[:-1])
        learn = torch.tensor(example.learn[1:])
        return F.cross_entropy(logits[learn], tokens[1:][learn])

    def heldout_loss(self, examples: list[Example]) -> float | None:
        if not examples:
            return None
        with torch.no_grad():
            return float(sum(self.loss(e) for e in examples) / len(examples))

    def train_step(self, example: Example) -> float:
        self.optimizer.zero_grad()
        loss = self.loss(example)
        loss.backward()  # the experts' backward runs in the C++ transposed products
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def save(self, out_dir: str | Path) -> Path:
        """The adapter (PEFT format) and the trainer state (optimizer, step) in ``out_dir``."""
        out = save_adapter(self.adapters, out_dir, self.model_path, self.config.targets)
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict()}, out / STATE_FILE)
        return out

    def resume(self, checkpoint: str | Path) -> None:
        state = torch.load(Path(checkpoint) / STATE_FILE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])


def finetune(model_path: str, config: FinetuneConfig, output: str | Path | None = None,
             resume: str | Path | None = None, progress: bool = True,
             on_step: Callable[[int, float], None] | None = None) -> FinetuneResult:
    """Fine-tune ``model_path``'s adapters on ``config.data``; save them to ``output`` (and
    checkpoints under it every ``config.save_every`` steps); ``resume`` a checkpoint directory."""
    trainer = Trainer(model_path, config, adapter=resume)
    if resume:
        trainer.resume(resume)
    examples = load_examples(config.data, trainer.tokenizer, config.max_len)
    random.Random(config.seed).shuffle(examples)
    n_held = int(len(examples) * config.heldout)
    heldout, train = examples[:n_held], examples[n_held:] or examples
    result = FinetuneResult(steps=config.steps, heldout_before=trainer.heldout_loss(heldout))
    expert_start = trainer.expert_seconds
    bar = tqdm(total=config.steps, initial=trainer.step, desc="finetune", unit="step", disable=not progress)
    t0 = time.perf_counter()
    while trainer.step < config.steps:
        example = train[trainer.step % len(train)]
        loss = trainer.train_step(example)
        result.losses.append(loss)
        result.tokens += len(example.tokens) - 1
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{result.tokens / elapsed:.0f}")
        bar.update(1)
        if on_step is not None:
            on_step(trainer.step, loss)
        if output is not None and config.save_every and trainer.step % config.save_every == 0:
            trainer.save(Path(output) / f"checkpoint-{trainer.step}")
    bar.close()
    result.seconds = time.perf_counter() - t0
    result.expert_seconds = trainer.expert_seconds - expert_start
    result.heldout_after = trainer.heldout_loss(heldout)
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if output is not None:
        result.output = str(trainer.save(output))
        (Path(output) / "finetune.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result
