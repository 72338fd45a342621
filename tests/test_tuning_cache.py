"""The tuned-config cache: round trip, fall-through, corrupted files, concurrent writers."""

import json
import logging
import multiprocessing

import pytest

from msa_tl.tuning import cache as C

GPU = C.gpu_key("NVIDIA H100 80GB HBM3", "9.0")
SHAPE = dict(groups=4, index_dim=128, block_size=128, topk=16, seq=100_000)
DEFAULTS = dict(block_M=128, num_stages=2)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / "user"))
    monkeypatch.setattr(C, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(C, "_WARNED", set())


def test_shape_key_buckets_sequence_length_and_keeps_other_dims():
    assert C.shape_key("p", SHAPE) == C.shape_key("p", dict(SHAPE, seq=131072))
    assert C.shape_key("p", SHAPE) != C.shape_key("p", dict(SHAPE, seq=131073))
    assert C.shape_key("p", SHAPE) != C.shape_key("p", dict(SHAPE, groups=8))
    assert GPU == "NVIDIA H100 80GB HBM3 (sm_90)"


def test_round_trip(tmp_path):
    cache = C.ConfigCache(tmp_path / "c.json")
    cache.put(GPU, "k", {"config": {"block_M": 64}, "ms": 1.5})
    assert cache.get(GPU, "k") == {"config": {"block_M": 64}, "ms": 1.5}
    assert cache.get(GPU, "other") is None and cache.get("other gpu", "k") is None


def test_lookup_falls_through_user_then_shipped_then_default():
    key = C.shape_key("index_select_fused", SHAPE)
    assert C.lookup("index_select_fused", SHAPE, DEFAULTS, GPU) == (DEFAULTS, "default")
    C.SHIPPED_DIR.mkdir(parents=True)
    C.ConfigCache(C.SHIPPED_DIR / "h100.json").put(GPU, key, {"config": {"num_stages": 3}})
    assert C.lookup("index_select_fused", SHAPE, DEFAULTS, GPU) == (dict(block_M=128, num_stages=3), "shipped")
    C.user_cache().put(GPU, key, {"config": {"block_M": 256}})
    assert C.lookup("index_select_fused", SHAPE, DEFAULTS, GPU) == (dict(block_M=256, num_stages=2), "user")
    assert C.lookup("index_select_fused", SHAPE, DEFAULTS, "another GPU (sm_80)") == (DEFAULTS, "default")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "someone-else/3", "entries": {}}), "[1, 2]"])
def test_corrupted_or_foreign_file_warns_once_and_falls_back(content, caplog):
    path = C.user_cache().path
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="msa_tl"):
        for _ in range(3):
            assert C.lookup("index_select_fused", SHAPE, DEFAULTS, GPU) == (DEFAULTS, "default")
    assert sum("ignoring config cache" in r.getMessage() for r in caplog.records) == 1
    C.user_cache().put(GPU, "k", {"config": {"block_M": 64}})  # a writer replaces the bad file
    assert C.user_cache().get(GPU, "k") == {"config": {"block_M": 64}}


def _write_many(path, writer, count):
    cache = C.ConfigCache(path)
    for i in range(count):
        cache.put(GPU, f"writer{writer}-{i}", {"config": {"i": i}})


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "shared.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(path, w, 25)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = C.ConfigCache(path).load()[GPU]
    assert set(entries) == {f"writer{w}-{i}" for w in range(2) for i in range(25)}


def test_kernels_get_the_cached_config_remembered_until_the_tuner_writes(monkeypatch):
    """tuned_config: what every kernel calls (the GPU key is faked: no GPU here)."""
    monkeypatch.setattr(C, "device_gpu_key", lambda device: GPU)
    monkeypatch.setattr(C, "_RESOLVED", {})
    shape = dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, seq=100_000)
    defaults = dict(block_rows=128, threads=128)
    assert C.tuned_config("kv_outer_attention", shape, defaults, "cuda") == defaults
    key = C.shape_key("kv_outer_attention", shape)
    C.user_cache().put(GPU, key, {"config": {"block_rows": 64}})
    assert C.tuned_config("kv_outer_attention", shape, defaults, "cuda") == defaults, "remembered per process"
    C.forget_resolved()
    assert C.tuned_config("kv_outer_attention", shape, defaults, "cuda") == dict(block_rows=64, threads=128)
    # other defaults at the same shape (e.g. another partial dtype) are resolved on their own; a longer sequence's
    # bucket, untuned, takes the nearest tuned one's config over its own defaults
    other_defaults = dict(block_rows=32, threads=256)
    longer = dict(shape, seq=300_000)
    assert C.tuned_config("kv_outer_attention", longer, other_defaults, "cuda") == dict(block_rows=64, threads=256)
    assert C.tuned_config("kv_outer_attention", longer, defaults, "cuda") == dict(block_rows=64, threads=128)
    assert C.tuned_config("kv_outer_attention", dict(shape, groups=8), other_defaults, "cuda") == other_defaults
    # dims a program does not depend on do not split its cache entries
    other = dict(shape, index_dim=64)
    assert C.shape_key("kv_outer_attention", other) == key


def test_lookup_takes_the_nearest_tuned_bucket_before_the_default():
    """No config for the call's sequence-length bucket: the one tuned for the nearest bucket of the same program,
    dims and GPU (log2 distance, the shorter bucket on a tie, user before shipped at equal distance); never one of
    other dims or another GPU."""
    def key(seq, **dims):
        return C.shape_key("index_select_fused", dict(SHAPE, seq=seq, **dims))

    C.SHIPPED_DIR.mkdir(parents=True)
    shipped = C.ConfigCache(C.SHIPPED_DIR / "h100.json")
    shipped.put(GPU, key(8192), {"config": {"num_stages": 1}})
    shipped.put(GPU, key(524288), {"config": {"num_stages": 4}})
    shipped.put(GPU, key(131072, groups=8), {"config": {"num_stages": 9}})  # other dims: never taken
    shipped.put("another GPU (sm_80)", key(131072), {"config": {"num_stages": 7}})
    assert C.lookup("index_select_fused", dict(SHAPE, seq=20000), DEFAULTS, GPU) == (
        dict(block_M=128, num_stages=1), "shipped, nearest bucket seq<=8192")  # 32K's bucket: 2 from 8K, 4 from 512K
    assert C.lookup("index_select_fused", dict(SHAPE, seq=1 << 20), DEFAULTS, GPU) == (
        dict(block_M=128, num_stages=4), "shipped, nearest bucket seq<=524288")
    C.user_cache().put(GPU, key(524288), {"config": {"block_M": 64}})  # as near as the shipped 512K: the user's wins
    assert C.lookup("index_select_fused", dict(SHAPE, seq=1 << 20), DEFAULTS, GPU) == (
        dict(block_M=64, num_stages=2), "user, nearest bucket seq<=524288")
    assert C.lookup("index_select_fused", dict(SHAPE, seq=100_000, groups=2), DEFAULTS, GPU) == (DEFAULTS, "default")
    assert C.lookup("index_select_fused", SHAPE, DEFAULTS, "a third GPU (sm_90)") == (DEFAULTS, "default")
