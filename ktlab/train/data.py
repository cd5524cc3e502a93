"""Fine-tuning data: JSON lines of chat ``messages`` or plain ``text``, tokenized with a loss mask.

A chat record is rendered with the model's chat template; only its assistant turns are learned
(the prompt and the user's words are context). A text record is learned whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ktlab.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Example:
    """Token ids and, per id, whether predicting it is learned (the first id never is)."""

    tokens: list[int]
    learn: list[bool]

    @property
    def targets(self) -> int:
        """How many tokens are learned."""
        return sum(self.learn[1:])


def load_examples(path: str | Path, tokenizer: Tokenizer, max_len: int) -> list[Example]:
    """Every record of the JSON-lines file ``path``, cut to ``max_len`` tokens. Raises ValueError
    naming the file and line of a record that is not JSON, has neither ``messages`` nor ``text``,
    or learns nothing."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the data ({exc})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg})") from None
        example = _example(record, tokenizer, where)
        example = Example(example.tokens[:max_len], example.learn[:max_len])
        if example.targets == 0:
            raise ValueError(f"{where}: nothing to learn within {max_len} tokens")
        examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no records")
    return examples


def _example(record: object, tokenizer: Tokenizer, where: str) -> Example:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        tokens = tokenizer.encode(record["text"])
        return Example(tokens, [True] * len(tokens))
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in messages):
        raise ValueError(f"{where}: expected {{\"text\": str}} or {{\"messages\": [{{\"role\", \"content\"}}]}}")
    tokens = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
    learn = [False] * len(tokens)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.encode(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)))
        end = len(tokenizer.encode(tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)))
        for t in range(start, min(end, len(tokens))):
            learn[t] = True
    return Example(tokens, learn)
