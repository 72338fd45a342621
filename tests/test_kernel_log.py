"""The kernel log: each distinct kernel a run compiles is written once, and its builder resolves again."""

import json

import pytest

pytest.importorskip("tilelang")

from msa_tl import tl_compile  # noqa: E402
from msa_tl.attention import scheduler  # noqa: E402


def test_compiled_kernels_are_logged_once_and_resolve(tmp_path, monkeypatch):
    log = tmp_path / "kernels.jsonl"
    monkeypatch.setenv("MSA_TL_KERNEL_LOG", str(log))
    built = []
    monkeypatch.setattr(tl_compile, "compile_program", lambda builder, config: built.append(config) or object())
    tl_compile._compiled.cache_clear()
    try:
        first = tl_compile.compiled_kernel(scheduler.histogram_program, groups=3, topk=5)
        again = tl_compile.compiled_kernel(scheduler.histogram_program, topk=5, groups=3)
        tl_compile.compiled_kernel(scheduler.plan_program, item_queries=96)
    finally:
        tl_compile._compiled.cache_clear()
    assert first is again and len(built) == 2
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries == [
        {"builder": "msa_tl.attention.scheduler:histogram_program", "config": {"groups": 3, "topk": 5}},
        {"builder": "msa_tl.attention.scheduler:plan_program", "config": {"item_queries": 96}},
    ]
    assert [tl_compile.builder_by_name(e["builder"]) for e in entries] == [scheduler.histogram_program,
                                                                          scheduler.plan_program]


def test_a_decode_plan_built_on_the_cpu_lists_the_kernels_a_hopper_gpu_would_compile(tmp_path):
    """benchmarks.precompile.collect_kernels: a plan built from CPU tensors records its four kernels once each (the
    union attention: eight draft tokens), with the split count a 132-SM GPU gives, and compiles nothing."""
    import torch

    from benchmarks.precompile import collect_kernels
    from msa_tl.decode.attention import attention_defaults, attention_splits
    from msa_tl.decode.plan import DecodePlan

    log = tmp_path / "kernels.jsonl"
    table, seqlens = torch.zeros(8, 1024, dtype=torch.int32), torch.full((8,), 131072, dtype=torch.int32)
    shape = dict(queries=8, heads=64, groups=4, head_dim=128, index_dim=128, block_size=128, topk=16)
    with collect_kernels(str(log), sms=132):
        for _ in range(2):
            plan = DecodePlan(table, seqlens, **shape)
    builders = [json.loads(line)["builder"].split(":")[1] for line in log.read_text().splitlines()]
    assert sorted(builders) == ["decode_combine_program", "decode_scores_program", "decode_topk_program",
                                "decode_union_roles_program"]
    defaults = attention_defaults(dict(shape, batch=8), sms=132)
    assert plan.splits == attention_splits(8, 8, 4, 128, 128, 16, sms=132, **defaults) == 2  # 64 CTAs of 4 tokens


@pytest.mark.parametrize("kw", [dict(accumulate=True), dict(query_start=256), dict(partial_dtype="float32"),
                                dict(attention_config=dict(store_warp=True, combine_warps=True)),
                                dict(shared_tiles=False, combine_ctas=24)],
                         ids=["accumulate", "query-start", "fp32-partials", "combine-warps", "combine-ctas"])
def test_the_h100s_tuned_local_combine_yields_to_what_the_caller_asks(tmp_path, kw):
    """The H100's shipped schedule at the paper shape turns the local combine on; a caller's option that excludes it
    runs without it (the tuned default is no ValueError), while asking for both is one."""
    import torch

    import msa_tl.attention.kv_outer as kv_outer
    from benchmarks.precompile import collect_kernels

    B, N, Hq, G, D, Bk, topk = 1, 1000, 64, 4, 128, 128, 16
    kw = dict(kw, partial_dtype=getattr(torch, kw["partial_dtype"])) if "partial_dtype" in kw else kw
    start = kw.get("query_start", 0)
    q, k = torch.randn(B, N, Hq, D, dtype=torch.bfloat16), torch.randn(B, start + N, G, D, dtype=torch.bfloat16)
    own = ((start + torch.arange(N)) // Bk).view(1, N, 1, 1)
    indices = torch.where(torch.arange(topk) == 0, own, -1).expand(B, N, G, topk).int().contiguous()
    counted = (lambda mask: (mask.sum(), type("Done", (), {"synchronize": lambda self: None})()))
    log = tmp_path / "kernels.jsonl"
    with collect_kernels(str(log), gpu="NVIDIA H100 80GB HBM3"), \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(kv_outer, "_count_to_host", counted)
        kv_outer.sparse_attention_forward(q, k, k, indices, Bk, **kw)
        builders = {json.loads(line)["builder"].split(":")[1] for line in log.read_text().splitlines()}
        assert "local_combine_program" not in builders
        plain = torch.where(torch.arange(topk) == 0, (torch.arange(N) // Bk).view(1, N, 1, 1), -1)
        kv_outer.sparse_attention_forward(q, k[:, :N].contiguous(), k[:, :N].contiguous(),
                                          plain.expand(B, N, G, topk).int().contiguous(), Bk)  # the tuned default
        builders = {json.loads(line)["builder"].split(":")[1] for line in log.read_text().splitlines()}
        assert "local_combine_program" in builders
        with pytest.raises(ValueError, match="local_combine"):
            kv_outer.sparse_attention_forward(q, k, k, indices, Bk, local_combine=True, **kw)


@pytest.mark.parametrize("asked", [dict(tma_stores=False), dict(combine_warps=True, store_warp=True, tma_gathers=True),
                                   dict(consumers=3, store_warp=True, pingpong=False, tma_gathers=True)],
                         ids=["thread-stores", "combine-warps", "three-consumers"])
def test_the_h100s_tuned_attention_knobs_yield_to_the_callers(tmp_path, asked):
    """The H100's shipped attention config at the paper shape is the persistent kernel with the store warp; knobs a
    caller asks for that cannot run with those run over the kernel's defaults instead (no ValueError), the tuned
    config stays where the caller asks for nothing, and knobs that conflict among themselves still reach the
    kernel, which raises."""
    import torch

    import msa_tl.attention.kv_outer as kv_outer
    from benchmarks.precompile import collect_kernels

    B, N, Hq, G, D, Bk, topk = 1, 1000, 64, 4, 128, 128, 16
    q, k = torch.randn(B, N, Hq, D, dtype=torch.bfloat16), torch.randn(B, N, G, D, dtype=torch.bfloat16)
    # each query's own block and the block before it: no tile of 8 queries is shared across a block's first query
    own = (torch.arange(N) // Bk).view(1, N, 1, 1)
    indices = torch.where(torch.arange(topk) == 0, own, torch.where(torch.arange(topk) == 1, own - 1, -1))
    indices = torch.where(indices >= 0, indices, -1).expand(B, N, G, topk).int().contiguous()
    indices[:, ::3, :, 1] = -1  # queries that differ inside each tile: the KV-outer path runs
    counted = (lambda mask: (mask.sum(), type("Done", (), {"synchronize": lambda self: None})()))

    def attention_configs(**kw):
        log = tmp_path / f"kernels{len(list(tmp_path.iterdir()))}.jsonl"
        with collect_kernels(str(log), gpu="NVIDIA H100 80GB HBM3"), pytest.MonkeyPatch.context() as patch:
            patch.setattr(kv_outer, "_count_to_host", counted)
            # the row prep by torch ops: a collected kernel does nothing, and the KV-outer rows come from it
            kv_outer.sparse_attention_forward(q, k, k, indices, Bk, local_combine=False, fused_prep=False, **kw)
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        return [e["config"] for e in lines if e["builder"].endswith(":kv_outer_program")]

    (tuned,) = attention_configs()
    assert tuned["persistent"] and tuned["store_warp"]
    (config,) = attention_configs(attention_config=asked)
    assert all(config[key] == value for key, value in asked.items())
    assert kv_outer.attention_knob_conflict(config) is None and not config["persistent"]
    # knobs that conflict among themselves reach the kernel as asked (a collected kernel is not built: the program
    # would raise this)
    (config,) = attention_configs(attention_config=dict(asked, store_warp=True, tma_stores=False))
    assert config["store_warp"] and not config["tma_stores"]
    assert kv_outer.attention_knob_conflict(config).startswith("store_warp")


def test_the_plain_tile_kernel_does_not_take_the_listed_knob(tmp_path):
    """One head per KV head (64-row tiles) runs the plain tile kernel, which has no list: the forward's
    ``tile_config=dict(listed=False)`` does not reach its compile arguments (it would be an unknown keyword)."""
    import torch

    import msa_tl.attention.kv_outer as kv_outer
    from benchmarks.precompile import collect_kernels

    B, N, Hq, G, D, Bk, topk = 1, 1000, 8, 8, 64, 64, 4
    q, k = torch.randn(B, N, Hq, D, dtype=torch.bfloat16), torch.randn(B, N, G, D, dtype=torch.bfloat16)
    own = (torch.arange(N) // Bk).view(1, N, 1, 1)
    indices = torch.where(torch.arange(topk) == 0, own, -1).expand(B, N, G, topk).int().contiguous()
    counted = (lambda mask: (mask.sum(), type("Done", (), {"synchronize": lambda self: None})()))
    log = tmp_path / "kernels.jsonl"
    with collect_kernels(str(log), gpu="NVIDIA H100 80GB HBM3"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(kv_outer, "_count_to_host", counted)
        kv_outer.sparse_attention_forward(q, k, k, indices, Bk, fused_prep=False, tile_config=dict(listed=False))
    tiles = [json.loads(line) for line in log.read_text().splitlines() if ":tile_attention_program" in line]
    assert len(tiles) == 1 and "listed" not in tiles[0]["config"]
