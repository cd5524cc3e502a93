"""FCFS continuous-batching scheduler (torch-free): which tokens of which sequences run next.

Each step: every running sequence that is decoding gets one token; then sequences still in
prefill get chunks of their prompt, oldest first, until ``max_tokens_in_batch`` is spent;
then waiting sequences are admitted in arrival order while the batch has room
(``max_batch_size``), tokens are left and the KV pool has pages for their whole length. The
head of the queue is never overtaken: when it does not fit, admission waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from ktlab.serve.kv import BlockManager


class Status(Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress. ``num_computed``: positions whose K/V are in the pages."""

    seq_id: int
    prompt_ids: list[int]
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    page_table: tuple[int, ...] = ()

    @property
    def all_ids(self) -> list[int]:
        """Prompt and generated tokens."""
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        """Prompt + generated tokens so far."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def reserved_tokens(self) -> int:
        """Positions reserved in the KV pool: the prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def in_prefill(self) -> bool:
        """True while prompt tokens remain to be computed."""
        return self.num_computed < len(self.prompt_ids)

    def next_tokens(self, n: int) -> list[int]:
        """The next ``n`` tokens to feed (prompt chunk, or the last sampled token)."""
        return self.all_ids[self.num_computed : self.num_computed + n]


@dataclass
class ScheduledSeq:
    """One sequence's part of a step: ``n_tokens`` tokens from position ``seq.num_computed``."""

    seq: Sequence
    n_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence's known tokens (a token is sampled)."""
        return self.seq.num_computed + self.n_tokens == self.seq.length


class Scheduler:
    """FCFS admission and per-step token budget over a ``BlockManager``."""

    def __init__(self, blocks: BlockManager, max_batch_size: int, max_tokens_in_batch: int,
                 on_admit: Callable[[Sequence], None] | None = None) -> None:
        self.blocks = blocks
        self.on_admit = on_admit  # called once pages are allocated (may set num_computed: a cached prefix)
        self.max_batch_size, self.max_tokens_in_batch = max_batch_size, max_tokens_in_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (it must fit the pool when the pool is empty)."""
        if seq.reserved_tokens > self.blocks.capacity_tokens:
            raise ValueError(
                f"request needs {seq.reserved_tokens} KV positions, the pool holds {self.blocks.capacity_tokens}"
            )
        self.waiting.append(seq)

    def is_idle(self) -> bool:
        """Nothing waiting or running."""
        return not self.waiting and not self.running

    def schedule(self) -> list[ScheduledSeq]:
        """The next step's work (empty when there is none or nothing fits)."""
        budget = self.max_tokens_in_batch
        batch: list[ScheduledSeq] = []
        for seq in self.running:  # decode first: one token each
            if not seq.in_prefill and budget > 0:
                batch.append(ScheduledSeq(seq, 1))
                budget -= 1
        for seq in self.running:  # then unfinished prefills, oldest first
            if seq.in_prefill and budget > 0:
                n = min(len(seq.prompt_ids) - seq.num_computed, budget)
                batch.append(ScheduledSeq(seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq.reserved_tokens):
                break  # FCFS: the head waits for pages, nobody overtakes it
            self.waiting.popleft()
            seq.page_table = self.blocks.allocate(seq.seq_id, seq.reserved_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            if self.on_admit is not None:
                self.on_admit(seq)
            n = min(len(seq.prompt_ids) - seq.num_computed, budget)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished, cancelled or failed) and free its pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = Status.FINISHED
