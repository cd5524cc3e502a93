"""Prefix cache units: chained page hashes, tiers, LRU, pinning, demotion/promotion, disk safety."""

from __future__ import annotations

import pytest
import torch

from ktlab.serve.prefix import (
    DiskTier,
    GpuTier,
    PrefixCacheConfig,
    PrefixScope,
    RamTier,
    TieredPrefixCache,
    page_hashes,
    page_nbytes,
)

SCOPE = PrefixScope(model="abc123", quant="q8_0/cpu", num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32",
                    page_size=4)
PAGE_BYTES = 2 * 2 * 1 * 4 * 4 * 4  # [2, L, nkv, ps, hd] float32


def page(value: float) -> torch.Tensor:
    return torch.full(SCOPE.page_shape, float(value))


def keys(n: int) -> list[bytes]:
    return page_hashes(list(range(n * SCOPE.page_size)), SCOPE)


def test_chained_hashes_break_from_the_changed_page_on():
    ids = list(range(20))
    base = page_hashes(ids, SCOPE)
    assert len(base) == 5  # full pages only
    for pos in (0, 5, 11, 19):
        changed = ids.copy()
        changed[pos] += 1000
        got = page_hashes(changed, SCOPE)
        first = pos // SCOPE.page_size
        assert got[:first] == base[:first]  # never before the changed page
        assert all(g != b for g, b in zip(got[first:], base[first:], strict=True))  # from that page on
    other = PrefixScope(**{**SCOPE.__dict__, "model": "other"})
    assert not set(page_hashes(ids, other)) & set(base)  # another model never matches


def test_config_validation():
    with pytest.raises(ValueError):
        PrefixCacheConfig(ram_gb=-1)
    with pytest.raises(ValueError):
        PrefixCacheConfig(disk_dir="/tmp/x")  # no budget
    with pytest.raises(ValueError):
        PrefixCacheConfig.parse_disk("nogb")
    assert PrefixCacheConfig.parse_disk("/a/b:2.5") == ("/a/b", 2.5)
    with pytest.raises(ValueError):
        PrefixScope(**{**SCOPE.__dict__, "page_size": 0})
    assert PrefixCacheConfig().build(SCOPE) is None


def test_capacities_never_exceeded_and_demotion_order(tmp_path):
    gpu, ram = GpuTier(2 * PAGE_BYTES), RamTier(3 * PAGE_BYTES)
    disk = DiskTier(tmp_path, 0, SCOPE)
    disk.capacity_bytes = 2 * disk.file_size(page(0))
    cache = TieredPrefixCache([gpu, ram, disk], SCOPE)
    ks = keys(9)
    for i, k in enumerate(ks):
        assert cache.store(k, page(i))
        for t in cache.tiers:
            assert t.used_bytes <= t.capacity_bytes
    # newest 2 on the GPU, next 3 in RAM, next 2 on disk, the oldest 2 dropped
    assert gpu.lru_keys() == ks[7:9]
    assert ram.lru_keys() == ks[4:7]
    assert disk.lru_keys() == ks[2:4]
    assert cache.tier_of(ks[0]) is None and cache.tier_of(ks[1]) is None
    assert cache.stats.demotions == 7 + 4 and cache.stats.drops == 2  # 7 gpu->ram, 4 ram->disk
    assert gpu.simulated == (not torch.cuda.is_available())


def test_hit_in_slower_tier_promotes(tmp_path):
    gpu, ram = GpuTier(2 * PAGE_BYTES), RamTier(4 * PAGE_BYTES)
    cache = TieredPrefixCache([gpu, ram, DiskTier(tmp_path, 10 * PAGE_BYTES, SCOPE)], SCOPE)
    ks = keys(7)
    for i, k in enumerate(ks):
        cache.store(k, page(i))
    assert cache.tier_of(ks[0]) == 2  # on disk
    got = cache.acquire(ks[:1])
    assert torch.equal(got[0], page(0))
    assert cache.tier_of(ks[0]) == 0 and cache.stats.promotions == 1 and cache.stats.hits["disk"] == 1
    assert cache.tier_of(ks[5]) == 1 and cache.tier_of(ks[1]) == 2  # LRU pages went down to make room
    cache.release(ks[:1])


def test_pinned_pages_never_evicted():
    ram = RamTier(2 * PAGE_BYTES)
    cache = TieredPrefixCache([ram], SCOPE)
    ks = keys(4)
    cache.store(ks[0], page(0))
    cache.store(ks[1], page(1))
    cache.acquire(ks[:2])  # both pinned
    assert not cache.store(ks[2], page(2))  # no room, nothing evictable: not cached
    assert ram.lru_keys() == ks[:2]
    cache.release(ks[:1])
    assert cache.store(ks[2], page(2))  # ks[0] unpinned: it goes
    assert ram.lru_keys() == [ks[1], ks[2]]
    cache.release(ks[1:2])
    assert not cache.pins  # pages freed of pins when all users end


def test_acquire_stops_at_first_miss():
    cache = TieredPrefixCache([RamTier(10 * PAGE_BYTES)], SCOPE)
    ks = keys(4)
    for i in (0, 1, 3):
        cache.store(ks[i], page(i))
    assert cache.match(ks) == 2
    assert len(cache.acquire(ks)) == 2
    assert cache.stats.misses == 1


def _filled_disk(tmp_path, n=3) -> tuple[list[bytes], DiskTier]:
    disk = DiskTier(tmp_path, 100 * PAGE_BYTES, SCOPE)
    ks = keys(n)
    for i, k in enumerate(ks):
        assert disk.put(k, page(i))
    return ks, disk


def test_disk_restart_reloads_valid_pages(tmp_path):
    ks, disk = _filled_disk(tmp_path)
    again = DiskTier(tmp_path, 100 * PAGE_BYTES, SCOPE)
    assert again.lru_keys() == ks and again.discarded == 0 and again.used_bytes == disk.used_bytes
    for i, k in enumerate(ks):
        assert torch.equal(again.get(k), page(i))
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temp files


@pytest.mark.parametrize("damage", ["flip", "truncate", "other_model", "garbage_name"])
def test_disk_corruption_discarded_with_one_warning(tmp_path, capsys, damage):
    ks, disk = _filled_disk(tmp_path)
    victim = disk._path(ks[1])
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[-7] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "other_model":
        other = PrefixScope(**{**SCOPE.__dict__, "model": "other"})
        DiskTier(tmp_path / "o", 100 * PAGE_BYTES, other).put(ks[1], page(1))
        victim.write_bytes((tmp_path / "o" / victim.name).read_bytes())
    else:
        (tmp_path / ("zz" + DiskTier.SUFFIX)).write_bytes(b"junk")
    capsys.readouterr()
    again = DiskTier(tmp_path, 100 * PAGE_BYTES, SCOPE)
    err = capsys.readouterr().err
    assert again.discarded == 1 and err.count("\n") == 1 and "discarded 1" in err
    expect = ks if damage == "garbage_name" else [ks[0], ks[2]]
    assert again.lru_keys() == expect
    cache = TieredPrefixCache([again], SCOPE)
    assert cache.match(ks) == (3 if damage == "garbage_name" else 1)


def test_disk_full_degrades_to_not_cached(tmp_path, monkeypatch):
    disk = DiskTier(tmp_path, 100 * PAGE_BYTES, SCOPE)
    cache = TieredPrefixCache([disk], SCOPE)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ktlab.serve.prefix.os.replace", full)
    k = keys(1)[0]
    assert not cache.store(k, page(0))
    assert disk.write_failures == 1 and len(disk) == 0 and disk.used_bytes == 0
    assert not list(tmp_path.iterdir())  # the temp file is gone too


def test_page_nbytes():
    assert page_nbytes(page(0)) == PAGE_BYTES


def test_page_too_big_for_a_tier_goes_to_the_next(tmp_path):
    gpu, ram = GpuTier(PAGE_BYTES // 2), RamTier(2 * PAGE_BYTES)
    cache = TieredPrefixCache([gpu, ram], SCOPE)
    k = keys(1)[0]
    assert cache.store(k, page(1)) and cache.tier_of(k) == 1
    assert torch.equal(cache.acquire([k])[0], page(1)) and cache.stats.promotions == 0  # nowhere faster fits


def test_persist_moves_memory_pages_to_disk_hottest_last(tmp_path):
    ram = RamTier(10 * PAGE_BYTES)
    cache = TieredPrefixCache([ram, DiskTier(tmp_path, 100 * PAGE_BYTES, SCOPE)], SCOPE)
    ks = keys(3)
    for i, k in enumerate(ks):
        cache.store(k, page(i))
    cache.acquire(ks[:1])  # ks[0] is now the most recent
    assert cache.persist() == 3 and len(ram) == 0
    again = DiskTier(tmp_path, 100 * PAGE_BYTES, SCOPE)
    assert set(again.lru_keys()) == set(ks) and again.lru_keys()[-1] == ks[0]
