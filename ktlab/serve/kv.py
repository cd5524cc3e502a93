"""Paged KV cache bookkeeping: fixed-size pages, a pool sized by a memory budget, page tables.

Torch-free: ``BlockManager`` only hands out page ids; the storage itself is
``ktlab.model.layers.PagedKV`` (made by ``Model.new_paged_kv``). Pages are reserved for a
request's whole length (prompt + max_tokens) when it is admitted, so a running request never
runs out of pages and nothing has to be preempted: a request that does not fit waits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ktlab.config import check_positive_ints

_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class KVConfig:
    """Size of the KV page pool: ``num_pages`` if given, else as many as ``memory_gb`` holds (the
    engine takes no more than ``max_batch_size`` full contexts need)."""

    page_size: int = 16
    memory_gb: float = 1.0
    num_pages: int | None = None

    def __post_init__(self) -> None:
        check_positive_ints(self, ("page_size",))
        check_positive_ints(self, ("num_pages",), allow_none=True)
        if not self.memory_gb > 0:
            raise ValueError(f"KVConfig.memory_gb must be > 0, got {self.memory_gb!r}")

    def pages_for(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: str = "float32",
                  shared_kv: bool = False) -> int:
        """Pages in the pool for a model of these shapes (at least one)."""
        if self.num_pages is not None:
            return self.num_pages
        per_page = page_bytes(self.page_size, num_layers, num_kv_heads, head_dim, dtype, shared_kv)
        pages = int(self.memory_gb * 1e9) // per_page
        if pages < 1:
            raise ValueError(
                f"KVConfig.memory_gb={self.memory_gb} holds no page of {per_page} bytes: raise it or lower page_size"
            )
        return pages


def page_bytes(page_size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: str = "float32",
               shared_kv: bool = False) -> int:
    """Bytes of one page: keys and values of ``page_size`` positions in every layer (``shared_kv``:
    one tensor serves both, as the latent of latent attention does)."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {dtype!r} (known: {', '.join(_DTYPE_BYTES)})")
    return (1 if shared_kv else 2) * num_layers * page_size * num_kv_heads * head_dim * _DTYPE_BYTES[dtype]


def pages_needed(n_tokens: int, page_size: int) -> int:
    """Pages that hold ``n_tokens`` positions."""
    return -(-n_tokens // page_size)


class BlockManager:
    """Owns the free list of a pool of ``num_pages`` pages and every sequence's page table."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"BlockManager needs num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        """Pages not owned by any sequence."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Pages owned by sequences."""
        return self.num_pages - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Positions the whole pool holds (the longest request it could ever admit)."""
        return self.num_pages * self.page_size

    def can_allocate(self, n_tokens: int) -> bool:
        """True when ``n_tokens`` positions fit in the free pages now."""
        return pages_needed(n_tokens, self.page_size) <= len(self._free)

    def allocate(self, seq_id: int, n_tokens: int) -> tuple[int, ...]:
        """Reserve pages for ``n_tokens`` positions of a new sequence; returns its page table."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already holds pages")
        n = pages_needed(n_tokens, self.page_size)
        if n > len(self._free):
            raise ValueError(f"{n} pages needed, {len(self._free)} free")
        table = [self._free.pop() for _ in range(n)]
        self._tables[seq_id] = table
        return tuple(table)

    def free(self, seq_id: int) -> int:
        """Give a sequence's pages back (no-op if it holds none); returns how many."""
        table = self._tables.pop(seq_id, [])
        self._free.extend(reversed(table))
        return len(table)

    def page_table(self, seq_id: int) -> tuple[int, ...]:
        """The pages of a sequence, in position order."""
        return tuple(self._tables[seq_id])

    def holders(self) -> list[int]:
        """Ids of the sequences that hold pages."""
        return list(self._tables)
