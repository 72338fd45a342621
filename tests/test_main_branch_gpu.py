"""Main-branch kernels (scheduler, KV-outer attention, LSE combine) against the float64 reference (`pytest -m gpu`)."""

import math

import pytest
import torch
import torch.nn.functional as F

from msa_tl import reference as R
from msa_tl.checks import LSE_ATOL, OUTPUT_RTOL, assert_attention_matches_reference, relative_error

pytestmark = pytest.mark.gpu


def selection(kind, B, N, G, Bk, topk):
    """Valid block selections [B, N, G, topk] int32 on the GPU, slot order shuffled, -1 in unused slots."""
    nblk = math.ceil(N / Bk)
    if kind == "random":
        scores = torch.randn(B, G, N, nblk, dtype=torch.float64)
    else:
        blk = torch.arange(nblk, dtype=torch.float64)
        local = (torch.arange(N) // Bk)[:, None].double()
        if kind == "realistic":  # first block, the few blocks before the local one, a stripe every 8 blocks
            base = 3.0 * (blk == 0) + 2.0 * ((local - blk >= 1) & (local - blk <= 3)) + 1.0 * (blk % 8 == 5)
        elif kind == "hot":  # every query picks block 0 (then its neighbours)
            base = 10.0 * (blk == 0) - 0.01 * (local - blk)
        else:
            raise ValueError(kind)
        scores = (base + 1e-3 * torch.rand(N, nblk, dtype=torch.float64)).expand(B, G, N, nblk).contiguous()
    indices = R.topk_blocks(scores, topk, Bk)
    shuffled = torch.stack([row[torch.randperm(topk)] for row in indices.view(-1, topk)]).view_as(indices)
    return shuffled.cuda()


def attention_inputs(B, N, Hq, G, D):
    return [torch.randn(B, N, h, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, G, G)]


def forward_of(path):
    from msa_tl.attention.kv_outer import sparse_attention_forward
    from msa_tl.attention.q_outer import q_outer_attention_forward

    return {"kv_outer": sparse_attention_forward, "q_outer": q_outer_attention_forward}[path]


def assert_matches_reference_with_empty_rows(o, lse, q, k, v, indices, Bk):
    """As assert_attention_matches_reference, where some (query, head) rows have nothing to attend to: those get
    o = 0 and lse = -inf, the rest the reference's values. Returns the empty rows [B, N, Hq]."""
    ref_o, ref_lse = R.sparse_attention(q, k, v, indices, Bk)
    empty = torch.isneginf(ref_lse)
    assert torch.isneginf(lse[empty]).all() and (o[empty] == 0).all()
    assert relative_error(o[~empty], ref_o[~empty]) <= OUTPUT_RTOL
    assert (lse[~empty].double() - ref_lse[~empty]).abs().max().item() <= LSE_ATOL
    return empty


def check_against_reference(q, k, v, indices, Bk, path="kv_outer", **kw):
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    forward_of(path)(q, k, v, indices, Bk, out=o, lse_out=lse, **kw)
    assert_attention_matches_reference(o, lse, q, k, v, indices, Bk)
    return o, lse


@pytest.mark.parametrize("path", ["kv_outer", "q_outer"])
@pytest.mark.parametrize("kind", ["random", "realistic", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,D,Bk,topk", [(1, 2125, 64, 4, 128, 128, 16), (2, 1000, 16, 2, 64, 64, 8)],
                         ids=["paper-ragged", "b2-Bk64"])
def test_main_branch_matches_reference(path, kind, B, N, Hq, G, D, Bk, topk):
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection(kind, B, N, G, Bk, topk), Bk, path=path)


@pytest.mark.parametrize("config", [dict(tma_stores=False), dict(pingpong=False), dict(tma_stores=False, pingpong=False),
                                    dict(tma_gathers=False), dict(stages=3, o_buffers=1),
                                    dict(tma_gathers=False, o_buffers=1), dict(tma_stores=False, direct_stores=True),
                                    dict(tma_stores=False, direct_stores=True, stages=4),
                                    dict(tma_stores=False, direct_stores=True, pingpong=False, consumers=1)],
                         ids=["thread-stores", "no-pingpong", "thread-stores-no-pingpong", "cp-async-gathers",
                              "3-stages-one-o-tile", "cp-async-gathers-one-o-tile", "direct-stores",
                              "direct-stores-4-stages", "one-consumer-two-ctas"])
@pytest.mark.parametrize("kind", ["random", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,D,Bk,topk,partial_dtype", [(1, 2125, 64, 4, 128, 128, 16, torch.bfloat16),
                                                             (2, 1000, 16, 2, 64, 64, 8, torch.float32)],
                         ids=["paper-ragged-bf16", "b2-Bk64-fp32"])
def test_forward_variants_match_reference(config, kind, B, N, Hq, G, D, Bk, topk, partial_dtype):
    """The forward's non-default knobs: 16-byte thread stores instead of TMA boxes, consumers not taking turns, Q
    and K/V by 128 threads' cp.async instead of TMA, one O tile a consumer (with a third ring stage), the rows
    stored straight from the registers (no O tile; then a fourth ring stage fits), one consumer a CTA and two CTAs
    an SM."""
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection(kind, B, N, G, Bk, topk), Bk, partial_dtype=partial_dtype,
                            attention_config=config)


@pytest.mark.parametrize("config", [dict(persistent=True), dict(persistent=True, ctas=3),
                                    dict(persistent=True, ctas=3, pingpong=False)],
                         ids=["one-an-sm", "3-ctas", "3-ctas-no-pingpong"])
@pytest.mark.parametrize("kind", ["random", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,D,Bk,topk,chunk", [(1, 2125, 64, 4, 128, 128, 16, None), (2, 1000, 16, 2, 64, 64, 8, 300),
                                                      (1, 1500, 32, 1, 128, 128, 8, 512)],
                         ids=["paper-ragged", "b2-Bk64-4-chunks", "one-kv-head-3-chunks"])
def test_persistent_attention_matches_reference(config, kind, B, N, Hq, G, D, Bk, topk, chunk):
    """persistent: a few CTAs take every work item in turn, loading the next item's K/V during this one; with
    2-3 CTAs each runs many items, so both K/V buffers, the ring's phases and the ping-pong turns wrap."""
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection(kind, B, N, G, Bk, topk), Bk, query_chunk=chunk,
                            attention_config=config)


@pytest.mark.parametrize("kind", ["random", "hot"])
def test_persistent_attention_with_thread_stores(kind):
    """The persistent kernel's 16-byte thread stores (its rows kept in dst_s), where they fit shared memory
    (64-dim heads and 64-key blocks; at 128 x 128 the kernel says it does not fit)."""
    B, N, Hq, G, D, Bk, topk = 2, 1000, 16, 2, 64, 64, 8
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection(kind, B, N, G, Bk, topk), Bk, query_chunk=300,
                            attention_config=dict(persistent=True, ctas=2, tma_stores=False))


@pytest.mark.parametrize("num_stages", [1, 3])
@pytest.mark.parametrize("Hq,G", [(8, 8), (32, 2), (64, 4)], ids=["R1", "R16", "R16-paper"])
def test_q_outer_gqa_ratios_and_stages(Hq, G, num_stages):
    B, N, D, Bk, topk = 2, 1100, 128, 64, 6
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection("random", B, N, G, Bk, topk), Bk, path="q_outer",
                            num_stages=num_stages)


@pytest.mark.parametrize("Hq,G", [(8, 8), (32, 1), (64, 4)], ids=["R1", "R32", "R16"])
def test_gqa_ratios_chunks_and_split_hot_blocks(Hq, G):
    """Small chunks and small work items force many chunks and hot-block splitting."""
    B, N, D, Bk, topk = 1, 1500, 64, 64, 4
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection("hot", B, N, G, Bk, topk), Bk, query_chunk=256, item_queries=48)


@pytest.mark.parametrize("path", ["kv_outer", "q_outer"])
def test_full_budget_equals_dense_attention(path):
    B, N, Hq, G, D, Bk = 1, 1024, 16, 4, 128, 128
    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection("random", B, N, G, Bk, N // Bk)
    o, _ = check_against_reference(q, k, v, indices, Bk, path=path)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True).transpose(1, 2)
    assert relative_error(o, dense) <= 1e-2


@pytest.mark.parametrize("kind", ["random", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,Bk,topk", [(1, 1500, 32, 2, 128, 8), (2, 700, 16, 2, 64, 6)],
                         ids=["Bk128-as-halves", "b2-Bk64"])
def test_wide_heads_forward_matches_reference(kind, B, N, Hq, G, Bk, topk):
    """Head dim 256: each 128-key block runs as its two 64-key halves (a half in the query's future dropped), the
    rows leave by direct stores; outputs and LSE against the float64 reference over the original blocks."""
    q, k, v = attention_inputs(B, N, Hq, G, 256)
    check_against_reference(q, k, v, selection(kind, B, N, G, Bk, topk), Bk)


@pytest.mark.parametrize("partial_dtype", [torch.float16, torch.bfloat16], ids=["fp16-partials", "bf16-partials"])
def test_direct_stores_pack_the_partials_dtype(partial_dtype):
    """fp16 inputs with direct stores: the helper packs the partials' own 16-bit format (fp16, or bf16 asked for)."""
    B, N, Hq, G, D, Bk, topk = 1, 1300, 32, 2, 128, 128, 8
    q, k, v = (t.half() for t in attention_inputs(B, N, Hq, G, D))
    check_against_reference(q, k, v, selection("random", B, N, G, Bk, topk), Bk, partial_dtype=partial_dtype,
                            attention_config=dict(tma_stores=False, direct_stores=True))


def test_wide_heads_run_the_forward_kernel_through_the_api():
    """D = 192 through msa_tl.sparse_attention: zero dims padded in up to 256 and the forward kernel (the backward's
    kernels take it too: tests/test_backward_gpu.py)."""
    import msa_tl
    from msa_tl.ops import dispatch

    B, N, Hq, G, D, Bk, topk = 1, 900, 16, 2, 192, 128, 4
    shape = dict(dtype=torch.bfloat16, heads=Hq, groups=G, head_dim=D, block_size=Bk, topk=topk)
    assert dispatch.kernel_for("sparse_attention", torch.device("cuda"), **shape) is not None
    assert dispatch.kernel_for("sparse_attention_backward", torch.device("cuda"), **shape) is not None
    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection("random", B, N, G, Bk, topk)
    o, lse = msa_tl.sparse_attention(q, k, v, indices, block_size=Bk, return_lse=True)
    assert_attention_matches_reference(o, lse, q, k, v, indices, Bk)


def test_fp32_partials():
    B, N, Hq, G, D, Bk, topk = 1, 777, 16, 2, 128, 128, 4
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection("random", B, N, G, Bk, topk), Bk, partial_dtype=torch.float32)


@pytest.mark.parametrize("tiled,tile_queries", [(False, None), (True, 1024), (True, 64)],
                         ids=["per-entry", "tiled", "tiled-64-queries"])
@pytest.mark.parametrize("kind", ["realistic", "random"])
@pytest.mark.parametrize("chunks,count", [(1, 512), (3, 644)], ids=["one-chunk", "three-chunks-ragged"])
def test_scheduler_builds_the_reverse_index(chunks, count, kind, tiled, tile_queries):
    """Chunk c of a build (queries t0 + c * chunk onwards, the last one ragged) lists every (query, slot) of
    its chunk under the block it chose, and its items cover each list once; with per-entry global atomics, or
    counted a tile of queries at a time in shared memory (64-query tiles: several a chunk, the last ragged)."""
    from msa_tl.attention.scheduler import TILE_QUERIES, Schedule

    B, N, G, Bk, topk, item_queries = 2, 900, 2, 64, 4, 40
    indices = selection(kind, B, N, G, Bk, topk)
    t0, chunk = 256, 512 if chunks == 1 else 224
    nblk = math.ceil(N / Bk)
    sched = Schedule(B, G, nblk, chunk, topk, item_queries, "cuda", chunks=chunks, tiled=tiled,
                     tile_queries=tile_queries or TILE_QUERIES)
    sched.entries.fill_(-7)
    sched.build(indices, t0, count)
    idx = indices.cpu()
    for part in range(chunks):
        items, n_items, entries = (x.cpu() for x in sched.part(part))
        rows = slice(part * B * G, (part + 1) * B * G)
        counts, offsets = sched.counts[rows].cpu(), sched.offsets[rows].cpu()
        first, last = t0 + part * chunk, min(t0 + (part + 1) * chunk, t0 + count)
        for b in range(B):
            for g in range(G):
                bg = b * G + g
                expected = {blk: [] for blk in range(nblk)}
                for t in range(first, last):
                    for s in range(topk):
                        if idx[b, t, g, s] >= 0:
                            expected[int(idx[b, t, g, s])].append((t - first) * topk + s)
                covered = 0
                for blk in range(nblk):
                    c, off = int(counts[bg, blk]), int(offsets[bg, blk])
                    assert c == len(expected[blk])
                    assert sorted(entries[bg, off:off + c].tolist()) == sorted(expected[blk])
                for i in range(int(n_items[bg])):
                    blk, start, length = items[bg, i].tolist()
                    assert 0 < length <= item_queries and offsets[bg, blk] <= start
                    assert start + length <= offsets[bg, blk] + counts[bg, blk]
                    covered += length
                assert covered == int(counts[bg].sum())
                assert int(n_items[bg]) <= sched.max_items


@pytest.mark.parametrize("kind", ["realistic", "hot", "random", "mixed"])
@pytest.mark.parametrize("B,N,Hq,G,D,Bk,topk", [(1, 2125, 64, 4, 128, 128, 16), (2, 1000, 16, 2, 64, 64, 8),
                                               (1, 1300, 8, 8, 128, 64, 4), (2, 777, 64, 1, 64, 128, 6)],
                         ids=["paper-ragged", "b2-Bk64", "R1-64-rows", "R64"])
def test_shared_tiles_run_q_outer_without_partials(kind, B, N, Hq, G, D, Bk, topk):
    """shared_tiles: tiles whose queries chose the same blocks (every tile when each key block's queries take
    its first query's row; for random rows only the first topk blocks', whose queries choose all they see;
    every other tile for mixed) are attended Q-outer and the rest KV-outer; together, the reference's output."""
    from msa_tl.attention.shared_tiles import sharing_tiles, tile_queries

    q, k, v = attention_inputs(B, N, Hq, G, D)
    per_query = selection("random" if kind == "mixed" else kind, B, N, G, Bk, topk).sort(dim=-1, descending=True).values
    first_of_block = torch.arange(N, device="cuda") // Bk * Bk
    per_block = per_query[:, first_of_block]  # valid for every query of the block: its blocks are all <= local
    if kind == "random":
        indices = per_query
    elif kind == "mixed":
        even = (torch.arange(N, device="cuda") // tile_queries(Hq // G, Bk) % 2 == 0)[None, :, None, None]
        indices = torch.where(even, per_block, per_query)
    else:
        indices = per_block
    indices = indices.contiguous()
    shared = sharing_tiles(indices, Hq // G, Bk).bool()  # [B, N // TQ, G]
    if kind == "random":  # only where every query chooses every block it sees (blocks < topk) are rows equal
        early = torch.arange(shared.shape[1], device="cuda") * tile_queries(Hq // G, Bk) // Bk < topk
        assert shared[:, early].all() and not shared.all()
    else:
        assert shared.any() and (kind != "mixed" or not shared.all())
    check_against_reference(q, k, v, indices, Bk, shared_tiles=True, query_chunk=512)


def test_few_shared_tiles_keep_the_persistent_combine():
    """Random rows share tiles only in the first topk blocks (queries that choose every block they see); where
    those own at most PERSISTENT_COMBINE_TILE_SHARE of the tiles, the persistent combine merges every row (the
    tiles' too, with no partials) and the tile kernel overwrites the tiles' rows after it."""
    from msa_tl.attention.kv_outer import PERSISTENT_COMBINE_TILE_SHARE
    from msa_tl.attention.shared_tiles import sharing_tiles

    B, N, Hq, G, D, Bk, topk = 1, 8500, 16, 2, 64, 64, 8
    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection("random", B, N, G, Bk, topk).sort(dim=-1, descending=True).values.contiguous()
    shared = sharing_tiles(indices, Hq // G, Bk)
    assert 0 < shared.sum() <= shared.numel() * PERSISTENT_COMBINE_TILE_SHARE
    check_against_reference(q, k, v, indices, Bk, query_chunk=1024)


@pytest.mark.parametrize("order", ["descending", "shuffled", "own-block-dropped"])
@pytest.mark.parametrize("roles,config", [(True, None), (True, dict(stages=3)), (True, dict(pingpong=False)),
                                          (True, dict(persistent=True)), (True, dict(persistent=True, ctas=3)),
                                          (True, "listed"), (False, None)],
                         ids=["producer-consumers", "producer-consumers-3-stages", "no-pingpong", "persistent",
                              "persistent-3-ctas", "listed-shuffled", "pipelined-loop"])
def test_both_tile_kernels_attend_the_shared_tiles(roles, config, order):
    """The hand-pipelined tile kernel (its rings 2 or 3 stages deep; the consumers taking turns or not; persistent,
    where 3 CTAs take ~340 tiles each, so both Q buffers and the rings' phases wrap; a CTA a listed triple, the list
    shuffled so that the triples of both batches and every KV head come in no order) and the plain one, alone, on
    every tile of a block-shared selection: blocks in descending order, shuffled (the own block anywhere, -1
    between), or without the own block (the first blocks' rows then have nothing: o = 0, lse = -inf)."""
    from msa_tl.attention.shared_tiles import list_shared_tiles, shared_tile_attention, sharing_tiles

    B, N, Hq, G, D, Bk, topk = 2, 1024, 64, 4, 128, 128, 8
    q, k, v = attention_inputs(B, N, Hq, G, D)
    per_query = selection("hot", B, N, G, Bk, topk).sort(dim=-1, descending=True).values
    per_block = per_query[:, torch.arange(0, N, Bk, device="cuda")]  # [B, N / Bk, G, topk]
    if order == "shuffled":  # one slot order a key block, so its tiles stay shared
        per_block = per_block.gather(-1, torch.rand(per_block.shape, device="cuda").argsort(-1))
    elif order == "own-block-dropped":
        own = torch.arange(N // Bk, device="cuda")[None, :, None, None]
        per_block = torch.where(per_block == own, -1, per_block)
    indices = per_block.repeat_interleave(Bk, dim=1).int().contiguous()
    shared = sharing_tiles(indices, Hq // G, Bk)
    assert shared.all()
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    listed = None
    if config == "listed":
        listed, count = list_shared_tiles(shared)
        assert count.tolist() == [shared.numel()]
        config, listed = None, listed[: shared.numel()]
        assert torch.equal(listed, torch.arange(shared.numel(), device="cuda", dtype=torch.int32))
        listed = listed[torch.randperm(listed.numel(), device="cuda")]
    shared_tile_attention(q, k, v, indices, shared, Bk, 1.0 / math.sqrt(D), o, lse, config=config, roles=roles,
                          listed=listed)
    if order == "own-block-dropped":
        empty = assert_matches_reference_with_empty_rows(o, lse, q, k, v, indices, Bk)  # [B, N, Hq]: block 0's rows
        assert empty[:, :Bk].all() and not empty[:, Bk:].any()
    else:
        assert_attention_matches_reference(o, lse, q, k, v, indices, Bk)


@pytest.mark.parametrize("roles", [True, False], ids=["producer-consumers", "pipelined-loop"])
def test_a_nan_query_reaches_its_own_rows_in_both_tile_kernels(roles):
    """A NaN in one query makes every score of its rows NaN, so their running max stays -inf: the softmax must let
    the NaN through (P = 0 only for masked keys), as dense attention does, and leave every other row exact."""
    from msa_tl.attention.shared_tiles import shared_tile_attention, sharing_tiles

    B, N, Hq, G, D, Bk, topk = 1, 512, 64, 4, 128, 128, 4
    q, k, v = attention_inputs(B, N, Hq, G, D)
    q[0, 300, 5, 7] = float("nan")
    per_query = selection("hot", B, N, G, Bk, topk).sort(dim=-1, descending=True).values
    indices = per_query[:, torch.arange(0, N, Bk, device="cuda")].repeat_interleave(Bk, dim=1).int().contiguous()
    shared = sharing_tiles(indices, Hq // G, Bk)
    assert shared.all()
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    shared_tile_attention(q, k, v, indices, shared, Bk, 1.0 / math.sqrt(D), o, lse, roles=roles)
    ref_o, ref_lse = R.sparse_attention(q, k, v, indices, Bk)
    poisoned = torch.isnan(ref_lse)
    assert poisoned.sum() == 1 and poisoned[0, 300, 5]
    assert torch.equal(torch.isnan(lse), poisoned) and torch.isnan(o[poisoned]).all()
    assert relative_error(o[~poisoned], ref_o[~poisoned]) <= OUTPUT_RTOL
    assert (lse[~poisoned].double() - ref_lse[~poisoned]).abs().max().item() <= LSE_ATOL


@pytest.mark.parametrize("config", [dict(store_warp=True), dict(store_warp=True, stages=3, o_buffers=1),
                                    dict(persistent=True, tma_gathers=True, ctas=3),
                                    dict(persistent=True, store_warp=True, ctas=3),
                                    dict(persistent=True, store_warp=True),
                                    dict(store_warp=True, consumers=3, pingpong=False, o_buffers=1)],
                         ids=["store-warp", "store-warp-one-o-tile", "persistent-tma-gathers-3-ctas",
                              "persistent-store-warp-3-ctas", "persistent-store-warp", "three-consumers"])
@pytest.mark.parametrize("kind", ["random", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,D,Bk,topk", [(1, 2125, 64, 4, 128, 128, 16), (2, 1000, 16, 2, 64, 64, 8)],
                         ids=["paper-ragged", "b2-Bk64"])
def test_a_store_warp_and_persistent_tma_gathers_give_the_same_partials(config, kind, B, N, Hq, G, D, Bk, topk):
    """store_warp: a producer warp issues the TMA partial stores and hands the O tiles back on mbarriers (per-item
    CTAs, or persistent ones whose O tiles and entries pass from item to item, or three consumers taking every third
    tile); the persistent kernel's TMA gathers.
    Outputs match the reference and, bit for bit, the default kernel's (every tile's arithmetic is the same)."""
    from msa_tl.attention.kv_outer import sparse_attention_forward

    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection(kind, B, N, G, Bk, topk)
    o, lse = check_against_reference(q, k, v, indices, Bk, attention_config=config, shared_tiles=False)
    ref_o, ref_lse = sparse_attention_forward(q, k, v, indices, Bk, shared_tiles=False)
    assert torch.equal(o, ref_o) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("config", [dict(combine_warps=True, store_warp=True),
                                    dict(combine_warps=True, store_warp=True, combine_stages=4),
                                    dict(combine_warps=True, store_warp=True, o_buffers=1, combine_stages=8),
                                    dict(combine_warps=True, store_warp=True, combine_prefetch=16)],
                         ids=["combine-warps", "combine-warps-4-stages", "combine-warps-one-o-tile-8-stages",
                              "combine-warps-prefetch-16"])
@pytest.mark.parametrize("kind", ["random", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,D,Bk,topk,chunk", [(1, 2125, 64, 4, 128, 128, 16, 512),
                                                      (2, 1000, 16, 2, 64, 64, 8, 300),
                                                      (1, 700, 64, 4, 128, 128, 16, 4096)],
                         ids=["paper-5-chunks", "b2-Bk64-4-chunks", "paper-one-chunk"])
def test_combine_warps_merge_the_previous_chunk(config, kind, B, N, Hq, G, D, Bk, topk, chunk):
    """combine_warps: each chunk's attention kernel merges the previous chunk's partials in two of its producer
    warps (its share of the chunk's queries split over its CTAs; the last chunk merged by the combine kernel).
    Outputs match the reference and the persistent combine's to one rounding (fast-math exp2 and log2 in the
    attention kernel), with shared tiles (whose rows the tiles then overwrite) and without, and again on the same
    buffers."""
    from msa_tl.attention.kv_outer import sparse_attention_forward

    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection(kind, B, N, G, Bk, topk)
    eps = torch.finfo(torch.bfloat16).eps
    for tiles in (False, True):
        o, lse = check_against_reference(q, k, v, indices, Bk, query_chunk=chunk, persistent_combine=True,
                                         attention_config=config, shared_tiles=tiles)
        line_o, line_lse = sparse_attention_forward(q, k, v, indices, Bk, query_chunk=chunk, persistent_combine=True,
                                                    shared_tiles=tiles, local_combine=False)
        assert ((o.float() - line_o.float()).abs() <= eps * line_o.float().abs() + 1e-6).all()
        assert torch.allclose(lse, line_lse, rtol=1e-6, atol=1e-6)
    again_o, again_lse = torch.full_like(o, float("nan")), torch.full_like(lse, float("nan"))
    sparse_attention_forward(q, k, v, indices, Bk, query_chunk=chunk, persistent_combine=True, attention_config=config,
                             out=again_o, lse_out=again_lse)
    assert torch.equal(again_o, o) and torch.equal(again_lse, lse)


def test_combine_warps_at_a_query_offset():
    """combine_warps in the build with a query offset (a context-parallel rank's chunk, t0 mid-block): the merged
    rows land at the chunk's own rows; the persistent combine's output to one rounding."""
    from msa_tl.attention.kv_outer import sparse_attention_forward

    B, Hq, G, D, Bk, topk, t0, C = 1, 64, 4, 128, 128, 16, 1000, 1125
    q, k, v = attention_inputs(B, t0 + C, Hq, G, D)
    indices = selection("random", B, t0 + C, G, Bk, topk)[:, t0:].contiguous()
    qc = q[:, t0:].contiguous()
    kw = dict(query_chunk=512, shared_tiles=False, persistent_combine=True, query_start=t0)
    o, lse = sparse_attention_forward(qc, k, v, indices, Bk, attention_config=dict(store_warp=True, combine_warps=True),
                                      **kw)
    line_o, line_lse = sparse_attention_forward(qc, k, v, indices, Bk, **kw)
    eps = torch.finfo(torch.bfloat16).eps
    assert ((o.float() - line_o.float()).abs() <= eps * line_o.float().abs() + 1e-6).all()
    assert torch.allclose(lse, line_lse, rtol=1e-6, atol=1e-6)


def test_combine_warps_merge_beside_a_kv_head_without_items():
    """A chunk in which one KV head has no work item (its rows chose no block): the previous chunk's rows of that
    head are merged by the grid's idle CTAs; rows without a block get o = 0, lse = -inf, as the combine gives."""
    from msa_tl.attention.kv_outer import sparse_attention_forward

    B, N, Hq, G, D, Bk, topk = 1, 1500, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection("random", B, N, G, Bk, topk)
    indices[:, 512:1024, 1] = -1  # chunk 1 of 3: no item of KV head 1, which must merge chunk 0's rows of head 1
    kw = dict(query_chunk=512, shared_tiles=False, persistent_combine=True, local_combine=False)
    o, lse = torch.full_like(q, float("nan")), torch.full(q.shape[:3], float("nan"), device="cuda")
    sparse_attention_forward(q, k, v, indices, Bk, attention_config=dict(store_warp=True, combine_warps=True),
                             out=o, lse_out=lse, **kw)
    empty = torch.zeros(q.shape[:3], dtype=torch.bool, device="cuda")
    empty[:, 512:1024, 16:32] = True
    assert (o[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    ref_o, ref_lse = R.sparse_attention(q, k, v, indices, Bk)
    assert relative_error(o[~empty], ref_o[~empty]) <= OUTPUT_RTOL
    assert (lse[~empty].double() - ref_lse[~empty]).abs().max().item() <= LSE_ATOL
    line_o, line_lse = sparse_attention_forward(q, k, v, indices, Bk, **kw)
    eps = torch.finfo(torch.bfloat16).eps
    assert ((o.float() - line_o.float()).abs() <= eps * line_o.float().abs() + 1e-6).all()
    assert torch.equal(lse[empty], line_lse[empty])
    assert torch.allclose(lse[~empty], line_lse[~empty], rtol=1e-6, atol=1e-6)


def test_combine_warps_pass_a_nan_score_to_its_rows_only():
    """A NaN in one query's Q reaches, through the combine warps, exactly the rows whose partials hold it (its
    query's heads of that KV head), as the combine kernel's merge does."""
    from msa_tl.attention.kv_outer import sparse_attention_forward

    B, N, Hq, G, D, Bk, topk = 1, 1500, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    q[0, 300, 5, 7] = float("nan")  # query 300 (chunk 0 of 3: merged by chunk 1's attention), head 5 (KV head 0)
    indices = selection("random", B, N, G, Bk, topk)
    o, lse = sparse_attention_forward(q, k, v, indices, Bk, query_chunk=512, shared_tiles=False,
                                      attention_config=dict(combine_warps=True, store_warp=True))
    line_o, line_lse = sparse_attention_forward(q, k, v, indices, Bk, query_chunk=512, shared_tiles=False,
                                                local_combine=False)
    assert torch.equal(torch.isnan(lse), torch.isnan(line_lse)) and torch.isnan(lse[0, 300, 5])
    assert torch.equal(torch.isnan(o), torch.isnan(line_o))
    assert torch.isnan(lse).sum() == 1


def test_combine_warps_say_what_they_need():
    from msa_tl.attention.kv_outer import sparse_attention_forward

    q, k, v = attention_inputs(1, 300, 64, 4, 128)
    indices = selection("random", 1, 300, 4, 128, 16)
    with pytest.raises(ValueError, match="combine_ctas: the attention's combine warps"):
        sparse_attention_forward(q, k, v, indices, 128, query_chunk=128, combine_ctas=8,
                                 attention_config=dict(combine_warps=True, store_warp=True))
    with pytest.raises(ValueError, match="combine_warps: per-item CTAs with the store warp"):
        sparse_attention_forward(q, k, v, indices, 128, query_chunk=128, attention_config=dict(combine_warps=True))
    with pytest.raises(ValueError, match="combine_warps: per-item CTAs"):
        sparse_attention_forward(q, k, v, indices, 128, query_chunk=128,
                                 attention_config=dict(combine_warps=True, store_warp=True, persistent=True))


@pytest.mark.parametrize("build_once", [True, False], ids=["built-once", "built-per-chunk"])
def test_a_schedule_built_once_for_every_chunk(build_once):
    """build_once (the default): one schedule build for all query chunks (the last ragged), or one build per
    chunk, gives the reference's output."""
    B, N, Hq, G, D, Bk, topk = 2, 1700, 16, 2, 128, 64, 8
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection("random", B, N, G, Bk, topk), Bk, query_chunk=384,
                            build_once=build_once)


@pytest.mark.parametrize("B,N,Hq,G,D,Bk,topk,chunk", [(1, 2125, 64, 4, 128, 128, 16, 512), (2, 1000, 16, 2, 64, 64, 8, 300),
                                                      (1, 900, 32, 1, 128, 128, 8, 256), (1, 700, 8, 8, 64, 64, 4, 700),
                                                      (2, 777, 32, 2, 128, 64, 6, 256)],
                         ids=["paper-5-chunks", "b2-Bk64-4-chunks", "one-kv-head-4-chunks", "ratio1-8-pairs",
                              "topk6-3-chunks"])
@pytest.mark.parametrize("ctas", [3, None], ids=["3-ctas", "one-an-sm"])
@pytest.mark.parametrize("kind", ["random", "hot"])
def test_persistent_combine_matches_the_combine(kind, ctas, B, N, Hq, G, D, Bk, topk, chunk):
    """persistent_combine: the merge by a few persistent CTAs streaming whole (query, KV head) pairs gives the
    reference's output and the per-row combine's, to one rounding (its weights are summed as a tree)."""
    from msa_tl.attention.kv_outer import sparse_attention_forward

    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection(kind, B, N, G, Bk, topk)
    o, lse = check_against_reference(q, k, v, indices, Bk, query_chunk=chunk, persistent_combine=True,
                                     persistent_combine_config=dict(ctas=ctas), local_combine=False)
    rows_o, rows_lse = sparse_attention_forward(q, k, v, indices, Bk, query_chunk=chunk, persistent_combine=False,
                                                local_combine=False)
    eps = torch.finfo(torch.bfloat16).eps
    assert ((o.float() - rows_o.float()).abs() <= eps * rows_o.float().abs() + 1e-6).all()
    assert torch.allclose(lse, rows_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("B,N,Hq,G,D,Bk,topk,chunk", [(1, 2125, 64, 4, 128, 128, 16, 256),
                                                      (2, 1000, 16, 2, 64, 64, 8, 300)],
                         ids=["paper-9-chunks", "b2-Bk64-4-chunks"])
@pytest.mark.parametrize("ctas", [3, 16])
@pytest.mark.parametrize("kind", ["random", "hot"])
def test_overlapped_combine_matches_the_combine_in_line(kind, ctas, B, N, Hq, G, D, Bk, topk, chunk):
    """combine_ctas: each chunk's combine on a side stream beside the next chunk's attention (partials
    double-buffered) gives the reference's output and bit for bit the in-line persistent combine's, also where
    a run of it follows one in line on the same buffers."""
    from msa_tl.attention.kv_outer import sparse_attention_forward

    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection(kind, B, N, G, Bk, topk)
    o, lse = check_against_reference(q, k, v, indices, Bk, query_chunk=chunk, persistent_combine=True,
                                     combine_ctas=ctas, shared_tiles=False)
    line_o, line_lse = sparse_attention_forward(q, k, v, indices, Bk, query_chunk=chunk, persistent_combine=True,
                                                combine_ctas=0, shared_tiles=False, local_combine=False)
    assert torch.equal(o, line_o) and torch.equal(lse, line_lse)
    again_o, again_lse = torch.full_like(o, float("nan")), torch.full_like(lse, float("nan"))
    sparse_attention_forward(q, k, v, indices, Bk, query_chunk=chunk, combine_ctas=ctas, shared_tiles=False,
                             out=again_o, lse_out=again_lse)
    assert torch.equal(again_o, o) and torch.equal(again_lse, lse)


def test_overlapped_combine_beside_the_persistent_attention():
    """combine_ctas with the persistent attention: the attention takes the SMs the combine leaves (its CTA count
    less the combine's); bit for bit the in-line forward's output."""
    from msa_tl.attention.kv_outer import sparse_attention_forward

    B, N, Hq, G, D, Bk, topk = 1, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection("random", B, N, G, Bk, topk)
    o, lse = check_against_reference(q, k, v, indices, Bk, query_chunk=512, combine_ctas=16, shared_tiles=False,
                                     attention_config=dict(persistent=True, store_warp=True))
    line_o, line_lse = sparse_attention_forward(q, k, v, indices, Bk, query_chunk=512, shared_tiles=False,
                                                local_combine=False)
    assert torch.equal(o, line_o) and torch.equal(lse, line_lse)


def test_overlapped_combine_needs_the_persistent_combine():
    from msa_tl.attention.kv_outer import sparse_attention_forward

    q, k, v = attention_inputs(1, 300, 16, 2, 64)
    indices = selection("random", 1, 300, 2, 64, 8)
    with pytest.raises(ValueError, match="combine_ctas: the overlapped combine is the persistent one"):
        sparse_attention_forward(q, k, v, indices, 64, query_chunk=128, persistent_combine=False, combine_ctas=8)
    with pytest.raises(ValueError, match="combine_ctas: the accumulators have no combine"):
        sparse_attention_forward(q, k, v, indices, 64, accumulate=True, combine_ctas=8)


def test_persistent_combine_says_when_its_ring_does_not_fit():
    from msa_tl.attention.kv_outer import sparse_attention_forward

    q, k, v = attention_inputs(1, 300, 64, 4, 128)
    with pytest.raises(ValueError, match="persistent_combine: 3 stages"):
        sparse_attention_forward(q, k, v, selection("random", 1, 300, 4, 128, 16), 128, partial_dtype=torch.float32,
                                 persistent_combine=True)


def test_msa_attention_trains_forward_on_kernels_backward_on_the_custom_op():
    import msa_tl
    from msa_tl.ops.dispatch import kernel_status

    assert kernel_status(torch.device("cuda"))["sparse_attention"] == "tilelang"
    B, N, Hq, G, D = 1, 1300, 16, 4, 128
    q, k, v = attention_inputs(B, N, Hq, G, D)
    q_idx = torch.randn(B, N, G, 128, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(B, N, 128, device="cuda", dtype=torch.bfloat16)
    o, lse, indices = msa_tl.msa_attention(q, k, v, q_idx, k_idx, topk=4, return_lse=True, return_indices=True)
    ref_o, ref_lse = R.sparse_attention(q, k, v, indices, 128)
    assert relative_error(o, ref_o) <= 1e-2
    q.requires_grad_(True)
    do = torch.randn_like(o)
    msa_tl.msa_attention(q, k, v, q_idx, k_idx, topk=4).backward(do)
    ref_dq = R.sparse_attention_backward(do, None, q.detach(), k, v, indices, 128)[0]
    assert relative_error(q.grad, ref_dq) <= 2e-2


def test_hostile_indices_follow_the_set_contract():
    """Any int32 ids through the API: future blocks, ids past the end and repeats follow the reference's set
    semantics (causality holds whatever the indices say); a row with no visible block gives o = 0, lse = -inf."""
    import msa_tl

    B, N, Hq, G, D, Bk, topk = 1, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    nblk = math.ceil(N / Bk)
    raw = torch.randint(-1, nblk + 3, (B, N, G, topk), dtype=torch.int32, device="cuda")
    raw[:, ::7, :, 1] = raw[:, ::7, :, 0]
    raw[:, 3::11] = -1
    o, lse = msa_tl.sparse_attention(q, k, v, raw, block_size=Bk, return_lse=True)
    empty = assert_matches_reference_with_empty_rows(o, lse, q, k, v, raw, Bk)
    assert empty[:, 3::11].all() and not empty.all()


def test_a_nan_key_reaches_every_row_that_attends_to_it():
    """As in dense attention, a NaN score makes the rows that see it NaN; the kernels must not drop it."""
    B, N, Hq, G, D, Bk, topk = 1, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    k[0, 700, 1, 5] = float("nan")
    indices = selection("random", B, N, G, Bk, topk)
    from msa_tl.attention.kv_outer import sparse_attention_forward

    o, lse = sparse_attention_forward(q, k, v, indices, Bk)
    ref_o, ref_lse = R.sparse_attention(q, k, v, indices, Bk)
    poisoned = torch.isnan(ref_lse)
    assert poisoned.any() and not poisoned.all()
    assert torch.equal(torch.isnan(lse), poisoned) and torch.isnan(o[poisoned]).all()
    assert relative_error(o[~poisoned], ref_o[~poisoned]) <= OUTPUT_RTOL


@pytest.mark.parametrize("kind", ["random", "realistic", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,D,Bk,topk,config", [
    (1, 2125, 64, 4, 128, 128, 16, None), (2, 1000, 16, 2, 64, 64, 8, dict(query_chunk=300)),
    (1, 2125, 64, 4, 128, 128, 16, dict(query_chunk=1000, item_queries=128, stages=1)),
    (1, 1500, 32, 1, 128, 128, 8, dict(query_chunk=512, item_queries=512))],
    ids=["paper-ragged", "b2-Bk64-R8-unaligned-chunks", "paper-1-stage-small-items", "one-kv-head-R32"])
def test_accumulated_forward_matches_reference(kind, B, N, Hq, G, D, Bk, topk, config):
    """Each block's P V added into per-query fp32 accumulators against the own block's max (no partials): chunks
    that do not start at a block boundary, items of 128-512 queries, one and two ring stages, R = 8-32."""
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection(kind, B, N, G, Bk, topk), Bk, accumulate=True,
                            accumulate_config=config, shared_tiles=False)


def test_accumulated_forward_beside_shared_tiles():
    """Shared tiles own some rows (realistic selections), the accumulators the rest."""
    B, N, Hq, G, D, Bk, topk = 1, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection("realistic", B, N, G, Bk, topk), Bk, accumulate=True)


def test_accumulated_forward_recomputes_rows_past_its_fp32_range():
    """A far block whose scores exceed a query's own block's max by far more than 44 nats: those (query, KV head)
    rows are flagged and recomputed on the partials path, so the output still equals the reference; a row that
    left its own block out and chose only blocks far below it is flagged by the finalize (underflow)."""
    from msa_tl.ops.validation import canonical_indices

    B, N, Hq, G, D, Bk, topk = 1, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    k[:, :Bk] *= 60  # block 0: scores ~60x the others'
    indices = selection("random", B, N, G, Bk, topk)
    o, lse = check_against_reference(q, k, v, indices, Bk, accumulate=True, shared_tiles=False)
    assert torch.isfinite(o).all()
    own = (torch.arange(N, device="cuda") // Bk).view(1, N, 1, 1)
    k2 = k.clone()
    k2[:, :Bk] /= 60
    k2[:, 10 * Bk:11 * Bk] *= 60  # block 10's queries: an own-block max ~60x their other blocks' scores
    no_own = canonical_indices(torch.where(indices == own, -1, indices), Bk)  # block 0's queries: nothing left
    from msa_tl.attention.kv_outer import sparse_attention_forward

    o, lse = sparse_attention_forward(q, k2, v, no_own, Bk, accumulate=True, shared_tiles=False)
    empty = assert_matches_reference_with_empty_rows(o, lse, q, k2, v, no_own, Bk)
    assert empty[:, :Bk].all() and not empty[:, Bk:].any()


@pytest.mark.parametrize("where", ["other-block", "own-block"])
@pytest.mark.parametrize("path", ["accumulated", "local_combine"])
def test_the_own_block_paths_keep_a_nan_key(path, where):
    """A NaN key makes exactly the rows that attend to it NaN, whether it sits in a block the rows add in (or whose
    partial they merge) or in their own block (whose max every other block is taken against, or which the local
    combine attends)."""
    B, N, Hq, G, D, Bk, topk = 1, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    k[0, 700 if where == "other-block" else 1910, 1, 5] = float("nan")
    indices = selection("random", B, N, G, Bk, topk)
    from msa_tl.attention.kv_outer import sparse_attention_forward

    kw = dict(accumulate=True) if path == "accumulated" else dict(local_combine=True)
    o, lse = sparse_attention_forward(q, k, v, indices, Bk, shared_tiles=False, **kw)
    ref_o, ref_lse = R.sparse_attention(q, k, v, indices, Bk)
    poisoned = torch.isnan(ref_lse)
    assert poisoned.any() and not poisoned.all()
    assert torch.equal(torch.isnan(lse), poisoned) and torch.isnan(o[poisoned]).all()
    assert relative_error(o[~poisoned], ref_o[~poisoned]) <= OUTPUT_RTOL


def test_accumulated_forward_follows_the_set_contract():
    """Hostile ids made canonical (rows without their own block, empty rows) through the accumulators."""
    from msa_tl.attention.kv_outer import sparse_attention_forward
    from msa_tl.ops.validation import canonical_indices

    B, N, Hq, G, D, Bk, topk = 1, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    nblk = math.ceil(N / Bk)
    raw = torch.randint(-1, nblk + 3, (B, N, G, topk), dtype=torch.int32, device="cuda")
    raw[:, 3::11] = -1
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    indices = canonical_indices(raw, Bk)
    sparse_attention_forward(q, k, v, indices, Bk, accumulate=True, shared_tiles=False, out=o, lse_out=lse)
    empty = assert_matches_reference_with_empty_rows(o, lse, q, k, v, indices, Bk)
    assert empty[:, 3::11].all() and not empty.all()


@pytest.mark.parametrize("kind", ["random", "realistic", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,D,Bk,topk,kw", [
    (1, 2125, 64, 4, 128, 128, 16, dict()),
    (2, 1000, 16, 2, 64, 64, 8, dict(query_chunk=300)),
    (1, 2125, 64, 4, 128, 128, 16, dict(query_chunk=1000, attention_config=dict(store_warp=True, persistent=True))),
    (1, 1500, 32, 4, 128, 128, 6, dict(query_chunk=512)),
    (2, 1000, 16, 2, 64, 64, 8, dict(query_chunk=300, local_combine_config=dict(tma_o=False))),
    (1, 2125, 64, 4, 128, 128, 16, dict(query_chunk=1000, local_combine_config=dict(pdl=True),
                                        attention_config=dict(store_warp=True, persistent=True, pdl=True)))],
    ids=["paper-ragged", "b2-Bk64-R8-unaligned-chunks", "paper-persistent-store-warp-unaligned", "R8-topk6",
         "b2-Bk64-R8-unaligned-chunks-direct-o", "paper-persistent-store-warp-unaligned-pdl"])
def test_local_combine_matches_reference(kind, B, N, Hq, G, D, Bk, topk, kw):
    """The own blocks left out of the KV-outer items and attended in the combine (no partial for them): chunks that
    do not start at a block boundary, R = 8 and 16, 8 and 16 slots, beside the persistent store-warp attention; O
    from the registers as well as through shared memory; the chunks' attention and local combine launched as
    programmatic dependents (3 chunks: each kernel's reads wait for the one ahead, whose partials it reads or
    overwrites)."""
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection(kind, B, N, G, Bk, topk), Bk, local_combine=True, shared_tiles=False,
                            **kw)


@pytest.mark.parametrize("tma_o", [False, True], ids=["direct-o", "tma-o"])
def test_local_combine_beside_shared_tiles(tma_o):
    """Shared tiles own some rows (realistic selections, their own blocks included), the local combine the rest
    (with TMA stores of O, a shared tile's rows are not in any box it writes)."""
    B, N, Hq, G, D, Bk, topk = 1, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    check_against_reference(q, k, v, selection("realistic", B, N, G, Bk, topk), Bk, local_combine=True,
                            local_combine_config=dict(tma_o=tma_o))


@pytest.mark.parametrize("tma_o", [False, True], ids=["direct-o", "tma-o"])
def test_local_combine_follows_the_set_contract(tma_o):
    """Hostile ids made canonical: rows that left their own block out (a NaN in it must not reach them), rows with
    nothing left (o = 0, lse = -inf), and a row whose one visible own key is the NaN (it must reach that row)."""
    from msa_tl.attention.kv_outer import sparse_attention_forward
    from msa_tl.ops.validation import canonical_indices

    B, N, Hq, G, D, Bk, topk = 1, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    nblk = math.ceil(N / Bk)
    raw = torch.randint(-1, nblk + 3, (B, N, G, topk), dtype=torch.int32, device="cuda")
    raw[:, 3::11] = -1
    indices = canonical_indices(raw, Bk)
    own = (torch.arange(N, device="cuda") // Bk).view(1, N, 1, 1)
    left_out = ~(indices == own).any(-1)  # [B, N, G]
    assert left_out.any() and not left_out.all()
    k2 = k.clone()
    t = int(left_out[0, :, 1].nonzero()[-1])  # a query of KV head 1 that left its own block out: NaN in that block
    k2[0, t // Bk * Bk, 1, 3] = float("nan")
    first = t // Bk * Bk  # the block's first query sees one key of its own block, the NaN one: a row max of -inf
    forced = first != t and first % 11 != 3 and t // Bk > 0
    if forced:  # it chooses its own block and block 0 (a partial)
        indices[0, first, 1] = -1
        indices[0, first, 1, :2] = torch.tensor([t // Bk, 0])
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    sparse_attention_forward(q, k2, v, indices, Bk, local_combine=True, local_combine_config=dict(tma_o=tma_o),
                             shared_tiles=False, out=o, lse_out=lse)
    ref_o, ref_lse = R.sparse_attention(q, k2, v, indices, Bk)
    poisoned = torch.isnan(ref_lse)
    assert not poisoned[0, t, Hq // G:2 * Hq // G].any()  # its rows never see the NaN
    assert not forced or poisoned[0, first, Hq // G:2 * Hq // G].all()
    assert torch.equal(torch.isnan(lse), poisoned)
    empty = torch.isneginf(ref_lse)
    assert empty[:, 3::11].all() and torch.isneginf(lse[empty]).all() and (o[empty] == 0).all()
    fine = ~(empty | poisoned)
    assert relative_error(o[fine], ref_o[fine]) <= OUTPUT_RTOL
    assert (lse[fine].double() - ref_lse[fine]).abs().max().item() <= LSE_ATOL


@pytest.mark.parametrize("kw,match", [
    (dict(accumulate=True), "not with the accumulators"), (dict(combine_ctas=8), "not with combine_ctas"),
    (dict(partial_dtype=torch.float32), "16-bit partials"),
    (dict(attention_config=dict(store_warp=True, combine_warps=True)), "not with combine warps")],
    ids=["accumulate", "combine-ctas", "fp32-partials", "combine-warps"])
def test_local_combine_says_what_it_cannot_run_with(kw, match):
    from msa_tl.attention.kv_outer import sparse_attention_forward

    q, k, v = attention_inputs(1, 256, 64, 4, 128)
    with pytest.raises(ValueError, match=match):
        sparse_attention_forward(q, k, v, selection("random", 1, 256, 4, 128, 16), 128, local_combine=True, **kw)


def tiled_selection(B, N, G, Bk, topk):
    """Every query of a key block chooses the same blocks in the same slots (its own, then the ones before it): whole
    tiles share their rows; a few rows are then changed so that some tiles do not."""
    own = (torch.arange(N, device="cuda") // Bk)[None, :, None, None]
    cand = own - torch.arange(topk, device="cuda")
    indices = torch.where(cand >= 0, cand, -1).expand(B, N, G, topk).int().contiguous()
    rows = torch.randint(0, N, (N // 50,), device="cuda")
    indices[:, rows, :, -1] = -1  # canonical still: the oldest block dropped
    return indices


@pytest.mark.parametrize("kind", ["random", "tiled", "hostile"])
@pytest.mark.parametrize("B,N,G,Bk,topk,R", [(1, 2125, 4, 128, 16, 16), (2, 1003, 2, 64, 6, 8), (1, 700, 3, 64, 4, 1)],
                         ids=["paper-ragged", "b2-R8-topk6", "R1-64-query-tiles"])
@pytest.mark.parametrize("tiles,local", [(True, False), (True, True), (False, True)],
                         ids=["tiles", "tiles-local", "local"])
@pytest.mark.parametrize("fused", [True, "warps"], ids=["thread-a-tile", "warp-a-tile"])
def test_the_fused_row_prep_matches_the_torch_ops(kind, B, N, G, Bk, topk, R, tiles, local, fused):
    """One launch (row_prep_program, a thread a tile, or row_prep_warps_program, a warp a tile) gives the same
    shared tiles, KV-outer indices and RowFlags, bit for bit."""
    from msa_tl.attention.row_prep import prepare_rows
    from msa_tl.ops.validation import canonical_indices

    if kind == "random":
        indices = selection("random", B, N, G, Bk, topk)
    elif kind == "tiled":
        indices = tiled_selection(B, N, G, Bk, topk)
    else:  # made canonical from any ids: rows without their own block, empty rows
        raw = torch.randint(-1, math.ceil(N / Bk) + 3, (B, N, G, topk), dtype=torch.int32, device="cuda")
        raw[:, 3::11] = -1
        indices = canonical_indices(raw, Bk)
    expected = prepare_rows(indices, R, Bk, tiles, local)
    got = prepare_rows(indices, R, Bk, tiles, local, fused=fused)
    for want, have in zip(expected, got):
        assert (want is None) == (have is None)
        if want is not None:
            assert have.dtype == want.dtype and torch.equal(have, want)
    if kind == "tiled" and tiles:
        assert got[0].any() and not got[0].all()


@pytest.mark.parametrize("kind", ["random", "tiled"])
@pytest.mark.parametrize("local_combine", [False, True], ids=["combine", "local-combine"])
@pytest.mark.parametrize("fused", [True, "warps"], ids=["thread-a-tile", "warp-a-tile"])
def test_the_forward_with_the_fused_row_prep_matches_reference(kind, local_combine, fused):
    B, N, Hq, G, D, Bk, topk = 1, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection("random", B, N, G, Bk, topk) if kind == "random" else tiled_selection(B, N, G, Bk, topk)
    check_against_reference(q, k, v, indices, Bk, fused_prep=fused, local_combine=local_combine)


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "every-triple"])
@pytest.mark.parametrize("kind", ["random", "tiled", "realistic"])
def test_the_shared_tiles_on_a_side_stream_match_reference(kind, listed):
    """tiles_stream: the shared tiles' kernel runs on its own stream beside the chunks (3 of them), writing rows the
    local combine leaves alone (listed: queued once the count is read, after the chunks; every triple: from the
    start, beside the schedule); the forward returns once both are done."""
    B, N, Hq, G, D, Bk, topk = 1, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = tiled_selection(B, N, G, Bk, topk) if kind == "tiled" else selection(kind, B, N, G, Bk, topk)
    check_against_reference(q, k, v, indices, Bk, local_combine=True, fused_prep=True, tiles_stream=True,
                            query_chunk=1000, tile_config=dict(listed=listed))


@pytest.mark.parametrize("local_combine", [True, False], ids=["local-combine", "partials"])
@pytest.mark.parametrize("kind", ["random", "tiled", "realistic"])
def test_the_forward_lists_its_shared_tiles(kind, local_combine):
    """The forward's tile kernel runs a CTA a listed shared (tile, KV head), the list built on the GPU and its
    length read back once the chunks are queued (few shared at random, some tiled, all realistic; two batches, so
    the list holds both): the same o and lse, bit for bit, as a CTA every triple (``tile_config=dict(listed=False)``),
    and the reference's. With the local combine and with the partials path (which reads the count first)."""
    from msa_tl.attention.kv_outer import sparse_attention_forward
    from msa_tl.attention.shared_tiles import list_shared_tiles, sharing_tiles

    B, N, Hq, G, D, Bk, topk = 2, 2125, 64, 4, 128, 128, 16
    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = tiled_selection(B, N, G, Bk, topk) if kind == "tiled" else selection(kind, B, N, G, Bk, topk)
    indices = indices.sort(dim=-1, descending=True).values.contiguous()
    shared = sharing_tiles(indices, Hq // G, Bk)
    assert shared.any()
    live = shared.transpose(1, 2).flatten().nonzero().flatten().int()
    listed, count = list_shared_tiles(shared)
    assert torch.equal(listed[: live.numel()], live) and count.tolist() == [live.numel()]
    kw = dict(local_combine=local_combine, query_chunk=1000)
    o, lse = check_against_reference(q, k, v, indices, Bk, **kw)
    o_all, lse_all = torch.full_like(o, float("nan")), torch.full_like(lse, float("nan"))
    sparse_attention_forward(q, k, v, indices, Bk, out=o_all, lse_out=lse_all, tile_config=dict(listed=False), **kw)
    assert torch.equal(o, o_all) and torch.equal(lse, lse_all)


def test_the_64_row_tiles_take_the_forwards_listed_knob():
    """A key block of fewer than 128 rows (R = 1 here) runs the plain tile kernel, which has no list: the
    forward's ``tile_config=dict(listed=False)`` is not one of its knobs and changes nothing."""
    B, N, Hq, G, D, Bk, topk = 1, 1000, 8, 8, 64, 64, 4
    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection("realistic", B, N, G, Bk, topk)
    o, lse = check_against_reference(q, k, v, indices, Bk, tile_config=dict(listed=False))
    o2, lse2 = check_against_reference(q, k, v, indices, Bk)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
