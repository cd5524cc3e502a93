"""``ktlab bench``: whole-model speed like llama-bench: prompt processing (pp) and token generation (tg).

pp N: time to prefill N prompt tokens into an empty cache (tok/s). tg N: time to generate N tokens one
at a time after a short prompt (tok/s and ms/token). Each test repeats; mean and standard deviation are
reported. When ``llama-cpp-python`` is installed (optional), llama.cpp runs the same GGUF in the same table.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


@dataclass(frozen=True)
class BenchResult:
    """One engine x test: per-repetition tokens/second."""

    engine: str
    test: str
    tokens: int
    tps: list[float]

    @property
    def mean_tps(self) -> float:
        """Mean tokens per second."""
        return statistics.fmean(self.tps)

    @property
    def sd_tps(self) -> float:
        """Standard deviation of tokens per second over repetitions."""
        return statistics.stdev(self.tps) if len(self.tps) > 1 else 0.0

    @property
    def ms_per_token(self) -> float:
        """Milliseconds per token at the mean speed."""
        return 1000.0 / self.mean_tps

    def to_dict(self) -> dict:
        """JSON-able dict with the derived figures."""
        return {**asdict(self), "mean_tps": self.mean_tps, "sd_tps": self.sd_tps, "ms_per_token": self.ms_per_token}


class Engine:
    """What a benchmarked engine offers: prefill a prompt, then decode tokens one by one."""

    name: str

    def prefill(self, tokens: list[int]) -> None:
        """Process ``tokens`` into a fresh cache."""
        raise NotImplementedError

    def decode(self, first: int, n: int) -> None:
        """Generate ``n`` tokens greedily after the current cache, starting from ``first``."""
        raise NotImplementedError


class KtlabEngine(Engine):
    """ktlab's own runtime as ``ktlab serve`` runs it: one sequence in a paged KV cache through
    ``Model.forward_batch`` (a decode step with every expert on the C++ engine is one C++ call),
    experts in the C++ engine."""

    #: Positions per KV page.
    PAGE = 16

    def __init__(self, path: str | Path, max_tokens: int, threads: int | None, hybrid=None) -> None:
        from ktlab.model import load_model, open_weights
        from ktlab.runtime.hybrid import attach_hybrid, dense_device

        device = dense_device(hybrid)
        self.model, _ = load_model(path, threads=threads, **({"device": device} if device is not None else {}))
        pages = -(-max_tokens // self.PAGE)
        self.kv = self.model.new_paged_kv(pages, self.PAGE)
        self.table = tuple(range(pages))
        self.length = 0
        self.name = "ktlab"
        self.hybrid = None
        if hybrid is not None:  # every call a step: prefill chunks too drive the expert cache
            self.hybrid = attach_hybrid(self.model, open_weights(path), hybrid, batched=True, kv_bytes=self.kv.nbytes)
            budget = f"{hybrid.vram_budget_gb:g} GB" if hybrid.vram_budget_gb is not None else f"{hybrid.budget:.0%}"
            self.name = f"ktlab {self.hybrid.accelerator.label} {hybrid.policy} {budget}"

    def _step(self, tokens: list[int]) -> torch.Tensor:
        from ktlab.model.layers import SeqSlice

        logits = self.model.forward_batch(torch.tensor(tokens), [SeqSlice(self.table, self.length, len(tokens))],
                                          self.kv)
        self.length += len(tokens)
        return logits

    def prefill(self, tokens: list[int]) -> None:
        from ktlab.runtime.generate import PREFILL_CHUNK

        self.length = 0
        for start in range(0, len(tokens), PREFILL_CHUNK):
            self._step(tokens[start : start + PREFILL_CHUNK])

    def decode(self, first: int, n: int) -> None:
        token = first
        for _ in range(n):
            token = int(self._step([token])[-1].argmax())


class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python (optional peer)."""

    def __init__(self, path: str | Path, max_tokens: int, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=max_tokens, n_batch=512, n_ubatch=512, n_threads=threads,
            n_threads_batch=threads, verbose=False, n_gpu_layers=0,
        )
        self.name = f"llama.cpp {llama_cpp.__version__}"

    def prefill(self, tokens: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(tokens)

    def decode(self, first: int, n: int) -> None:
        token = first
        for _ in range(n):
            self.llm.eval([token])
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))


def timed(fn: Callable[[], None]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_engine(engine: Engine, vocab: int, pp: int, tg: int, repeat: int, seed: int = 0) -> list[BenchResult]:
    """pp and tg results of one engine (one untimed warm-up of each first)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(10, vocab, size=pp).tolist()
    short = prompt[:16]
    results = []
    if pp:
        engine.prefill(prompt[:32])  # warm-up
        tps = [pp / timed(lambda: engine.prefill(prompt)) for _ in range(repeat)]
        results.append(BenchResult(engine.name, f"pp{pp}", pp, tps))
    if tg:
        engine.prefill(short)
        engine.decode(short[-1], 4)  # warm-up
        tps = []
        for _ in range(repeat):
            engine.prefill(short)
            tps.append(tg / timed(lambda: engine.decode(short[-1], tg)))
        results.append(BenchResult(engine.name, f"tg{tg}", tg, tps))
    return results


def llama_cpp_available() -> bool:
    """Whether the optional llama-cpp-python package can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


def run_bench(path: str | Path, pp: int = 512, tg: int = 128, repeat: int = 3, threads: int | None = None,
              peers: bool = True, hybrid=None) -> list[BenchResult]:
    """Benchmark ktlab (and llama.cpp when installed and ``peers``) on the GGUF at ``path``;
    ``hybrid`` (a ``HybridConfig``): ktlab's experts placed on CPU + accelerator (llama.cpp stays
    on the CPU)."""
    from ktlab.kernels import default_threads
    from ktlab.model import open_weights, resolve_model_path

    path = resolve_model_path(path)
    weights = open_weights(path)
    vocab = weights.config.vocab_size
    threads = threads or default_threads()
    factories: list[Callable[[], Engine]] = [lambda: KtlabEngine(path, pp + tg + 32, threads, hybrid)]
    if peers and llama_cpp_available() and path.is_file():
        factories.append(lambda: LlamaCppEngine(path, pp + tg + 32, threads))
    results: list[BenchResult] = []
    for make in tqdm(factories, desc="engines", unit="engine", leave=False):
        engine = make()
        results.extend(bench_engine(engine, vocab, pp, tg, repeat))
        del engine
    return results


def format_results(results: list[BenchResult]) -> str:
    """A llama-bench-like table."""
    lines = [f"| {'engine':<24} | {'test':>7} | {'tok/s':>16} | {'ms/token':>9} |",
             f"|{'-' * 26}|{'-' * 9}|{'-' * 18}|{'-' * 11}|"]
    for r in results:
        lines.append(f"| {r.engine:<24} | {r.test:>7} | {r.mean_tps:>9.2f} ± {r.sd_tps:<5.2f}"
                     f" | {r.ms_per_token:>9.2f} |")
    return "\n".join(lines)
