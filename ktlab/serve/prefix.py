"""Three-tier prefix cache: KV pages on GPU, RAM and disk, reused across requests.

A page holds the keys and values of ``page_size`` prompt positions in every layer: one tensor
``[2, L, nkv, page_size, hd]``. It is keyed by a hash chained over the token ids of its own and
all earlier pages, seeded with the ``PrefixScope`` (model file fingerprint, quant/engine, layer
layout, dtype, page size), so a key matches only the exact same prefix of the exact same model.

Tiers share one small protocol (``Tier``): a byte capacity and an LRU order. The cache keeps
every page in exactly one tier; a page that no longer fits a faster tier is demoted to the next
(dropped after the last), a hit in a slower tier is promoted to the fastest; pinned pages (in use
by a running request) are never evicted. The disk tier writes each page atomically (temp file +
rename) with a header (format version, model identity, checksum), reloads what is valid on
start, discards the rest with one warning line, and treats a full disk as "not cached".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ktlab.config import check_positive_ints

FORMAT_VERSION = 1
_MAGIC = b"KTLPAGE\0"
_TIER_NAMES = ("gpu", "ram", "disk")


@dataclass(frozen=True)
class PrefixScope:
    """What must be equal for two pages to be interchangeable (hashed into every page key)."""

    model: str  # file fingerprint (``model_fingerprint``)
    quant: str  # weight format / expert engine: anything that changes the numbers
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    page_size: int

    def __post_init__(self) -> None:
        check_positive_ints(self, ("num_layers", "num_kv_heads", "head_dim", "page_size"))
        if not self.model:
            raise ValueError("PrefixScope.model must be a non-empty identity")

    @property
    def identity(self) -> str:
        """One string naming the scope (written into every disk page header)."""
        return (f"{self.model}|{self.quant}|L{self.num_layers}.kv{self.num_kv_heads}.hd{self.head_dim}|"
                f"{self.dtype}|ps{self.page_size}")

    @property
    def page_shape(self) -> tuple[int, ...]:
        """Shape of one page's payload: [2 (k, v), L, nkv, page_size, hd]."""
        return (2, self.num_layers, self.num_kv_heads, self.page_size, self.head_dim)


def model_fingerprint(path: str | Path, sample_bytes: int = 16 << 20) -> str:
    """sha256 of a model file's size, first and last ``sample_bytes`` (the whole file when smaller;
    a directory: every file in it). Cheap for a 20 GB GGUF, and its header alone names every tensor."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(sample_bytes))
            if size > 2 * sample_bytes:
                fh.seek(size - sample_bytes)
                h.update(fh.read(sample_bytes))
            elif size > sample_bytes:
                h.update(fh.read())
    return h.hexdigest()


def page_hashes(token_ids: list[int], scope: PrefixScope) -> list[bytes]:
    """Keys of the full pages of ``token_ids``: key i = sha256(key i-1 + tokens of page i)."""
    ps = scope.page_size
    prev = hashlib.sha256(scope.identity.encode()).digest()
    keys = []
    for i in range(len(token_ids) // ps):
        prev = hashlib.sha256(prev + struct.pack(f"<{ps}q", *token_ids[i * ps : (i + 1) * ps])).digest()
        keys.append(prev)
    return keys


def page_nbytes(page: torch.Tensor) -> int:
    """Bytes of a page payload."""
    return page.numel() * page.element_size()


class Tier(Protocol):
    """One level of the cache: a byte capacity and pages in LRU order (oldest first)."""

    name: str
    capacity_bytes: int
    used_bytes: int

    def __contains__(self, key: bytes) -> bool: ...
    def __len__(self) -> int: ...
    def lru_keys(self) -> list[bytes]: ...  # LRU order, oldest first
    def get(self, key: bytes) -> torch.Tensor | None: ...  # also marks the page most recently used
    def put(self, key: bytes, page: torch.Tensor) -> bool: ...  # False: not stored (the caller made room)
    def pop(self, key: bytes) -> torch.Tensor | None: ...


class MemoryTier:
    """Pages held as tensors on ``device`` within a byte budget (the RAM tier, and the GPU tier's body)."""

    def __init__(self, name: str, capacity_bytes: int, device: str | torch.device = "cpu") -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"{name} tier capacity must be a non-negative integer of bytes, got {capacity_bytes!r}")
        self.name, self.capacity_bytes, self.device = name, capacity_bytes, torch.device(device)
        self.used_bytes = 0
        self._pages: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        return key in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def lru_keys(self) -> list[bytes]:
        return list(self._pages)

    def get(self, key: bytes) -> torch.Tensor | None:
        page = self._pages.get(key)
        if page is not None:
            self._pages.move_to_end(key)
        return page

    def put(self, key: bytes, page: torch.Tensor) -> bool:
        n = page_nbytes(page)
        if key in self._pages or self.used_bytes + n > self.capacity_bytes:
            return False
        self._pages[key] = page.to(self.device, copy=True)
        self.used_bytes += n
        return True

    def pop(self, key: bytes) -> torch.Tensor | None:
        page = self._pages.pop(key, None)
        if page is not None:
            self.used_bytes -= page_nbytes(page)
        return page


class RamTier(MemoryTier):
    """Pages in host memory within ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__("ram", capacity_bytes, "cpu")


class GpuTier(MemoryTier):
    """Pages in CUDA memory within ``capacity_bytes``; without CUDA, host memory standing in for the
    simulated accelerator's budget (``simulated`` is then True and the tier is labeled so)."""

    def __init__(self, capacity_bytes: int, device: str | None = None) -> None:
        cuda = device is not None and device.startswith("cuda") or device is None and torch.cuda.is_available()
        super().__init__("gpu", capacity_bytes, (device or "cuda") if cuda else "cpu")
        self.simulated = not cuda
        if self.simulated:
            self.name = "gpu(simulated)"


class DiskTier:
    """Pages as files in ``directory`` within ``capacity_bytes`` (file sizes, headers included)."""

    SUFFIX = ".kvpage"

    def __init__(self, directory: str | Path, capacity_bytes: int, scope: PrefixScope) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"disk tier capacity must be a non-negative integer of bytes, got {capacity_bytes!r}")
        self.name, self.capacity_bytes, self.scope = "disk", capacity_bytes, scope
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.used_bytes = 0
        self.write_failures = 0
        self._files: OrderedDict[bytes, int] = OrderedDict()  # key -> file size
        self._overhead: dict[tuple[torch.dtype, tuple[int, ...]], int] = {}
        self._clock = 0  # last mtime (ns) given to a file: strictly increasing, so it records the LRU order
        self.discarded = self._reload()

    # -- file format: magic, u32 header length, JSON header, payload ----------------------------
    def _path(self, key: bytes) -> Path:
        return self.directory / (key.hex() + self.SUFFIX)

    def _encode(self, key: bytes, page: torch.Tensor) -> bytes:
        payload = page.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        header = json.dumps({
            "version": FORMAT_VERSION, "identity": self.scope.identity, "key": key.hex(),
            "dtype": str(page.dtype).removeprefix("torch."), "shape": list(page.shape),
            "nbytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
        }).encode()
        return _MAGIC + struct.pack("<I", len(header)) + header + payload

    def _decode(self, key: bytes, data: bytes) -> torch.Tensor:
        """The page in ``data``; ValueError when it is corrupt, truncated or from another model."""
        if data[: len(_MAGIC)] != _MAGIC or len(data) < len(_MAGIC) + 4:
            raise ValueError("bad magic")
        (n,) = struct.unpack_from("<I", data, len(_MAGIC))
        start = len(_MAGIC) + 4
        try:
            header = json.loads(data[start : start + n])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("bad header") from None
        if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
            raise ValueError("another format version")
        if header.get("identity") != self.scope.identity or header.get("key") != key.hex():
            raise ValueError("another model")
        payload = data[start + n :]
        if len(payload) != header.get("nbytes") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise ValueError("checksum mismatch or truncated")
        if tuple(header.get("shape", ())) != self.scope.page_shape:
            raise ValueError("another page shape")
        dtype = getattr(torch, str(header.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError("unknown dtype")
        return torch.frombuffer(bytearray(payload), dtype=dtype).view(self.scope.page_shape).clone()

    def _reload(self) -> int:
        """Index the valid page files (oldest modified first); delete invalid ones. Returns how many."""
        found = sorted(self.directory.glob("*" + self.SUFFIX), key=lambda p: p.stat().st_mtime_ns)
        bad = 0
        for path in found:
            try:
                key = bytes.fromhex(path.name.removesuffix(self.SUFFIX))
                self._decode(key, path.read_bytes())
            except (ValueError, OSError):
                bad += 1
                path.unlink(missing_ok=True)
                continue
            size = path.stat().st_size
            if self.used_bytes + size > self.capacity_bytes:  # a smaller budget than last time
                path.unlink(missing_ok=True)
                continue
            self._files[key] = size
            self.used_bytes += size
            self._clock = max(self._clock, path.stat().st_mtime_ns)
        for tmp in self.directory.glob(".tmp-*"):  # a write cut off by a crash
            tmp.unlink(missing_ok=True)
        if bad:
            print(f"ktlab: prefix cache: discarded {bad} invalid page file(s) in {self.directory} "
                  "(corrupt, truncated or from another model)", file=sys.stderr)
        return bad

    # -- the Tier protocol --------------------------------------------------------------------
    def __contains__(self, key: bytes) -> bool:
        return key in self._files

    def __len__(self) -> int:
        return len(self._files)

    def lru_keys(self) -> list[bytes]:
        return list(self._files)

    def file_size(self, page: torch.Tensor) -> int:
        """Bytes a page takes on disk, header included (the header's length depends only on the
        page's dtype and shape: measured once on an empty page of that kind)."""
        kind = (page.dtype, tuple(page.shape))
        if kind not in self._overhead:
            empty = torch.zeros(page.shape, dtype=page.dtype)
            self._overhead[kind] = len(self._encode(bytes(32), empty)) - page_nbytes(empty)
        return page_nbytes(page) + self._overhead[kind]

    def get(self, key: bytes) -> torch.Tensor | None:
        if key not in self._files:
            return None
        try:
            page = self._decode(key, self._path(key).read_bytes())
        except (ValueError, OSError):  # changed under us: forget it, a miss
            self.pop(key)
            return None
        self._files.move_to_end(key)
        self._touch(key)
        return page

    def _touch(self, key: bytes) -> None:
        """Stamp the file with the next tick of the tier's clock (its recency survives a restart)."""
        self._clock = max(time.time_ns(), self._clock + 1)
        with contextlib.suppress(OSError):
            os.utime(self._path(key), ns=(self._clock, self._clock))

    def put(self, key: bytes, page: torch.Tensor) -> bool:
        data = self._encode(key, page)
        if key in self._files or self.used_bytes + len(data) > self.capacity_bytes:
            return False
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self._path(key))
        except OSError:  # disk full, read-only, gone: the page is simply not cached
            self.write_failures += 1
            Path(tmp).unlink(missing_ok=True)
            return False
        self._files[key] = len(data)
        self.used_bytes += len(data)
        self._touch(key)
        return True

    def pop(self, key: bytes) -> torch.Tensor | None:
        if key not in self._files:
            return None
        page = None
        with contextlib.suppress(ValueError, OSError):
            page = self._decode(key, self._path(key).read_bytes())
        self.used_bytes -= self._files.pop(key)
        self._path(key).unlink(missing_ok=True)
        return page


@dataclass
class PrefixStats:
    """Counters of a ``TieredPrefixCache`` (hits per tier, pages moved between tiers)."""

    lookups: int = 0
    hits: Counter[str] = field(default_factory=Counter)  # tier name -> pages found there
    misses: int = 0
    promotions: int = 0
    demotions: int = 0
    drops: int = 0  # pages evicted from the last tier
    stores: int = 0
    saved_tokens: int = 0  # prompt tokens not prefilled thanks to the cache


class TieredPrefixCache:
    """Pages of KV in ``tiers`` (fastest first), one copy of each page, LRU within each tier."""

    def __init__(self, tiers: list[Tier], scope: PrefixScope) -> None:
        if not tiers:
            raise ValueError("a prefix cache needs at least one tier")
        self.tiers, self.scope = list(tiers), scope
        self.pins: Counter[bytes] = Counter()
        self.stats = PrefixStats()

    @property
    def page_size(self) -> int:
        """Tokens per page."""
        return self.scope.page_size

    def hashes(self, token_ids: list[int]) -> list[bytes]:
        """Keys of the full pages of ``token_ids`` in this cache's scope."""
        return page_hashes(token_ids, self.scope)

    def tier_of(self, key: bytes) -> int | None:
        """Index of the tier holding ``key`` (None: not cached)."""
        return next((i for i, t in enumerate(self.tiers) if key in t), None)

    def match(self, keys: list[bytes]) -> int:
        """How many leading ``keys`` are cached (touches nothing)."""
        n = 0
        while n < len(keys) and self.tier_of(keys[n]) is not None:
            n += 1
        return n

    def acquire(self, keys: list[bytes]) -> list[torch.Tensor]:
        """Pages of the longest cached run of leading ``keys``, promoted to the fastest tier and
        pinned (``release`` them when the request ends)."""
        self.stats.lookups += 1
        pages = []
        for key in keys:
            i = self.tier_of(key)
            page = None if i is None else self.tiers[i].get(key) if i == 0 else self.tiers[i].pop(key)
            if page is None:
                self.stats.misses += 1
                break
            self.stats.hits[self.tiers[i].name] += 1
            self.pins[key] += 1
            if i > 0:
                j = self._insert_first(key, page, upto=i)
                if j is not None and j < i:
                    self.stats.promotions += 1
                elif j is None:  # it fits nowhere any more (its tier is full of pinned pages)
                    self.stats.drops += 1
            pages.append(page)
        return pages

    def release(self, keys: list[bytes]) -> None:
        """Unpin pages taken by ``acquire``."""
        for key in keys:
            self.pins[key] -= 1
            if self.pins[key] <= 0:
                del self.pins[key]

    def store(self, key: bytes, page: torch.Tensor) -> bool:
        """Cache a page (in the fastest tier, demoting others); True if it is cached afterwards."""
        i = self.tier_of(key)
        if i is not None:
            self.tiers[i].get(key)  # touch
            return True
        if self._insert_first(key, page) is not None:
            self.stats.stores += 1
            return True
        return False

    def persist(self) -> int:
        """Move every page of the memory tiers down to the last tier when it is a disk tier (on
        shutdown: the hottest pages become the disk's most recent, so a restart finds them).
        Returns the pages moved."""
        if len(self.tiers) < 2 or not isinstance(self.tiers[-1], DiskTier):
            return 0
        moved = 0
        for tier in reversed(self.tiers[:-1]):  # slowest memory tier first, each oldest first
            for key in tier.lru_keys():
                page = tier.pop(key)
                if page is not None and self._insert(len(self.tiers) - 1, key, page):
                    moved += 1
        return moved

    def _insert_first(self, key: bytes, page: torch.Tensor, upto: int | None = None) -> int | None:
        """Put a page into the fastest tier (up to index ``upto``) that takes it; its index, or None."""
        last = len(self.tiers) - 1 if upto is None else upto
        return next((i for i in range(last + 1) if self._insert(i, key, page)), None)

    def _insert(self, i: int, key: bytes, page: torch.Tensor) -> bool:
        """Put a page into tier ``i``, demoting unpinned LRU pages down to make room."""
        tier = self.tiers[i]
        need = tier.file_size(page) if hasattr(tier, "file_size") else page_nbytes(page)
        if need > tier.capacity_bytes:
            return False
        while tier.used_bytes + need > tier.capacity_bytes:
            victim = next((k for k in tier.lru_keys() if k not in self.pins), None)
            if victim is None:
                return False  # everything left is pinned
            evicted = tier.pop(victim)
            if evicted is not None and i + 1 < len(self.tiers) and self._insert(i + 1, victim, evicted):
                self.stats.demotions += 1
            else:
                self.stats.drops += 1
        return tier.put(key, page)

    def metrics(self) -> dict[str, float]:
        """Flat counters for /metrics: per tier hits, bytes, pages; promotions, demotions, saved tokens."""
        out: dict[str, float] = {
            "prefix_lookups": self.stats.lookups, "prefix_misses": self.stats.misses,
            "prefix_promotions": self.stats.promotions, "prefix_demotions": self.stats.demotions,
            "prefix_drops": self.stats.drops, "prefix_saved_tokens": self.stats.saved_tokens,
        }
        for tier in self.tiers:
            label = tier.name.split("(")[0]
            out[f"prefix_hits_{label}"] = self.stats.hits[tier.name]
            out[f"prefix_bytes_{label}"] = tier.used_bytes
            out[f"prefix_capacity_bytes_{label}"] = tier.capacity_bytes
            out[f"prefix_pages_{label}"] = len(tier)
        return out


@dataclass(frozen=True)
class PrefixCacheConfig:
    """Budgets of the three tiers in GB (0: tier off); ``disk_dir`` None: no disk tier."""

    gpu_gb: float = 0.0
    ram_gb: float = 0.0
    disk_dir: str | None = None
    disk_gb: float = 0.0

    def __post_init__(self) -> None:
        for name in ("gpu_gb", "ram_gb", "disk_gb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"PrefixCacheConfig.{name} must be a number >= 0, got {value!r}")
        if (self.disk_dir is None) != (self.disk_gb == 0):
            raise ValueError("PrefixCacheConfig: the disk tier needs both disk_dir and disk_gb > 0")

    @property
    def enabled(self) -> bool:
        """True when any tier has a budget."""
        return self.gpu_gb > 0 or self.ram_gb > 0 or self.disk_gb > 0

    @classmethod
    def parse_disk(cls, spec: str) -> tuple[str, float]:
        """``PATH:GB`` -> (path, GB); ValueError with the expected form otherwise."""
        path, sep, gb = spec.rpartition(":")
        try:
            value = float(gb)
        except ValueError:
            value = -1.0
        if not sep or not path or value <= 0:
            raise ValueError(f"--prefix-cache-disk must be PATH:GB with GB > 0, got {spec!r}")
        return path, value

    def build(self, scope: PrefixScope) -> TieredPrefixCache | None:
        """The cache these budgets describe (None when every tier is off)."""
        tiers: list[Tier] = []
        if self.gpu_gb > 0:
            tiers.append(GpuTier(int(self.gpu_gb * 1e9)))
        if self.ram_gb > 0:
            tiers.append(RamTier(int(self.ram_gb * 1e9)))
        if self.disk_dir is not None:
            tiers.append(DiskTier(self.disk_dir, int(self.disk_gb * 1e9), scope))
        return TieredPrefixCache(tiers, scope) if tiers else None


def scope_for(model, model_id: str, page_size: int) -> PrefixScope:
    """The scope of a loaded ``Model``: ``model_id`` (``model_fingerprint`` of its file) plus its
    expert engine, layer layout and dtype (the file fingerprint already covers its quant types)."""
    cfg = model.cfg
    return PrefixScope(model=model_id, quant=f"experts={getattr(model, 'experts', '?')}", num_layers=cfg.num_layers,
                       num_kv_heads=cfg.cache_heads, head_dim=cfg.cache_head_dim,
                       dtype=str(model.dtype).removeprefix("torch."), page_size=page_size)
