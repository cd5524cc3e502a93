"""Continuous batching engine: one background thread owns the model; requests come through a queue.

Each step is ``schedule -> run -> postprocess``: the scheduler picks decode tokens and prefill
chunks of many sequences, the model runs them in ONE ``forward_batch`` call (dense projections
and the MoE over all tokens at once, so each expert's weights are read once per step; attention
per sequence over its own KV pages), then each sequence that reached the end of its known tokens
samples one token with its own sampler and is checked for stop conditions. Callers (the HTTP
server, tests, notebooks) never touch the model: they submit, read events, cancel.

With a ``prefix_cache`` (``ktlab.serve.prefix``), an admitted request first copies the K/V of its
longest cached run of whole prompt pages into its own pages and prefills only the rest (at least
its last prompt token); its prompt pages are stored once prefill ends, prompt + reply pages when
it finishes, and the pages it read stay pinned until then.

With ``EngineConfig.hybrid`` (or a model already made hybrid by ``attach_hybrid``), the model's
experts are placed by ``ktlab.runtime.hybrid.HybridPlacement`` in batched mode: each engine step
is one step of the expert cache and scheduler over all its tokens; ``metrics`` adds its expert
hit rate, copies and modeled speed (``hybrid_*``; modeled on a simulated accelerator's profile).
"""

from __future__ import annotations

import atexit
import itertools
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ktlab.config import check_positive_ints
from ktlab.model.layers import SeqSlice, torch_threads
from ktlab.runtime.generate import Sampler, SamplingConfig
from ktlab.runtime.hybrid import HybridConfig, HybridPlacement, attach_hybrid
from ktlab.serve.kv import BlockManager, KVConfig, pages_needed
from ktlab.serve.prefix import TieredPrefixCache
from ktlab.serve.roofline import DecodeRoofline, PairedReads, StepBytes, effective_bandwidth, versus_ideal
from ktlab.serve.scheduler import ScheduledSeq, Scheduler
from ktlab.serve.scheduler import Sequence as Seq


@dataclass(frozen=True)
class EngineConfig:
    """Batching limits and the KV pool of an ``Engine``; ``hybrid``: place the model's experts
    on CPU + GPU (None: as the model has them, all on the CPU unless it is already hybrid)."""

    max_batch_size: int = 16
    max_tokens_in_batch: int = 512
    kv: KVConfig = field(default_factory=KVConfig)
    # torch intra-op threads per step; None: one for decode-sized steps (tiny ops, where idle OpenMP
    # workers spinning steal the C++ expert pool's cores), all for steps with prefill chunks (their
    # attention is compute-bound: 2048-token TTFT on the 30B shape 8.9 -> 6.5 s on 2 cores).
    torch_threads: int | None = None
    hybrid: HybridConfig | None = None
    bandwidth_gbs: float | None = None  # the machine's read bandwidth: metrics add the decode steps' ideal
    track_bandwidth: bool = False  # re-measure it (a ~4 ms probe every 0.5 s) while decoding
    # After sampled decode steps, read their own weight bytes again and time that: the ideal measured
    # on the step (ktlab.serve.roofline.PairedReads; at most 5% of the time; all experts on the CPU)
    paired_reads: bool = False

    def __post_init__(self) -> None:
        check_positive_ints(self, ("max_batch_size", "max_tokens_in_batch"))
        if self.max_tokens_in_batch < self.max_batch_size:
            raise ValueError(
                f"EngineConfig.max_tokens_in_batch ({self.max_tokens_in_batch}) must be >= max_batch_size "
                f"({self.max_batch_size}): every running sequence needs one token per step"
            )
        check_positive_ints(self, ("torch_threads",), allow_none=True)
        if not isinstance(self.kv, KVConfig):
            raise ValueError(f"EngineConfig.kv must be a KVConfig, got {type(self.kv).__name__}")
        if self.bandwidth_gbs is not None and not self.bandwidth_gbs > 0:
            raise ValueError(f"EngineConfig.bandwidth_gbs must be > 0 GB/s or None, got {self.bandwidth_gbs!r}")
        if self.track_bandwidth and self.bandwidth_gbs is None:
            raise ValueError("EngineConfig.track_bandwidth needs a starting bandwidth_gbs")
        if self.hybrid is not None and not isinstance(self.hybrid, HybridConfig):
            raise ValueError(f"EngineConfig.hybrid must be a HybridConfig or None, got {type(self.hybrid).__name__}")


@dataclass
class RequestStats:
    """Token counts and times of one request (what ``usage`` reports)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not prefilled)
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        """Prompt tokens per second of prefill (admission to first token)."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Generated tokens per second after the first."""
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


@dataclass(frozen=True)
class Event:
    """What a request receives: ``delta`` (new tokens and text), then ``done`` or ``error``."""

    kind: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str | None = None
    stats: RequestStats | None = None
    error: str | None = None


class RequestHandle:
    """A submitted request: read its events, or wait for the whole result; cancel it."""

    def __init__(self, engine: Engine, request_id: int, sink: Callable[[Event], None] | None) -> None:
        self.engine, self.request_id = engine, request_id
        self._queue: queue.Queue[Event] | None = None if sink is not None else queue.Queue()
        self.sink: Callable[[Event], None] = sink if sink is not None else self._queue.put

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events until ``done``/``error`` (only without a custom sink); raises TimeoutError."""
        if self._queue is None:
            raise RuntimeError("this request was submitted with its own sink")
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id}: no event within {timeout} s") from None
            yield event
            if event.kind != "delta":
                return

    def result(self, timeout: float | None = None) -> tuple[list[int], str, Event]:
        """(generated token ids, text, final event); raises RuntimeError when the request failed."""
        ids: list[int] = []
        text = []
        for event in self.events(timeout):
            ids.extend(event.token_ids)
            text.append(event.text)
            if event.kind == "error":
                raise RuntimeError(event.error)
        return ids, "".join(text), event

    def cancel(self) -> None:
        """Stop generating and free the request's pages (it ends with finish_reason 'cancelled')."""
        self.engine.cancel(self.request_id)


class _Text:
    """Incremental detokenization with stop strings: text is released only once no stop string
    can still start in it, and only once its UTF-8 bytes are complete.

    Each token decodes a short window (the ids since the last two release points, as Hugging
    Face's streamers do), never the whole output again: constant work per token."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the end of self.text
        self.sent = 0
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; (text now safe to send, whether a stop string was hit)."""
        if self.tok is None or token in self.tok.special_ids:
            return "", False
        self.ids.append(token)
        known = self.tok.decode(self.ids[self._prefix : self._read])
        window = self.tok.decode(self.ids[self._prefix :])
        if window.endswith("\ufffd") or len(window) <= len(known):  # incomplete UTF-8, or nothing new yet
            return "", False
        self.text += window[len(known) :]
        self._prefix, self._read = self._read, len(self.ids)
        text = self.text
        if self.stop:
            longest = max(len(s) for s in self.stop)
            lo = max(0, self.sent - longest)
            hits = [i for i in (text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                end = max(min(hits), self.sent)
                piece, self.sent, self.text = text[self.sent : end], end, text[:end]
                return piece, True
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            end = len(text) - hold
        else:
            end = len(text)
        piece = text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece, False

    def flush(self) -> str:
        """Whatever is held back, at the end of generation."""
        piece = self.text[self.sent :]
        self.sent = len(self.text)
        return piece


@dataclass(eq=False)
class _Request:
    seq: Seq
    sampling: SamplingConfig
    handle: RequestHandle
    sampler: Sampler
    text: _Text
    stop_ids: frozenset[int]
    stats: RequestStats
    t_submit: float
    t_admit: float = 0.0
    t_first: float = 0.0
    cached_keys: list[bytes] = field(default_factory=list)  # prefix pages pinned for this request


_RUNNING: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _stop_running_engines() -> None:
    """Stop loop threads before the interpreter tears down (a kernel call cut off there aborts)."""
    for engine in list(_RUNNING):
        engine.stop(timeout=5.0)


class Engine:
    """Continuous batching over one model. ``start()`` runs the loop in a daemon thread.

    ``submit(prompt_ids, sampling, stop)`` is safe from any thread; so are ``cancel`` and
    ``metrics``. The model is only ever called from the loop thread. ``weights``: the model's
    weight source, needed only by ``config.hybrid`` on a real CUDA GPU (it copies experts from it).
    """

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None,
                 prefix_cache: TieredPrefixCache | None = None, weights=None) -> None:
        if getattr(model, "deferral", 0):
            raise ValueError("serving needs the exact model: model.deferral must be 0")
        self.model, self.tokenizer = model, tokenizer
        self.config = config or EngineConfig()
        cfg = model.cfg
        kv = self.config.kv
        dtype = str(model.dtype).removeprefix("torch.")
        num_pages = kv.pages_for(cfg.num_layers, cfg.cache_heads, cfg.cache_head_dim, dtype, cfg.mla)
        if kv.num_pages is None:  # a budget is an upper bound: never more than a full batch of full contexts
            num_pages = min(num_pages, self.config.max_batch_size * pages_needed(cfg.context_length, kv.page_size))
        self.kv = model.new_paged_kv(num_pages, kv.page_size)
        self.blocks = BlockManager(num_pages, kv.page_size)
        self.prefix_cache = prefix_cache
        if prefix_cache is not None:
            scope = prefix_cache.scope
            mine = (cfg.num_layers, cfg.cache_heads, cfg.cache_head_dim, dtype, kv.page_size)
            theirs = (scope.num_layers, scope.num_kv_heads, scope.head_dim, scope.dtype, scope.page_size)
            if mine != theirs:
                raise ValueError(f"the prefix cache's scope {theirs} does not match the engine's "
                                 f"(layers, kv heads, head dim, dtype, page size) {mine}")
        self.scheduler = Scheduler(self.blocks, self.config.max_batch_size, self.config.max_tokens_in_batch,
                                   on_admit=self._reuse_prefix if prefix_cache is not None else None)
        self.context_length = cfg.context_length
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._recent: deque[tuple[float, int]] = deque()
        self.steps = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.finished_requests = 0
        self.busy_seconds = 0.0
        # Decode-shaped steps (one token per sequence): their time and the weight bytes they had
        # to read, for the bandwidth-bound ideal beside the measured speed.
        self.decode_steps = self.decode_step_tokens = self.decode_step_bytes = 0
        self.decode_step_seconds = 0.0
        counts_bytes = hasattr(model, "dense_weight_bytes")
        if self.config.paired_reads and (not counts_bytes or self.config.hybrid is not None):
            raise ValueError("paired reads need every expert on the CPU engine (no hybrid placement)")
        self._paired = PairedReads(model) if self.config.paired_reads else None  # ValueError where unsupported
        self._step_bytes = StepBytes(model) if counts_bytes else None  # a route observer: after the checks
        self._ideal = self._decode_roofline()
        self.hybrid = self._hybrid_placement(weights)  # last: a config error above leaves the model as it was

    # -- public, any thread -----------------------------------------------------------------
    def start(self) -> Engine:
        """Start the loop thread (idempotent); returns self."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="ktlab-engine", daemon=True)
            self._thread.start()
            _RUNNING.add(self)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still in flight end with an error event."""
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)
            if self.prefix_cache is not None and not self._thread.is_alive():
                self.prefix_cache.persist()  # memory pages go down to disk (if any) for the next start
        self._thread = None
        _RUNNING.discard(self)
        if self._step_bytes is not None:
            self.model.remove_route_observer(self._step_bytes)

    def check(self, prompt_ids: Sequence[int], sampling: SamplingConfig) -> None:
        """Raise ValueError when a request can never run (empty, too long, bigger than the pool)."""
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        if sampling.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {sampling.max_tokens}")
        total = len(prompt_ids) + sampling.max_tokens
        if total > self.context_length:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) = {total} exceeds the "
                f"context length {self.context_length}"
            )
        if total > self.blocks.capacity_tokens:
            raise ValueError(
                f"prompt + max_tokens = {total} tokens exceeds the KV pool ({self.blocks.capacity_tokens} positions)"
            )
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingConfig, stop: Sequence[str] = (),
               sink: Callable[[Event], None] | None = None, ignore_eos: bool = False) -> RequestHandle:
        """Queue a request; events go to ``sink`` (called on the engine thread) or the handle's queue.
        ``ignore_eos``: generate through the end-of-sequence token (benchmarks: exactly max_tokens).

        Raises ValueError at once for a request that can never run (see ``check``).
        """
        self.check(prompt_ids, sampling)
        rid = next(self._ids)
        handle = RequestHandle(self, rid, sink)
        eos = self.tokenizer is not None and not ignore_eos
        stop_ids = frozenset([self.tokenizer.eos_id]) if eos else frozenset()
        req = _Request(
            seq=Seq(rid, [int(t) for t in prompt_ids], sampling.max_tokens), sampling=sampling, handle=handle,
            sampler=Sampler(sampling), text=_Text(self.tokenizer, stop), stop_ids=stop_ids,
            stats=RequestStats(prompt_tokens=len(prompt_ids)), t_submit=time.perf_counter(),
        )
        self._inbox.put(("add", req))
        return handle

    def cancel(self, request_id: int) -> None:
        """Cancel a request (queued or running); its pages are freed before the next step."""
        self._inbox.put(("cancel", request_id))

    def metrics(self) -> dict[str, float]:
        """A snapshot: queue length, running, KV pages, token counters, recent tokens/s."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= 10.0]
        span = now - recent[0][0] if recent else 0.0
        return {
            "queue_length": len(self.scheduler.waiting) + self._inbox.qsize(),
            "running": len(self.scheduler.running),
            "kv_pages_used": self.blocks.num_used,
            "kv_pages_total": self.blocks.num_pages,
            "kv_page_size": self.blocks.page_size,
            "steps": self.steps,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "finished_requests": self.finished_requests,
            "busy_seconds": self.busy_seconds,
            "decode_steps": self.decode_steps,
            "decode_step_tokens": self.decode_step_tokens,
            "decode_step_bytes": self.decode_step_bytes,
            "decode_step_seconds": self.decode_step_seconds,
            **self._roofline(),
            **(self._paired.metrics() if self._paired is not None else {}),
            "tokens_per_second": sum(n for _, n in recent) / span if span > 1e-3 else 0.0,
            **(self.prefix_cache.metrics() if self.prefix_cache is not None else {}),
            **({f"hybrid_{k}": v for k, v in self.hybrid.metrics().items()} if self.hybrid is not None else {}),
        }

    def _hybrid_placement(self, weights) -> HybridPlacement | None:
        """The model's hybrid placement in batched mode: attached here from ``config.hybrid``, or
        the one the model already has (switched to batched steps); None when there is none."""
        current = getattr(self.model, "placement", None)
        if self.config.hybrid is not None:
            if isinstance(current, HybridPlacement):
                raise ValueError("the model already has a hybrid placement: leave EngineConfig.hybrid at None")
            return attach_hybrid(self.model, weights, self.config.hybrid, batched=True, kv_bytes=self.kv.nbytes)
        if isinstance(current, HybridPlacement):
            current.batched = True
            return current
        return None

    # -- the loop (engine thread only) ------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=self.scheduler.is_idle())
            if self._stop.is_set():
                break
            batch = self.scheduler.schedule()
            if not batch:
                if not self.scheduler.is_idle():  # waiting for pages that never free: nothing runs
                    self._drain(block=True)
                continue
            t0 = time.perf_counter()
            try:
                logits = self._run(batch)
                with torch_threads(self.config.torch_threads or 1):
                    self._postprocess(batch, logits)  # sampling: tiny ops, where spinning OpenMP workers cost most
            except Exception as exc:  # one clear line, the step's requests fail, the loop goes on
                print(f"ktlab serve: step failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                for item in batch:
                    if item.seq.seq_id in self._requests:
                        self._fail(self._requests[item.seq.seq_id], f"internal error: {exc}")
            seconds = time.perf_counter() - t0
            self.busy_seconds += seconds
            self._count_step_bytes(batch, seconds)
        self._drain(block=False)  # requests that arrived meanwhile get their answer too
        for req in list(self._requests.values()):
            self._fail(req, "the engine stopped")

    def _decode_roofline(self) -> DecodeRoofline | None:
        bw = self.config.bandwidth_gbs
        if bw is None or self._step_bytes is None:
            return None
        probe = None
        if self.config.track_bandwidth:
            from ktlab.benchmarks.machine import ReadProbe

            probe = ReadProbe()
        return DecodeRoofline(bw, probe)

    def _roofline(self) -> dict[str, float]:
        """The decode steps against the bandwidth-bound ideal (empty without a bandwidth).
        ``bandwidth_gbs``: the bandwidth the ideal assumed over those steps (bytes / ideal
        seconds; the latest figure before any step)."""
        if self._ideal is None:
            return {}
        ideal_s = self._ideal.ideal_seconds
        r = versus_ideal(self.decode_step_tokens, ideal_s, self.decode_step_seconds)
        bw = effective_bandwidth(self.decode_step_bytes, ideal_s, self._ideal.bandwidth_gbs)
        return {"bandwidth_gbs": bw, "bandwidth_samples": self._ideal.samples, "decode_step_ideal_seconds": ideal_s,
                "decode_tokens_per_second": r["measured_tps"], "decode_ideal_tokens_per_second": r["ideal_tps"],
                "decode_share_of_ideal": r["share_of_ideal"]}

    def _count_step_bytes(self, batch: list[ScheduledSeq], seconds: float) -> None:
        if self._step_bytes is None:
            return
        nbytes = self._step_bytes.take()
        if all(item.n_tokens == 1 for item in batch):
            self.decode_steps += 1
            self.decode_step_tokens += len(batch)
            self.decode_step_bytes += nbytes
            self.decode_step_seconds += seconds
            if self._ideal is not None:
                self._ideal.add_step(nbytes)  # after the step's timing: a probe is not the step's time
            if self._paired is not None:
                try:
                    self._paired.after_step(self._step_bytes.last_selected, len(batch), seconds)
                except Exception as exc:  # a measurement must never stop the engine
                    print(f"ktlab serve: paired reads stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
                    self._paired = None

    def _drain(self, block: bool) -> None:
        try:
            kind, item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if kind == "add":
                req = item
                self._requests[req.seq.seq_id] = req
                try:
                    self.scheduler.add(req.seq)
                except ValueError as exc:  # submit() checks first; never let one request stop the loop
                    self._fail(req, str(exc))
            elif kind == "cancel" and item in self._requests:
                self._finish(self._requests[item], "cancelled")
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return

    # -- prefix cache (engine thread only) ----------------------------------------------------
    def _reuse_prefix(self, seq: Seq) -> None:
        """On admission: copy the longest cached run of the prompt's whole pages into the
        sequence's pages and skip their prefill. The last prompt token is always prefilled (its
        logits give the first token), so at most (len - 1) // page_size pages come from the cache."""
        cache, req = self.prefix_cache, self._requests[seq.seq_id]
        keys = cache.hashes(seq.prompt_ids[:-1])
        pages: list[torch.Tensor] = []
        try:
            pages = cache.acquire(keys)
            for page_id, page in zip(seq.page_table, pages, strict=False):
                self.kv.k[:, :, page_id] = page[0].to(self.kv.k.device)
                self.kv.v[:, :, page_id] = page[1].to(self.kv.v.device)
        except Exception as exc:  # the cache must never fail a request: prefill it all instead
            print(f"ktlab serve: prefix cache lookup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            cache.release(keys[: len(pages)])
            return
        req.cached_keys = keys[: len(pages)]
        seq.num_computed = len(pages) * cache.page_size
        req.stats.cached_tokens = seq.num_computed
        cache.stats.saved_tokens += seq.num_computed

    def _store_prefix(self, seq: Seq, upto: int) -> None:
        """Cache the whole pages among the first ``upto`` positions (their K/V are computed)."""
        cache = self.prefix_cache
        try:
            for i, key in enumerate(cache.hashes(seq.all_ids[:upto])):
                if cache.tier_of(key) is None:
                    page_id = seq.page_table[i]
                    cache.store(key, torch.stack((self.kv.k[:, :, page_id], self.kv.v[:, :, page_id])))
        except Exception as exc:  # not cached is fine; a failed request is not
            print(f"ktlab serve: prefix cache store failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _release_prefix(self, req: _Request) -> None:
        if self.prefix_cache is not None and req.cached_keys:
            self.prefix_cache.release(req.cached_keys)
            req.cached_keys = []

    def _run(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        now = time.perf_counter()
        tokens: list[int] = []
        slices = []
        for item in batch:
            seq = item.seq
            req = self._requests[seq.seq_id]
            if req.t_admit == 0.0:
                req.t_admit = now
                req.stats.queue_seconds = now - req.t_submit
            tokens.extend(seq.next_tokens(item.n_tokens))
            slices.append(SeqSlice(seq.page_table, seq.num_computed, item.n_tokens))
        return self.model.forward_batch(torch.tensor(tokens, dtype=torch.long), slices, self.kv,
                                        threads=self.config.torch_threads)

    def _postprocess(self, batch: list[ScheduledSeq], logits: torch.Tensor) -> None:
        now = time.perf_counter()
        self.steps += 1
        n_new = 0
        greedy = logits.argmax(dim=-1).tolist()  # one op for every greedy request of the step
        for item, row, best in zip(batch, logits, greedy, strict=True):
            seq = item.seq
            req = self._requests[seq.seq_id]
            if seq.in_prefill:
                self.prompt_tokens += min(item.n_tokens, len(seq.prompt_ids) - seq.num_computed)
            sample = item.samples
            seq.num_computed += item.n_tokens
            if not sample:
                continue
            token = best if req.sampling.temperature == 0.0 else req.sampler(row)
            seq.output_ids.append(token)
            n_new += 1
            if req.t_first == 0.0:
                req.t_first = now
                req.stats.prefill_seconds = now - req.t_admit
                if self.prefix_cache is not None:
                    self._store_prefix(seq, len(seq.prompt_ids))
            req.stats.completion_tokens = len(seq.output_ids)
            req.stats.decode_seconds = now - req.t_first
            piece, hit_stop = req.text.push(token)
            if not self._emit(req, Event("delta", (token,), piece)):
                self._finish(req, "cancelled")
            elif hit_stop or token in req.stop_ids:
                self._finish(req, "stop", flush=not hit_stop)
            elif len(seq.output_ids) >= seq.max_tokens:
                self._finish(req, "length")
        self.generated_tokens += n_new
        self._recent.append((now, n_new))
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()

    def _finish(self, req: _Request, reason: str, flush: bool = True) -> None:
        if self.prefix_cache is not None and req.seq.page_table:  # earlier turns: prompt + reply pages
            self._store_prefix(req.seq, req.seq.num_computed)
        self._release_prefix(req)
        self.scheduler.finish(req.seq)
        self._requests.pop(req.seq.seq_id, None)
        self.finished_requests += 1
        rest = req.text.flush() if flush else ""
        self._emit(req, Event("done", (), rest, finish_reason=reason, stats=req.stats))

    def _fail(self, req: _Request, message: str) -> None:
        self._release_prefix(req)
        self.scheduler.finish(req.seq)
        self._requests.pop(req.seq.seq_id, None)
        self._emit(req, Event("error", error=message, stats=req.stats))

    @staticmethod
    def _emit(req: _Request, event: Event) -> bool:
        """Hand an event to the request's sink; False when the sink is gone (the caller cancels)."""
        try:
            req.handle.sink(event)
            return True
        except Exception:
            return False
