"""Every TileLang program lowers for sm_90a and compiles with nvcc on a machine without a GPU."""

import re
import shutil

import pytest

tilelang = pytest.importorskip("tilelang")

from msa_tl import kl_loss  # noqa: E402
from msa_tl.attention import accumulate  # noqa: E402
from msa_tl.attention import backward as kv_outer_backward  # noqa: E402
from msa_tl.attention import combine as lse_combine  # noqa: E402
from msa_tl.attention import kv_outer as kv_outer_attention  # noqa: E402
from msa_tl.attention import local_combine  # noqa: E402
from msa_tl.attention import q_outer as q_outer_attention  # noqa: E402
from msa_tl.attention import row_prep  # noqa: E402
from msa_tl.attention import scheduler, shared_tiles  # noqa: E402
from msa_tl.decode import attention as decode_attention  # noqa: E402
from msa_tl.decode import rescore as decode_rescore  # noqa: E402
from msa_tl.decode import scores as decode_scores  # noqa: E402
from msa_tl.decode import topk as decode_topk  # noqa: E402
from msa_tl.decode import union as decode_union  # noqa: E402
from msa_tl.index import scores as index_scores  # noqa: E402
from msa_tl.index import select as index_topk  # noqa: E402
from msa_tl.tl_compile import SMEM_LIMIT, compile_program, lower_to_cuda, sm90_target  # noqa: E402

PROGRAMS = [
    (index_scores.block_scores_program, dict(groups=4, index_dim=128, block_size=128, scale=0.125)),
    (index_scores.block_scores_program, dict(groups=1, index_dim=64, block_size=64, scale=0.125, dtype="float16")),
    (index_topk.topk_program, dict(groups=4, block_size=128, topk=16)),
    (index_topk.topk_program, dict(groups=8, block_size=64, topk=8)),
    (index_topk.fused_select_program, dict(groups=4, index_dim=128, block_size=128, topk=16)),
    (index_topk.fused_select_program, dict(groups=2, index_dim=64, block_size=64, topk=4)),
    (index_topk.pipelined_select_program, dict(groups=4, index_dim=128, block_size=128, topk=16)),
    (index_topk.pipelined_select_program, dict(groups=1, index_dim=64, block_size=128, topk=8)),  # 64 rows a consumer
    (index_topk.pipelined_select_program, dict(groups=4, index_dim=128, block_size=128, topk=16, offset=True)),
]
IDS = [f"{b.__name__}-{'-'.join(str(v) for v in c.values())}" for b, c in PROGRAMS]


@pytest.mark.parametrize("builder,config", PROGRAMS, ids=IDS)
def test_lowers_for_sm90a(builder, config):
    source = lower_to_cuda(builder, **config)
    assert "__global__" in source
    if builder is index_topk.pipelined_select_program:  # roles by hand: a cp.async ring on mbarriers, wgmma
        assert "wgmma" in source and "mbarrier_cp_async_arrive_noinc(full" in source and "warpgroup_reg_alloc" in source
    elif builder is not index_topk.topk_program:  # the GEMM programs must use Hopper tensor cores and TMA
        assert "wgmma" in source and "tma_load" in source


MAIN_PROGRAMS = [
    (scheduler.histogram_program, dict(groups=4, topk=16)),
    (scheduler.plan_program, dict(item_queries=4096)),
    (scheduler.scatter_program, dict(groups=4, topk=16)),
    (kv_outer_attention.kv_outer_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088)),
    (kv_outer_attention.kv_outer_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088,
                                               tma_gathers=True)),
    (kv_outer_attention.kv_outer_program, dict(groups=2, heads=16, head_dim=64, block_size=64, topk=8, scale=0.125,
                                               partial_dtype="float32", tma_gathers=True)),
    (kv_outer_attention.kv_outer_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088,
                                               tma_stores=False, pingpong=False)),
    (kv_outer_attention.kv_outer_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088,
                                               tma_stores=False, tma_gathers=True, direct_stores=True)),
    (kv_outer_attention.kv_outer_program, dict(groups=2, heads=16, head_dim=64, block_size=64, topk=8, scale=0.125,
                                               tma_stores=False, direct_stores=True, partial_dtype="float32")),
    (kv_outer_attention.kv_outer_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088,
                                               tma_stores=False, tma_gathers=True, direct_stores=True, pingpong=False,
                                               consumers=1)),
    (kv_outer_attention.kv_outer_program, dict(groups=2, heads=32, head_dim=256, block_size=64, topk=16, scale=0.0625,
                                               **kv_outer_attention.WIDE_HEAD_CONFIG, tma_gathers=True)),  # wide heads
    (lse_combine.combine_program, dict(heads=32, head_dim=256, topk=16, groups=2)),
    (lse_combine.combine_program, dict(heads=64, head_dim=128, topk=16, groups=4)),
    (lse_combine.persistent_combine_program, dict(heads=64, head_dim=128, topk=16, groups=4)),
    (lse_combine.persistent_combine_program, dict(heads=32, head_dim=128, topk=6, groups=2)),  # slots padded to 8
    (lse_combine.persistent_combine_program, dict(heads=8, head_dim=64, topk=4, groups=8, ctas=114, stages=4,
                                                  dtype="float16", partial_dtype="float16")),  # 8 pairs a stage
    (q_outer_attention.q_outer_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088)),
    (q_outer_attention.q_outer_program, dict(groups=8, heads=8, head_dim=64, block_size=64, topk=4, scale=0.125,
                                             num_stages=1, dtype="float16")),
    (kv_outer_attention.kv_outer_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088,
                                               persistent=True)),
    (kv_outer_attention.kv_outer_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088,
                                               persistent=True, store_eviction="evict_first")),
    (shared_tiles.tile_attention_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088)),
    (shared_tiles.tile_attention_program, dict(groups=8, heads=8, head_dim=64, block_size=64, topk=4, scale=0.125,
                                               dtype="float16")),  # R = 1: 64-row tiles
    (shared_tiles.tile_attention_roles_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16,
                                                     scale=0.088)),
    (shared_tiles.tile_attention_roles_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16,
                                                     scale=0.088, stages=3)),  # 224 KB of shared memory
    (shared_tiles.tile_attention_roles_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16,
                                                     scale=0.088, persistent=True)),
    (shared_tiles.tile_attention_roles_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16,
                                                     scale=0.088, listed=True)),
    (shared_tiles.tile_attention_roles_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16,
                                                     scale=0.088, listed=True, query_offset=True)),
    (shared_tiles.tile_attention_roles_program, dict(groups=2, heads=16, head_dim=64, block_size=64, topk=4,
                                                     scale=0.125, pingpong=False, dtype="float16")),
    (scheduler.tiled_histogram_program, dict(groups=4, topk=16, max_blocks=1024)),
    (scheduler.tiled_scatter_program, dict(groups=4, topk=16, max_blocks=16384)),  # 128 KB of counters
    (scheduler.staged_scatter_program, dict(groups=4, topk=16, max_blocks=1024)),
    (scheduler.staged_scatter_program, dict(groups=4, topk=16, max_blocks=8192)),  # 161 KB with the staging
    (accumulate.accumulate_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088)),
    (accumulate.accumulate_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088,
                                         init=True)),
    (accumulate.accumulate_program, dict(groups=2, heads=16, head_dim=64, block_size=64, topk=8, scale=0.125,
                                         stages=1, dtype="float16")),  # R = 8
    (accumulate.finalize_program, dict(heads=64, head_dim=128, groups=4, scale=0.088)),
    (row_prep.row_prep_program, dict(groups=4, topk=16, heads_per_group=16, block_size=128, tiles=True, local=True)),
    (row_prep.row_prep_program, dict(groups=8, topk=4, heads_per_group=1, block_size=64, tiles=True,
                                     local=False)),  # 64-query tiles
    (row_prep.row_prep_program, dict(groups=2, topk=6, heads_per_group=8, block_size=64, tiles=False, local=True)),
    (row_prep.row_prep_warps_program, dict(groups=4, topk=16, heads_per_group=16, block_size=128, tiles=True,
                                           local=True)),
    (row_prep.row_prep_warps_program, dict(groups=3, topk=4, heads_per_group=1, block_size=64, tiles=True,
                                           local=True)),  # 64-query tiles: 8 ids and 2 queries a lane, G = 3
    (row_prep.row_prep_warps_program, dict(groups=2, topk=6, heads_per_group=8, block_size=64, tiles=False,
                                           local=True)),
]


@pytest.mark.parametrize("builder,config", MAIN_PROGRAMS, ids=[b.__name__ for b, _ in MAIN_PROGRAMS])
def test_main_branch_programs_lower_for_sm90a(builder, config):
    source = lower_to_cuda(builder, **config)
    assert "__global__" in source
    if builder is accumulate.accumulate_program:  # sums leave as bulk reductions (copies for the own block)
        assert "wgmma" in source and "tl::tma_load(Q_desc, full[slot]" in source
        assert ("tl::tma_store_add(" in source) != config.get("init", False)
        assert ("tl::tma_store((&(Acc" in source) == config.get("init", False)
    if builder is kv_outer_attention.kv_outer_program:
        # tensor cores, and a producer whose Q gathers are cp.async signalled on mbarriers (a plain
        # load + store there would serialise the pipeline)
        assert "wgmma" in source and "warpgroup_reg_alloc" in source
        if config.get("tma_gathers"):  # one warp: K/V and each query's Q box by TMA, on the slots' mbarriers
            assert "tl::tma_load(Q_desc, full[slot]" in source and "tl::tma_load(K_desc, kv_ready[0]" in source
            assert "cp_async_gs_conditional" not in source
        else:
            assert "cp_async_gs_conditional<16>((&(((bfloat16_t*)ring)" in source
            assert "mbarrier_cp_async_arrive_noinc(full" in source
        tma_stores = config.get("tma_stores", kv_outer_attention.ATTENTION_DEFAULTS["tma_stores"])
        # partial boxes by TMA (with or without an L2 policy), else thread stores
        assert bool(re.search(r"tl::tma_store(<[^>]*>)?\(Opart_desc", source)) == tma_stores
        assert ("kv_free" in source) == config.get("persistent", False)  # K/V double-buffered across items
        # direct stores: the rows leave the registers through the inline helper; no O tile is written
        direct = config.get("direct_stores", False)
        assert ("msa_store_rows<" in source) == direct
        if config.get("consumers", 2) == 1:  # two 256-thread CTAs an SM, registers split 40 / 216 within each
            assert "__launch_bounds__(256, 2)" in source and "warpgroup_reg_alloc<216>" in source
            assert "acc_s1" not in source  # no second consumer
        if direct:
            assert "O_s0" not in source and "__sync_thread_partial(1, 128)" not in source  # no O tile to guard
        # the partial stores' L2 policy, only where asked for
        assert ("tma_store<tl::CacheHintSm90::EVICT_FIRST>" in source) == (config.get("store_eviction") == "evict_first")
    if builder is lse_combine.persistent_combine_program:  # whole pairs by TMA bulk copies into an mbarrier ring
        assert "tl::tma_load(" in source and "arrive_and_expect_tx" in source
    if builder is shared_tiles.tile_attention_program:  # the tile's rows on tensor cores
        assert "wgmma" in source
    if builder is shared_tiles.tile_attention_roles_program:  # cp.async K and V rings on mbarriers, registers split
        assert "wgmma" in source and "warpgroup_reg_alloc" in source
        assert "mbarrier_cp_async_arrive_noinc(full_k" in source and "mbarrier_cp_async_arrive_noinc(full_v" in source
        assert "mbarrier_cp_async_arrive_noinc(q_ready" in source  # Q gathered asynchronously too
        assert ("__named_barrier_arrive(4, 256)" in source) == config.get("pingpong", True)  # consumers take turns
    if builder is q_outer_attention.q_outer_program:
        # M = R rows: mma.sync; no warp-specialised TMA producer (it gave wrong rows at Bk = 64 on the H100)
        assert "mma_sync" in source and "mbarrier" not in source


BACKWARD_PROGRAMS = [
    (kv_outer_backward.delta_program, dict(head_dim=128)),
    (kv_outer_backward.kv_outer_backward_program,
     dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088)),
    (kv_outer_backward.kv_outer_backward_program,
     dict(groups=8, heads=8, head_dim=64, block_size=64, topk=4, scale=0.125, dq_partials=False, dtype="float16")),
    (kv_outer_backward.kv_outer_backward_program,  # head dim 256: the upper 128 columns of dQ, dK, dV
     dict(groups=2, heads=32, head_dim=256, block_size=64, topk=16, scale=0.0625, columns=128, column0=128,
          dq_partials=True)),
]


@pytest.mark.parametrize("builder,config", BACKWARD_PROGRAMS,
                         ids=["delta", "kv_outer_bwd-paper", "kv_outer_bwd-R1", "kv_outer_bwd-wide"])
def test_backward_programs_lower_for_sm90a(builder, config):
    source = lower_to_cuda(builder, **config)
    assert "__global__" in source
    if builder is kv_outer_backward.kv_outer_backward_program:  # a cp.async ring, wgmma, fp32 atomics for dK / dV
        assert "wgmma" in source and "AtomicAdd" in source and "mbarrier_cp_async_arrive_noinc(full" in source


KL_PROGRAMS = [
    (kl_loss.student_lse_program, dict(groups=4, index_dim=128, block_size=128, topk=16, index_scale=0.088)),
    (kl_loss.kl_fused_program, dict(groups=4, heads=64, head_dim=128, index_dim=128, block_size=128, topk=16,
                                    scale=0.088, index_scale=0.088)),
    (kl_loss.kl_fused_program, dict(groups=2, heads=4, head_dim=64, index_dim=64, block_size=64, topk=4,
                                    scale=0.125, index_scale=0.125, dtype="float16")),
    (kl_loss.kl_fused_program, dict(groups=4, heads=32, head_dim=128, index_dim=128, block_size=128, topk=8,
                                    scale=0.088, index_scale=0.088, mean_heads=7)),  # 28 heads padded to 32
    (kl_loss.kl_fused_program, dict(groups=2, heads=32, head_dim=256, index_dim=128, block_size=128, topk=8,
                                    scale=0.0625, index_scale=0.088)),  # head dim 256
]


@pytest.mark.parametrize("builder,config", KL_PROGRAMS, ids=["kl_student_lse-paper", "kl_fused-paper", "kl_fused-small",
                                                             "kl_fused-padded-R7", "kl_fused-wide"])
def test_kl_programs_lower_for_sm90a(builder, config):
    source = lower_to_cuda(builder, **config)
    assert "__global__" in source and "wgmma" in source
    if builder is kl_loss.kl_fused_program:  # a cp.async ring, wgmma, atomics for the loss terms and dq_idx / dk_idx
        assert "mbarrier_cp_async_arrive_noinc(full" in source and "AtomicAdd" in source


NVCC_PROGRAMS = [*PROGRAMS[::2], MAIN_PROGRAMS[3], MAIN_PROGRAMS[6], BACKWARD_PROGRAMS[1], KL_PROGRAMS[1]]
NVCC_IDS = [*IDS[::2], "kv_outer", "lse_combine", "kv_outer_backward", "kl_fused"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("builder,config", NVCC_PROGRAMS, ids=NVCC_IDS)
def test_compiles_with_nvcc(builder, config, tmp_path, monkeypatch):
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))  # a real nvcc run, not a cache hit
    assert "__global__" in compile_program(builder, config, target=sm90_target()).get_kernel_source()


def test_the_pipelined_select_names_a_key_block_too_small_for_two_consumers():
    with pytest.raises(ValueError, match="128 rows"):
        index_topk.pipelined_select_program(groups=1, index_dim=64, block_size=64, topk=8)


def test_the_tiled_scheduler_counts_in_power_of_two_buckets():
    """The tiled histogram / scatter are compiled per bucket of key blocks (so a sequence length does not cost a
    compile each); past MAX_TILED_BLOCKS the per-entry kernels run."""
    assert [scheduler.blocks_bucket(n) for n in (1, 256, 257, 1024, 1025, 16384)] == [256, 256, 512, 1024, 2048, 16384]
    assert 2 * 4 * scheduler.MAX_TILED_BLOCKS <= 227 * 1024  # the scatter's two counter arrays fit shared memory


def test_the_staged_scatter_runs_where_its_staging_fits():
    """The staged scatter holds a tile's entries and three block arrays in shared memory: at the paper shape up to
    8192 key blocks (1M tokens); a tile of 512-block choices, or 16384 blocks, take the per-entry stores, and
    asking for the staged program there names its shared memory."""
    assert scheduler.staged_scatter_fits(16, 1024) and scheduler.staged_scatter_fits(16, 8192)
    assert not scheduler.staged_scatter_fits(512, 512) and not scheduler.staged_scatter_fits(16, 16384)
    with pytest.raises(ValueError, match="staged scatter: .* B of shared memory"):
        scheduler.staged_scatter_program(groups=4, topk=16, max_blocks=16384)


def test_direct_stores_need_thread_stores_and_per_item_ctas():
    """direct_stores replaces the O tile: it cannot be combined with TMA stores (which read that tile) or the
    persistent kernel, and its 16-byte stores need whole quads of 8 columns."""
    with pytest.raises(ValueError, match="direct_stores: per-item CTAs with tma_stores=False"):
        kv_outer_attention.kv_outer_program(**PAPER, direct_stores=True)
    with pytest.raises(ValueError, match="direct_stores: per-item CTAs"):
        kv_outer_attention.kv_outer_program(**PAPER, tma_stores=False, persistent=True, direct_stores=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        kv_outer_attention.kv_outer_program(**dict(PAPER, head_dim=80), tma_stores=False, direct_stores=True)


def test_one_consumer_needs_tma_gathers_direct_stores_and_two_ctas_of_shared_memory():
    """consumers=1 (two CTAs an SM): its producer is one TMA warp, it has no O tile and no partner to take turns
    with, and two CTAs' shared memory must fit an SM."""
    one = dict(tma_stores=False, tma_gathers=True, direct_stores=True, pingpong=False, consumers=1)
    for knob, value in (("tma_gathers", False), ("direct_stores", False), ("pingpong", True)):
        with pytest.raises(ValueError, match="consumers=1"):
            kv_outer_attention.kv_outer_program(**PAPER, **dict(one, **{knob: value}))
    with pytest.raises(ValueError, match="two CTAs would not fit"):
        kv_outer_attention.kv_outer_program(**PAPER, **dict(one, stages=3))
    with pytest.raises(ValueError, match="consumers must be 1, 2 or 3"):
        kv_outer_attention.kv_outer_program(**PAPER, consumers=4)


def test_three_consumers_need_the_store_warp_per_item_without_ping_pong():
    """consumers=3: the store warp's per-item kernel only (a 512-thread CTA, registers 40 / 152), no ping-pong, and
    its shared memory must fit (two O tiles a consumer do not)."""
    three = dict(tma_gathers=True, store_warp=True, pingpong=False, consumers=3, o_buffers=1)
    for knob, value in (("pingpong", True), ("store_warp", False), ("persistent", True)):
        with pytest.raises(ValueError, match="consumers=3"):
            kv_outer_attention.kv_outer_program(**PAPER, **dict(three, **{knob: value}))
    with pytest.raises(ValueError, match="consumers=3: .* shared memory"):
        kv_outer_attention.kv_outer_program(**PAPER, **dict(three, o_buffers=2))


def test_direct_stores_transpose_gives_each_lane_eight_consecutive_columns():
    """The exchange the helper performs (msa_quad_exchange<1> then <2>), replayed on lists: it is a 4 x 4
    transpose, so lane t ends with word t of every lane s (columns 8 (4 a + t) + 2 s, + 1) and its 16-byte store
    holds 8 consecutive columns. The CUDA itself runs only in the GPU tests (direct-stores variants)."""
    def exchange(words, mask):  # words[lane][u], as msa_quad_exchange<mask>
        out = [row[:] for row in words]
        for lane in range(4):
            for u in range(4):
                if u & mask:
                    continue
                partner = lane ^ mask
                got = words[partner][u] if partner & mask else words[partner][u | mask]
                out[lane][u if lane & mask else u | mask] = got
        return out
    a = 1
    columns = [[(8 * (4 * a + u) + 2 * lane, 8 * (4 * a + u) + 2 * lane + 1) for u in range(4)] for lane in range(4)]
    stored = exchange(exchange(columns, 1), 2)
    for lane in range(4):
        assert [c for pair in stored[lane] for c in pair] == list(range(8 * (4 * a + lane), 8 * (4 * a + lane) + 8))
    source = kv_outer_attention.DIRECT_STORES_CUDA
    assert "msa_quad_exchange<1>(w, lane);" in source and "msa_quad_exchange<2>(w, lane);" in source


def test_tma_gathers_need_eight_heads_and_the_persistent_kernel_takes_them_when_asked():
    """A query's Q box by TMA must be whole 1 KB swizzle atoms (>= 8 rows); a persistent config loses the default's
    TMA gathers (its cp.async ones are the measured ones) unless they or the store warp are asked for."""
    assert kv_outer_attention.attention_defaults(16, 2)["tma_gathers"]
    assert not kv_outer_attention.attention_defaults(4, 2)["tma_gathers"]
    with pytest.raises(ValueError, match="tma_gathers needs"):
        kv_outer_attention.kv_outer_program(groups=8, heads=32, head_dim=64, block_size=64, topk=4, scale=0.125,
                                            tma_stores=False, tma_gathers=True)
    defaults = dict(kv_outer_attention.attention_defaults(16, 2), persistent=True)
    fitted = kv_outer_attention.without_unfit_persistent(defaults, dict(persistent=True), 16, 128, 128, 256, 2)
    assert fitted["persistent"] and not fitted["tma_gathers"]
    asked = dict(persistent=True, tma_gathers=True)
    assert kv_outer_attention.without_unfit_persistent(dict(defaults, **asked), asked, 16, 128, 128, 256, 2) == dict(
        defaults, **asked)
    warp = dict(persistent=True, store_warp=True)
    assert kv_outer_attention.without_unfit_persistent(dict(defaults, **warp), warp, 16, 128, 128, 256, 2)["tma_gathers"]


def test_tma_partial_stores_need_eight_heads_and_16_bit_partials():
    """A TMA box a query pays only with >= 8 rows; fp32 O tiles, double-buffered, overflow shared memory."""
    assert kv_outer_attention.attention_defaults(16, 2)["tma_stores"]
    assert not kv_outer_attention.attention_defaults(4, 2)["tma_stores"]
    assert not kv_outer_attention.attention_defaults(16, 4)["tma_stores"]
    with pytest.raises(ValueError, match="TMA box"):
        kv_outer_attention.kv_outer_program(groups=8, heads=8, head_dim=64, block_size=64, topk=4, scale=0.125,
                                            tma_stores=True)


def test_a_persistent_default_is_dropped_only_where_its_two_kv_blocks_do_not_fit():
    """without_unfit_persistent turns a default or tuned persistent kernel off where its shared memory (two K/V
    blocks, the ring, the entries of the item size) would not fit, so such a config never fails to build."""
    fit = kv_outer_attention.without_unfit_persistent
    bf16 = dict(kv_outer_attention.attention_defaults(16, 2), persistent=True)
    assert fit(bf16, None, 16, 128, 128, 256, 2)["persistent"]  # 227 KB exactly
    assert not fit(bf16, None, 16, 128, 128, 512, 2)["persistent"]  # 2 KB more of entries
    fp32 = dict(kv_outer_attention.attention_defaults(16, 4), persistent=True)
    assert not fit(fp32, None, 16, 128, 128, 256, 4)["persistent"]  # fp32: thread stores
    small = dict(kv_outer_attention.attention_defaults(4, 2), persistent=True)
    assert fit(small, None, 4, 64, 64, 256, 2)["persistent"]
    assert fit(bf16, dict(persistent=True), 16, 128, 128, 512, 2)["persistent"], "asked for: the kernel says why"
    assert kv_outer_attention.attention_defaults(16, 4)["store_eviction"] == ""  # no TMA stores to give a policy


def test_the_tile_kernel_says_when_its_shared_memory_does_not_fit():
    """Persistent with three stages is 257 KB: a ValueError when built, not a failed launch."""
    with pytest.raises(ValueError, match="shared memory"):
        shared_tiles.tile_attention_roles_program(groups=4, heads=64, head_dim=128, block_size=128, topk=16,
                                                  scale=0.088, stages=3, persistent=True)
    assert shared_tiles.roles_shared_bytes(128, 128, 3, False) <= 227 * 1024


def test_persistent_combine_limit_names_what_does_not_fit():
    """The persistent combine takes a shape only where its ring fits shared memory and a stage holds whole pairs."""
    defaults = lse_combine.PERSISTENT_COMBINE_DEFAULTS
    assert lse_combine.persistent_combine_limit(64, 128, 16, 4, 2, defaults) is None  # 3 x 65 KB
    assert "shared memory" in lse_combine.persistent_combine_limit(64, 128, 16, 4, 4, defaults)  # fp32: 3 x 129 KB
    assert "divide" in lse_combine.persistent_combine_limit(64, 128, 16, 4, 2, dict(defaults, pairs=3))
    assert lse_combine.stage_pairs(8, 64, 4, 8) == 8 and lse_combine.stage_pairs(64, 128, 16, 4) == 1


@pytest.mark.parametrize("config", [dict(stages=3), dict(tma_stores=False)], ids=["3-stages", "thread-stores"])
def test_the_persistent_attention_says_when_shared_memory_overflows(config):
    with pytest.raises(ValueError, match="persistent: .* shared memory"):
        kv_outer_attention.kv_outer_program(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088,
                                            persistent=True, **config)


@pytest.mark.parametrize("config,match", [
    (dict(persistent=True), "per-item CTAs"), (dict(store_warp=False), "per-item CTAs"),
    (dict(topk=4, combine_stages=6), "combine_stages <= topk"),
    (dict(partial_dtype="float32"), "16-bit"),
    (dict(stages=4, o_buffers=1), "shared memory"), (dict(groups=2), "32 their registers hold")],
    ids=["persistent", "no-store-warp", "ring-past-topk", "fp32-partials", "shared-memory", "32-heads-a-group"])
def test_the_combine_warps_say_what_they_need(config, match):
    with pytest.raises(ValueError, match=match):
        kv_outer_attention.kv_outer_program(**dict(PAPER, **dict(dict(tma_gathers=True, store_warp=True), **config)),
                                            combine_warps=True)


def test_the_combine_warps_build_takes_the_previous_chunk():
    """combine_warps: the kernel takes the previous chunk's partials, O, LSE and two scalars more (with and without a
    query offset); its last two producer warps load the partials by TMA (evict-first) into their own ring and meet
    on named barrier 6; the default build has none of it."""
    warps = lower_to_cuda(kv_outer_attention.kv_outer_program, **PAPER, tma_gathers=True, store_warp=True,
                          combine_warps=True)
    assert "EVICT_FIRST>(OpartPrev_desc" in warps and "EVICT_FIRST>(LpartPrev_desc" in warps  # read once
    assert "__sync_thread_partial(6, 64)" in warps and "int t0, int t_first, int units)" in warps
    offset = lower_to_cuda(kv_outer_attention.kv_outer_program, **PAPER, tma_gathers=True, store_warp=True,
                           combine_warps=True, query_offset=True)
    assert "OpartPrev_desc" in offset and "q0" in offset
    default = lower_to_cuda(kv_outer_attention.kv_outer_program, **PAPER, tma_gathers=True)
    assert "Prev" not in default and "__sync_thread_partial(6" not in default


@pytest.mark.parametrize("config", [dict(persistent=True, tma_gathers=False), dict(tma_stores=False),
                                    dict(tma_gathers=False)], ids=["persistent-cp-async", "thread-stores",
                                                                    "cp-async-gathers"])
def test_the_store_warp_says_what_it_needs(config):
    with pytest.raises(ValueError, match="store_warp: TMA gathers and TMA stores only"):
        kv_outer_attention.kv_outer_program(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088,
                                            **dict(dict(tma_gathers=True, tma_stores=True), **config),
                                            store_warp=True)


PAPER = dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088)
ASYNC_WGMMA = [(kv_outer_attention.kv_outer_program, dict(PAPER, **kv_outer_attention.attention_defaults(16, 2))),
               (kv_outer_attention.kv_outer_program, dict(PAPER)),
               (kv_outer_attention.kv_outer_program, dict(PAPER, persistent=True)),
               (shared_tiles.tile_attention_roles_program, dict(PAPER)),
               (shared_tiles.tile_attention_roles_program, dict(PAPER, persistent=True)),
               BACKWARD_PROGRAMS[1], BACKWARD_PROGRAMS[3],
               (accumulate.accumulate_program, dict(PAPER)), (accumulate.accumulate_program, dict(PAPER, init=True)),
               (kv_outer_attention.kv_outer_program, dict(PAPER, **dict(kv_outer_attention.attention_defaults(16, 2),
                                                                         store_warp=True))),
               (kv_outer_attention.kv_outer_program, dict(PAPER, **dict(kv_outer_attention.attention_defaults(16, 2),
                                                                         store_warp=True, o_buffers=1, stages=3))),
               (kv_outer_attention.kv_outer_program, dict(PAPER, persistent=True, tma_gathers=True)),
               (kv_outer_attention.kv_outer_program, dict(PAPER, persistent=True, tma_gathers=True, store_warp=True)),
               (kv_outer_attention.kv_outer_program, dict(PAPER, **dict(kv_outer_attention.attention_defaults(16, 2),
                                                                         store_warp=True, combine_warps=True))),
               (kv_outer_attention.kv_outer_program, dict(PAPER, **dict(kv_outer_attention.attention_defaults(16, 2),
                                                                         store_warp=True, consumers=3, pingpong=False,
                                                                         o_buffers=1))),
               (local_combine.local_combine_program, dict(PAPER)),
               (local_combine.local_combine_program, dict(groups=2, heads=16, head_dim=64, block_size=64, topk=6,
                                                          scale=0.125))]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("builder,config", ASYNC_WGMMA,
                         ids=["kv_outer-defaults", "kv_outer-cp-async-gathers", "kv_outer-persistent", "tile-per-tile-ctas",
                              "tile-persistent", "backward-paper", "backward-wide", "accumulate-blocks",
                              "accumulate-local", "kv_outer-store-warp", "kv_outer-store-warp-one-o-tile",
                              "kv_outer-persistent-tma-gathers", "kv_outer-persistent-store-warp",
                              "kv_outer-combine-warps", "kv_outer-three-consumers", "local-combine-paper",
                              "local-combine-R8-D64-topk6"])
def test_the_attention_keeps_its_wgmma_asynchronous(builder, config, tmp_path):
    """ptxas serialises every wgmma of a kernel where one may run across a divergent path (C7518), where other
    instructions touch a running wgmma's registers (C7514) or where the registers do not hold its pipeline (C7511,
    C7512: the wide backward's dQ then goes in 64-column slices); the attention kernels overlap their GEMMs with
    other work, so none may draw any of these, nor spill."""
    report = ptxas_report(lower_to_cuda(builder, **config), tmp_path)
    assert not [code for code in ("C7511", "C7512", "C7514", "C7518") if code in report], report[-2000:]
    assert "0 bytes spill stores" in report


def ptxas_report(source: str, tmp_path) -> str:
    """ptxas's verbose report (registers, spills, warnings) of compiling ``source`` for sm_90a with nvcc."""
    import subprocess
    from pathlib import Path

    path = tmp_path / "kernel.cu"
    path.write_text(source)
    tl = Path(tilelang.__file__).parent
    result = subprocess.run(["nvcc", "-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "--use_fast_math",
                             "--expt-relaxed-constexpr", f"-I{tl / 'src'}", f"-I{tl / '3rdparty/cutlass/include'}",
                             "-DENABLE_BF16", "-cubin", "-Xptxas", "-v", str(path), "-o", str(tmp_path / "k.cubin")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


def test_the_backward_says_which_columns_and_shared_memory_do_not_fit():
    wide = dict(groups=2, heads=32, head_dim=256, block_size=64, topk=16, scale=0.0625, columns=128)
    with pytest.raises(ValueError, match="backward: .* shared memory"):  # a third ring stage at head dim 256
        kv_outer_backward.kv_outer_backward_program(**wide, stages=3)
    with pytest.raises(ValueError, match="whole 64-column slices"):
        kv_outer_backward.kv_outer_backward_program(**dict(wide, column0=160))
    with pytest.raises(ValueError, match="whole 64-column slices"):
        kv_outer_backward.kv_outer_backward_program(**dict(wide, column0=192))  # past the head dim
    assert kv_outer_backward.backward_shared_bytes(16, 256, 64, 2, columns=128) <= SMEM_LIMIT


@pytest.mark.parametrize("G,Bk", [(4, 128), (1, 64)])
def test_the_decode_scan_loads_pages_through_the_block_table(G, Bk):
    """Each block's index keys come by TMA from the page the block table names, into a pipelined ring, and one
    wgmma scores the CTA's query rows against it."""
    source = lower_to_cuda(decode_scores.decode_scores_program, groups=G, index_dim=128, block_size=Bk, scale=0.088)
    assert "tma_load(Kc_desc" in source and "BlockTable[" in source and "wgmma" in source


def test_the_fp8_decode_scan_quantises_each_query_row_and_scores_with_fp8_wgmma():
    """FP8 index keys and their per-token scales come by TMA through the block table; each query row is quantised
    to e4m3 in the kernel (satfinite), and the block is one e4m3 x e4m3 wgmma."""
    source = lower_to_cuda(decode_scores.decode_scores_fp8_program, groups=4, index_dim=128, block_size=128,
                           scale=0.088)
    assert "tma_load(Kc_desc" in source and "tma_load(KScale_desc" in source and "BlockTable[" in source
    assert "__NV_SATFINITE, __NV_E4M3" in source and "kFloat8_e4m3, tl::DataType::kFloat8_e4m3" in source


def test_the_pipelined_decode_attention_loads_k_and_v_by_tma_from_a_producer():
    source = lower_to_cuda(decode_attention.decode_attention_pipelined_program, groups=4, heads=64, head_dim=128,
                           block_size=128, topk=16, scale=0.088, splits=4)
    assert "tma_load(Kc_desc" in source and "tma_load(Vc_desc" in source and "BlockTable[" in source


def test_the_decode_combine_loads_every_split_of_its_columns_at_once():
    source = lower_to_cuda(decode_attention.decode_combine_program, heads=64, groups=4, head_dim=128, splits=16)
    import re

    unrolled_split_loops = re.findall(r"#pragma unroll\s+for \(int s\w* = 0; s\w* < 16;", source)
    assert len(unrolled_split_loops) == 3  # max, weights, sum: each split's loads in flight together


def test_the_fp8_prefill_select_scales_its_columns_by_the_keys_scales():
    """The FP8 pipelined select: e4m3 wgmma on both operands, the keys' scales copied beside each key block and
    applied to the scores' columns before the row max; its bf16 twin lowers as before."""
    source = lower_to_cuda(index_topk.pipelined_select_fp8_program, groups=4, index_dim=128, block_size=128, topk=16)
    assert "fp8_e4_t*)Q_s0" in source and "(float*)scale_ring" in source and "KScale[" in source


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("config", [dict(register_max=True), dict(consumers=4, register_max=True),
                                    dict(consumers=4, register_max=True, groups=8, index_dim=64, block_size=64, topk=8)],
                         ids=["register-max", "4-consumers", "4-consumers-Bk64"])
def test_the_pipelined_select_can_rank_from_the_accumulators_registers_with_four_consumers(fp8, config, tmp_path):
    """register_max: each row's max comes from the wgmma accumulator by a tree and two quad shuffles (scaled per key
    with FP8) and goes straight into the list of the quad lane that owns the row: no shared row maxima, no named
    barriers. consumers=4: four warpgroups of 64 rows, a 640-thread CTA. Both compile without spilling."""
    builder = index_topk.pipelined_select_fp8_program if fp8 else index_topk.pipelined_select_program
    config = dict(dict(groups=4, index_dim=128, block_size=128, topk=16), **config)
    source = lower_to_cuda(builder, **config)
    M = 2 * index_topk.pipelined_rows(config["groups"], config["block_size"]) // config.get("consumers", 2)
    assert f"msa_select_row_max<{M // 64}, {config['block_size']}, {int(fp8)}>" in source
    assert "rmax_s" not in source and "__sync_thread_partial" not in source
    assert ("tl::warpgroup_reg_alloc<112>" in source) == (config.get("consumers") == 4)
    assert "0 bytes spill stores" in ptxas_report(source, tmp_path)


@pytest.mark.parametrize("groups,block_size", [(4, 128), (8, 64)], ids=["Bk128", "Bk64"])
def test_the_row_max_helper_reads_the_layout_tilelangs_own_reduce_reads(groups, block_size):
    """register_max's helper indexes a thread's accumulator values as kN / 2 t + 4 j + 2 h + e (tile t of 64 rows,
    column group j, row half h, element e). TileLang's own reduce over the same fragment (the default build) must
    index it the same way: for row slot i = 2 t + h, value rv = j + kN / 8 e."""
    source = lower_to_cuda(index_topk.pipelined_select_program, groups=groups, index_dim=64, block_size=block_size,
                           topk=4)
    kN, groups_of_8 = block_size, block_size // 8
    line = next(l for l in source.splitlines() if "rmax0[" in l and "max(" in l)
    want = (f"acc0[(((((i_4 >> 1) * {kN // 2}) + ((rv & {groups_of_8 - 1}) * 4)) + ((i_4 & 1) * 2)) + "
            f"(rv >> {groups_of_8.bit_length() - 1}))]")
    assert want in line, line
    helper = index_topk.SELECT_ROW_MAX_CUDA
    assert "acc[kN / 2 * t + 4 * j + 2 * h]" in helper and "acc[kN / 2 * t + 4 * j + 2 * h + 1]" in helper


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_the_kl_can_take_tiles_of_128_query_rows(tmp_path):
    """tile_rows=128: the fused KL pass on tiles of 8 queries x 16 heads (its student LSEs loaded by the first TQ
    producer threads, every thread having a row) compiles with its wgmma asynchronous and no more spills than the
    default's 4 bytes; fewer than 8 heads a group is named."""
    config = dict(groups=4, heads=64, head_dim=128, index_dim=128, block_size=128, topk=16, scale=0.088,
                  index_scale=0.088)
    report = ptxas_report(lower_to_cuda(kl_loss.kl_fused_program, **config, tile_rows=128), tmp_path)
    assert not [c for c in ("C7511", "C7512", "C7514", "C7518") if c in report], report[-2000:]
    assert int(re.search(r"(\d+) bytes spill stores", report).group(1)) <= 4
    with pytest.raises(ValueError, match="8 query heads"):
        kl_loss.kl_fused_program(**dict(config, heads=16), tile_rows=128)


def test_four_select_consumers_need_256_rows_in_a_key_block():
    with pytest.raises(ValueError, match="64 rows"):
        index_topk.pipelined_select_program(groups=1, index_dim=64, block_size=128, topk=8, consumers=4)
    with pytest.raises(ValueError, match="2 or 4"):
        index_topk.pipelined_select_program(groups=4, index_dim=128, block_size=128, topk=16, consumers=3)


# (builder, config, bytes of spill stores allowed: the KL's default build already spills 4, its offset build 8)
OFFSET_PROGRAMS = [
    (kv_outer_attention.kv_outer_program, dict(PAPER, **kv_outer_attention.attention_defaults(16, 2)), 0),
    (kv_outer_attention.kv_outer_program, dict(PAPER, persistent=True), 0),
    (kv_outer_backward.kv_outer_backward_program, dict(PAPER, dq_partials=True), 0),
    (kl_loss.student_lse_program, dict(groups=4, index_dim=128, block_size=128, topk=16, index_scale=0.088), 0),
    (kl_loss.kl_fused_program, dict(groups=4, heads=64, head_dim=128, index_dim=128, block_size=128, topk=16,
                                    scale=0.088, index_scale=0.088), 8),
    (shared_tiles.tile_attention_roles_program, dict(PAPER), 0),
    (shared_tiles.tile_attention_roles_program, dict(PAPER, persistent=True), 0),
    (shared_tiles.tile_attention_program, dict(groups=2, heads=8, head_dim=64, block_size=64, topk=8, scale=0.125), 0),
]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("builder,config,spills", OFFSET_PROGRAMS,
                         ids=["attention", "attention-persistent", "backward", "student-lse", "kl", "tiles",
                              "tiles-persistent", "tiles-64-rows"])
def test_the_query_side_kernels_take_queries_at_an_offset(builder, config, spills, tmp_path):
    """query_offset: the query-side tensors are sized by their own row count (``queries``, not the keys' ``seq``) and
    a runtime scalar after the others gives their first row's position, so context parallelism allocates no rows
    before a rank's chunk; the default build takes neither. Compiles with its wgmma asynchronous, without spilling
    (beyond the KL's few bytes)."""
    offset, default = builder(**config, query_offset=True), builder(**config)
    assert len(offset.params) == len(default.params) + 1
    assert "queries" in offset.script() and "queries" not in default.script()
    report = ptxas_report(lower_to_cuda(builder, **config, query_offset=True), tmp_path)
    assert not [c for c in ("C7511", "C7512", "C7514", "C7518") if c in report], report[-2000:]
    assert int(re.search(r"(\d+) bytes spill stores", report).group(1)) <= spills


def test_the_select_at_an_offset_takes_t0_and_only_the_chunks_rows():
    """The pipelined selects' offset builds (bf16 and FP8): a runtime t0 after Idx, Q / Idx sized by the chunk's
    own row count; their default builds take neither."""
    for builder in (index_topk.pipelined_select_program, index_topk.pipelined_select_fp8_program):
        offset = builder(groups=4, index_dim=128, block_size=128, topk=16, offset=True)
        default = builder(groups=4, index_dim=128, block_size=128, topk=16)
        assert [p.name for p in offset.params][-1] == "t0" and "t0" not in [p.name for p in default.params]
        assert "queries" in offset.script() and "queries" not in default.script()
        assert "__global__" in lower_to_cuda(builder, groups=4, index_dim=128, block_size=128, topk=16, offset=True)


def test_the_fp8_scan_can_load_two_pages_a_stage():
    """pages=2: each pipeline stage loads two blocks' FP8 keys and scales by TMA (their page ids through the block
    table), so one wgmma of 256 keys and one transpose serve two blocks."""
    source = lower_to_cuda(decode_scores.decode_scores_fp8_program, groups=4, index_dim=128, block_size=128,
                           scale=0.088, rows=8, blocks_per_cta=32, num_stages=4, pages=2)
    assert source.count("tma_load(Kc_desc") == 2 and source.count("tma_load(KScale_desc") == 2
    with pytest.raises(ValueError, match="multiple of pages"):
        decode_scores.decode_scores_fp8_program(groups=4, index_dim=128, block_size=128, scale=0.088,
                                                blocks_per_cta=5, pages=2)


def test_the_decode_top_k_merges_the_lanes_lists_by_warp_shuffles():
    source = lower_to_cuda(decode_topk.decode_topk_program, groups=4, block_size=128, topk=16)
    assert "__global__" in source and source.count("__shfl_xor_sync") == 4  # a score and a block id a step, in the warps and then across them


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("Bk,local_blocks", [(128, 1), (64, 2)])
def test_the_rescore_stage_scores_each_candidate_block_on_tensor_cores_then_ranks_them(Bk, local_blocks, tmp_path,
                                                                                      monkeypatch):
    """Rescore: a CTA a (candidate, query row) loads the candidate's exact keys from the page the block table names
    and scores them with one wgmma (the query row padded to 8); the select ranks each row's candidates by counting
    (no shuffles, no sort). Both compile with nvcc."""
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    config = dict(groups=4, index_dim=128, block_size=Bk, candidates=2 * (16 - local_blocks), scale=0.088,
                  local_blocks=local_blocks)
    source = lower_to_cuda(decode_rescore.rescore_program, **config)
    assert "BlockTable[" in source and "wgmma" in source and "Cand[" in source
    select = dict(topk=16, candidates=config["candidates"], local_blocks=local_blocks)
    source = lower_to_cuda(decode_rescore.rescore_select_program, **select)
    assert "__shfl" not in source and "Rescored[" in source
    for builder, args in ((decode_rescore.rescore_program, config), (decode_rescore.rescore_select_program, select)):
        assert "__global__" in compile_program(builder, args, target=sm90_target()).get_kernel_source()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("max_pages,topk,local_blocks", [(8192, 31, 1), (1024, 16, 2), (16384, 16, 1)])
def test_the_radix_top_k_counts_bins_once_a_warp_and_places_its_own_barriers(max_pages, topk, local_blocks, tmp_path,
                                                                           monkeypatch):
    """The radix select: warp-aggregated shared atomics into the bins (__match_any_sync, __popc), a warp scan by
    shuffles, the slots taken by an atomic ticket; the barriers are its own (TileLang's planner, off for it, put two
    in every key's iteration) and it compiles with nvcc without spilling."""
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    capacity, threads = decode_topk.radix_capacity(max_pages)
    assert capacity >= max_pages and capacity // threads <= 16 and threads >= 256
    source = lower_to_cuda(decode_topk.decode_topk_radix_program, groups=4, block_size=128, topk=topk,
                           capacity=capacity, threads=threads, local_blocks=local_blocks)
    assert "__match_any_sync" in source and "__popc" in source and "__shfl_up_sync" in source
    assert "AtomicAddRet(" in source
    assert source.count("__syncthreads()") == 12  # the program's own: none added inside the loops over a thread's keys
    assert "0 bytes spill stores" in ptxas_report(source, tmp_path)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("fp8,pages,rows,Bk", [(False, 1, 8, 128), (True, 2, 8, 128), (False, 1, 64, 64)])
def test_the_scan_can_take_each_blocks_max_from_the_accumulators_registers(fp8, pages, rows, Bk, tmp_path):
    """shuffle_max: the keys-major scan reduces each block over its keys by warp shuffles on the wgmma accumulator
    (no transposed copy, no fragment reduce), one warpgroup barrier an iteration; compiles without spilling."""
    builder = decode_scores.decode_scores_fp8_program if fp8 else decode_scores.decode_scores_program
    config = dict(groups=4, index_dim=128, block_size=Bk, scale=0.088, rows=rows, blocks_per_cta=32, shuffle_max=True,
                  **(dict(pages=pages) if fp8 else {}))
    source = lower_to_cuda(builder, **config)
    assert f"msa_warp_block_max<{pages * Bk // 64}, {rows}, {pages}>" in source and "acc_t" not in source
    assert "0 bytes spill stores" in ptxas_report(source, tmp_path)
    with pytest.raises(ValueError, match="keys.major"):
        builder(**dict(config, keys_major=False))


@pytest.mark.parametrize("builder,config", [
    (decode_scores.decode_scores_program, dict(groups=4, index_dim=128, block_size=128, scale=0.088)),
    (decode_scores.decode_scores_fp8_program, dict(groups=4, index_dim=128, block_size=128, scale=0.088)),
    (decode_topk.decode_topk_program, dict(groups=4, block_size=128, topk=16)),
    (decode_topk.decode_topk_radix_program, dict(groups=4, block_size=128, topk=16, capacity=1024)),
    (decode_rescore.rescore_program, dict(groups=4, index_dim=128, block_size=128, candidates=30, scale=0.088)),
    (decode_rescore.rescore_select_program, dict(topk=16, candidates=30)),
    (decode_attention.decode_attention_program, dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16,
                                                     scale=0.088, splits=4)),
    (decode_attention.decode_combine_program, dict(heads=64, groups=4, head_dim=128, splits=16)),
    (decode_union.decode_union_roles_program, dict(groups=2, heads=8, head_dim=64, block_size=64, topk=5,
                                                   scale=0.125, tokens=3, splits=3)),
], ids=["scan", "scan-fp8", "topk", "topk-radix", "rescore", "rescore-select", "attention", "combine", "union"])
def test_every_decode_kernel_can_wait_for_the_one_before_it(builder, config):
    """pdl=True: the kernel waits for its predecessor (griddepcontrol.wait) before its first read of data a kernel
    before it writes (the row lengths, scores, indices, partials) and lets its successor launch at its end; the
    default build takes no part in programmatic launches."""
    source = lower_to_cuda(builder, pdl=True, **config)
    kernel = source.index('extern "C" __global__ void __launch')
    wait = source.index("cudaGridDependencySynchronize()", kernel)
    assert source.index("cudaTriggerProgrammaticLaunchCompletion()", kernel) > wait
    for name in ("SeqLens[", "Scores[", "Cand[", "Rescored[", "Lpart[", "Indices["):  # inputs a kernel before writes
        first = source.find(name, kernel)
        assert first < 0 or first > wait, name
    assert "cudaGridDependencySynchronize" not in lower_to_cuda(builder, **config)


UNION_DRAFTS = dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16, scale=0.088, splits=4)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("config", [dict(UNION_DRAFTS, tokens=8), dict(UNION_DRAFTS, tokens=8, skip_idle=True),
                                    dict(groups=2, heads=8, head_dim=64, block_size=64, topk=5, scale=0.125, tokens=3,
                                         splits=3)],
                         ids=["two-consumers-paper", "two-consumers-skip-idle", "one-consumer-R4-D64"])
def test_the_union_decode_attention_keeps_its_wgmma_asynchronous(config, tmp_path):
    """The union kernel's consumers run FlashAttention-3's order over the producer's ring, so as the prefill tile
    kernel: no wgmma serialised (C7511 / C7512 / C7514 / C7518; a branch TileLang splits around a wgmma draws
    them), no spill, the K / V pages loaded through the block table by 16-byte cp.async, setmaxnreg by role."""
    source = lower_to_cuda(decode_union.decode_union_roles_program, **config)
    report = ptxas_report(source, tmp_path)
    assert not [code for code in ("C7511", "C7512", "C7514", "C7517", "C7518") if code in report], report[-2000:]
    assert "0 bytes spill stores" in report
    assert "cp_async_gs_conditional<16>" in source and "BlockTable[" in source
    assert "warpgroup_reg_dealloc" in source and "warpgroup_reg_alloc" in source


def test_the_union_kernels_name_what_does_not_fit():
    assert "128-row" in decode_union.union_limit(16, 16, 128, 128, 16, 2)
    assert "head dim 256" in decode_union.union_limit(4, 16, 256, 128, 16, 1)
    assert "shared memory" in decode_union.union_limit(8, 16, 128, 128, 16, 3)
    assert decode_union.union_limit(8, 16, 128, 128, 16, 2) is None
    assert decode_union.union_ctas_per_sm(8, 128, 128, 16, 2) == 1
    assert decode_union.union_ctas_per_sm(8, 128, 128, 16, 1) == 2
    with pytest.raises(ValueError, match="decode union attention: tokens=17"):
        decode_union.decode_union_roles_program(**dict(UNION_DRAFTS, heads=16, tokens=17))
    # splits: whole waves of the CTAs that fit, at least one, at most one union entry a split
    assert decode_union.union_splits(32, 8, 16, 132, 1) == 4
    assert decode_union.union_splits(512, 8, 16, 132, 1) == 1
    assert decode_union.union_splits(1, 2, 3, 132, 2) == 6


def test_the_decode_attention_reads_k_and_v_through_the_block_table():
    source = lower_to_cuda(decode_attention.decode_attention_program, groups=4, heads=64, head_dim=128,
                           block_size=128, topk=16, scale=0.088, splits=4)
    assert "BlockTable[" in source and "(Opart + " in source and "Lpart[" in source  # O partials: vector stores


@pytest.mark.parametrize("config,match", [
    (dict(groups=16, heads=64), "8-64 query heads"), (dict(head_dim=96), "head dims 64 or 128"),
    (dict(partial_dtype="float32"), "16-bit partials"), (dict(topk=15), "must divide topk"),
    (dict(stages=8), "shared memory"), (dict(ablate="local"), "ablate is one of")],
    ids=["R4", "D96", "fp32-partials", "topk15", "8-stages", "unknown-ablation"])
def test_the_local_combine_says_what_it_needs(config, match):
    with pytest.raises(ValueError, match=match):
        local_combine.local_combine_program(**dict(PAPER, **config))


def test_the_local_combine_streams_its_pieces_from_a_warp_of_their_own():
    """One TMA load site for the partial pieces (64 columns a copy, read once: evict first), issued by the second
    producer warp, which waits only for the pieces' ring (whose slots count on across live tiles), never for a Q
    slot: the partials keep streaming while the consumer attends."""
    source = lower_to_cuda(local_combine.local_combine_program, **PAPER)
    assert source.count("tl::tma_load<tl::CacheHintSm90::EVICT_FIRST>(Opart_desc") == 1
    producer = source[source.index("warpgroup_reg_dealloc"):source.index("warpgroup_reg_alloc")]
    pieces_warp = producer[producer.index("< 192"):]
    assert "Opart_desc" in pieces_warp and "q_empty" not in pieces_warp and "Q_desc" not in pieces_warp
    # the ring slot of piece k = (live tiles before) * pieces + p: across tiles
    assert "(k % 3))].wait" in pieces_warp and "int k = ((n_live[0] * 8) + p" in pieces_warp


def test_the_local_combine_ablates_only_its_merge():
    """Timing only (benchmarks.probe_local_combine): the pieces are still loaded and their ring turned, the own block
    still attended; nothing reads the pieces."""
    shipped = lower_to_cuda(local_combine.local_combine_program, **PAPER)
    ablated = lower_to_cuda(local_combine.local_combine_program, **PAPER, ablate="merge")
    for source in (shipped, ablated):
        assert "Opart_desc" in source and "p_empty[" in source and source.count("wgmma") == shipped.count("wgmma")
    assert "((bfloat16_t*)pieces) + " in shipped and "((bfloat16_t*)pieces) + " not in ablated  # the merge's reads


def test_row_flags_mark_the_own_block_and_rows_with_partials():
    import torch

    from msa_tl.attention.accumulate import split_own_block

    Bk = 4
    idx = torch.tensor([[[[0, -1]], [[0, -1]], [[1, 0]], [[-1, -1]], [[0, -1]]]], dtype=torch.int32)  # [1, 5, 1, 2]
    others, own = split_own_block(idx, Bk)  # queries 0-3: block 0 is their own; query 4: block 1
    slot0 = 1 << local_combine.FLAG_SLOTS
    flags = local_combine.row_flags(others, own)
    # 0, 1: only their own block; 2: its own block and block 1 (a partial in slot 0): own, partial and slot bits;
    # 3: nothing; 4: block 0 is not its own: a partial in slot 0, no own term
    assert flags.tolist() == [[[1], [1], [1 | 2 | slot0], [0], [2 | slot0]]]
    shared = torch.tensor([[[False], [True], [False], [False], [False]]])  # query 1's row: a shared tile's
    flags = local_combine.row_flags(others, own, shared)
    assert flags.tolist() == [[[1], [1 | local_combine.FLAG_SKIP], [1 | 2 | slot0], [0], [2 | slot0]]]
    swapped = others.flip(-1)  # the partial in slot 1 instead
    assert local_combine.row_flags(swapped, own)[0, 2, 0] == 1 | 2 | slot0 << 1
    wide = torch.full((1, 5, 1, local_combine.MAX_TOPK + 1), -1, dtype=torch.int32)  # a bit a slot: no room
    with pytest.raises(ValueError, match="topk <="):
        local_combine.row_flags(wide, own)
