"""KV-outer sparse attention (TileLang) and the main branch's chunked forward driver.

One CTA per work item of :mod:`msa_tl.attention.scheduler` (a key block and up to
``item_queries`` of the (query, slot) entries that chose it), three warpgroups
with roles and mbarriers written by hand:

- the **producer** loads K/V of the block once, then gathers the item's query
  tiles (``64 / R`` queries x R heads: each query's R heads are one contiguous
  R x D box of Q) into a ring of ``2 * stages`` shared-memory slots, each
  completed on its ``full`` mbarrier: one warp issues a TMA copy per query and
  64 columns (``tma_gathers``, the default where R >= 8), else 128 threads issue
  16-byte ``cp.async``;
- two **consumers** take alternate tiles. For tile i a consumer runs
  S = Q_tile K_blk^T (wgmma from shared memory), the causal mask (only on tiles
  that reach into the key block itself), the local softmax and O = P V_blk
  (P from registers); it issues S of tile i + 1 before tile i's epilogue, so
  the tensor cores work while it normalises O into a double-buffered shared
  tile. One lane then sends each query's R x D partial box to its (query, KV
  head, slot) home with a TMA tensor store, at the start of the next tile,
  where no wgmma is in flight. The consumers take turns issuing their MMAs
  (named barriers, FA3's ping-pong), so one's softmax runs under the other's.

:mod:`msa_tl.attention.combine` then merges each (query, head)'s <= topk partials
with a stable log-sum-exp. Partials cost ``chunk * Hq * topk * D`` elements (the input dtype by
default, bf16: 4 GiB for a 16K-query chunk at the paper's shape), so prefill runs
in query chunks with a fixed workspace.
"""

import inspect
import math

import tilelang.language as T
import torch
from tilelang.layout import make_swizzled_layout

from msa_tl.attention.accumulate import (ACCUMULATE_DEFAULTS, accumulate_forward, accumulate_program,
                                         accumulate_unsupported, finalize_program)
from msa_tl.attention.combine import (COMBINE_DEFAULTS, COMBINE_PREFETCH_CUDA, PERSISTENT_COMBINE_DEFAULTS,
                                      COMBINE_WARP_THREADS, combine_program, combine_warps_buffers,
                                      combine_warps_limit, combine_warps_macro, combine_warps_shared_bytes,
                                      persistent_combine_limit, persistent_combine_program)
from msa_tl.attention.local_combine import LOCAL_COMBINE_DEFAULTS, local_combine_program, local_combine_unsupported
from msa_tl.attention.row_prep import FUSED_CHOICES, prepare_rows, row_prep_builder
from msa_tl.attention.scheduler import DEFAULTS as SCHEDULE_DEFAULTS
from msa_tl.attention.scheduler import (Schedule, first_query_macro, plan_program, tile_rows_macro, tma_loads_macros,
                                        work_item)
from msa_tl.attention.shared_tiles import list_shared_tiles, shared_tile_attention, tile_queries, tile_rows
from msa_tl.tl_compile import SMEM_LIMIT, compiled_kernel, sm_count, tl_dtype
from msa_tl.tunable import ATTENTION_DIMS, TunableProgram, attention_program_args
from msa_tl.tuning.cache import tuned_config

ATTENTION_DEFAULTS = dict(stages=2, tma_stores=True, pingpong=True, persistent=False, store_eviction="", o_buffers=2,
                          tma_gathers=True, direct_stores=False, consumers=2, store_warp=False, combine_warps=False,
                          combine_stages=6, combine_prefetch=0)
# the tuner's choices of each knob (ATTENTION_TUNING at the end adds the constraints)
ATTENTION_KNOBS = dict(stages=(1, 2, 3, 4), tma_stores=(False, True), pingpong=(False, True), persistent=(False, True),
                       store_eviction=("", "evict_first"), o_buffers=(1, 2), tma_gathers=(False, True),
                       direct_stores=(False, True), consumers=(1, 2, 3), store_warp=(False, True),
                       combine_warps=(False, True), combine_stages=(4, 6, 10, 14),
                       combine_prefetch=(0, 8, 16))
CONSUMER_ROWS = 64  # one wgmma M tile per consumer warpgroup
# dynamic shared memory a CTA may use for two to fit an SM: 228 KB less, a CTA, 1 KB reserved and 1 KB of barriers
TWO_CTA_SMEM = 112 * 1024
TMA_MIN_HEADS = 8  # below this a query's partial box is too small for a TMA store to pay
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# direct_stores: a consumer thread's rows of O leave from its registers. Its values of a [64, D] wgmma accumulator
# are 4 j + 2 h + e: row h of its two, column 8 j + 2 (lane % 4) + e; after the 1 / l scaling and the conversion a
# 4 x 4 transpose of 32-bit words within each quad (shuffles, which TileLang does not express) gives each lane 8
# consecutive 16-bit columns, so a quad writes 64 contiguous bytes of a row with one 16-byte store a lane. fp32
# partials need no transpose: a quad's four 8-byte stores are one 32-byte sector.
DIRECT_STORES_CUDA = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <int kMask>
__device__ __forceinline__ void msa_quad_exchange(unsigned (&w)[4], int lane) {
  #pragma unroll
  for (int u = 0; u < 4; ++u) {
    if (u & kMask) continue;
    const bool high = lane & kMask;
    const unsigned got = __shfl_xor_sync(0xffffffffu, high ? w[u] : w[u | kMask], kMask);
    if (high) w[u] = got; else w[u | kMask] = got;
  }
}

template <bool kHalf>
__device__ __forceinline__ unsigned msa_pack2(float x, float y) {
  unsigned r;
  if constexpr (kHalf) {
    __half2 v = __floats2half2_rn(x, y);
    r = *reinterpret_cast<unsigned *>(&v);
  } else {
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    r = *reinterpret_cast<unsigned *>(&v);
  }
  return r;
}

// acc: the thread's values of O [64, kD] fp32; inv_l, dst: its two rows' 1 / l and partial rows (-1: none);
// out: the batch's partials [n_part, kD] (kBytes = 2: bf16 or fp16 as kHalf says; 4: fp32).
template <int kD, int kBytes, bool kHalf>
__device__ __forceinline__ void msa_store_rows(const float *acc, const float *inv_l, const int *dst, void *out) {
  const int lane = threadIdx.x & 3;
  #pragma unroll
  for (int h = 0; h < 2; ++h) {
    const long long row = (long long)(dst[h] < 0 ? 0 : dst[h]) * kD;
    if constexpr (kBytes == 4) {
      float *o = reinterpret_cast<float *>(out) + row;
      #pragma unroll
      for (int j = 0; j < kD / 8; ++j) {
        if (dst[h] >= 0) {
          *reinterpret_cast<float2 *>(o + 8 * j + 2 * lane) =
              make_float2(acc[4 * j + 2 * h] * inv_l[h], acc[4 * j + 2 * h + 1] * inv_l[h]);
        }
      }
    } else {
      unsigned short *o = reinterpret_cast<unsigned short *>(out) + row;
      #pragma unroll
      for (int a = 0; a < kD / 32; ++a) {
        unsigned w[4];
        #pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int j = 4 * a + u;
          w[u] = msa_pack2<kHalf>(acc[4 * j + 2 * h] * inv_l[h], acc[4 * j + 2 * h + 1] * inv_l[h]);
        }
        msa_quad_exchange<1>(w, lane);  // every lane takes part: the rows of a warp differ in dst
        msa_quad_exchange<2>(w, lane);
        if (dst[h] >= 0) {  // one 16-byte store (a plain uint4 store is split where ptxas has no aligned quad)
          asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(o + 8 * (4 * a + lane)), "r"(w[0]),
                       "r"(w[1]), "r"(w[2]), "r"(w[3]) : "memory");
        }
      }
    }
  }
}
"""


def persistent_shared_bytes(heads_per_group: int, head_dim: int, block_size: int, item_queries: int, stages: int,
                            tma_stores: bool, partial_bytes: int = 2) -> int:
    """Shared memory of the persistent kernel (16-bit inputs): two K/V blocks, the ring, one O tile and (thread
    stores) one row list a consumer, two entry lists, 1 KB for the barriers."""
    rows, D = CONSUMER_ROWS, head_dim
    TQ = rows // heads_per_group
    n_entries = math.ceil(item_queries / TQ) * TQ
    o_tiles = 2 * TQ * heads_per_group * D * 2 if tma_stores else 2 * rows * D * partial_bytes + 2 * 4 * rows
    return (2 * 2 * block_size * D + 2 * stages * rows * D) * 2 + 2 * 4 * n_entries + 1024 + o_tiles


def item_shared_bytes(head_dim: int, block_size: int, item_queries: int, stages: int, tma_stores: bool,
                      o_buffers: int = 2, direct_stores: bool = False, consumers: int = 2,
                      partial_bytes: int = 2) -> int:
    """Shared memory of the per-item kernel (16-bit inputs): K/V, a ring of ``stages`` 64-row Q tiles a consumer,
    each consumer's O tiles (``o_buffers`` with TMA stores, one with thread stores, none with direct stores), the
    item's entries."""
    o_tiles = 0 if direct_stores else (o_buffers if tma_stores else 1)
    return ((2 * block_size + consumers * stages * CONSUMER_ROWS) * head_dim * 2
            + consumers * o_tiles * CONSUMER_ROWS * head_dim * partial_bytes + 4 * item_queries)


def attention_knob_conflict(config: dict) -> str | None:
    """The first rule that :func:`kv_outer_program`'s knobs in ``config`` break together (None where they go
    together; knobs missing from ``config`` take the program's defaults)."""
    c = {name: p.default for name, p in inspect.signature(kv_outer_program).parameters.items()
         if p.default is not inspect.Parameter.empty} | config
    if c["direct_stores"] and (c["tma_stores"] or c["persistent"]):
        return "direct_stores: per-item CTAs with tma_stores=False only"
    if c["consumers"] not in (1, 2, 3):
        return f"consumers must be 1, 2 or 3, got {c['consumers']}"
    if c["consumers"] == 3 and (c["persistent"] or c["combine_warps"] or c["pingpong"] or not c["store_warp"]):
        # the persistent kernel's two K/V blocks leave no shared memory for a third ring, ping-pong's turns are
        # two consumers', and at 152 registers a consumer has none for its own TMA stores
        return "consumers=3: per-item CTAs with the store warp and pingpong=False only"
    if c["store_warp"] and not (c["tma_stores"] and c["tma_gathers"]):
        return "store_warp: TMA gathers and TMA stores only"
    if c["combine_warps"] and (c["persistent"] or not c["store_warp"] or c["consumers"] != 2):
        # the consumers' own TMA stores need the registers the combine warps take (both spill at 200 / 104)
        return "combine_warps: per-item CTAs with the store warp and two consumers only"
    if c["consumers"] == 1 and not (c["tma_gathers"] and c["direct_stores"] and not c["pingpong"]):
        return "consumers=1 (two CTAs an SM) needs tma_gathers, direct_stores and pingpong=False"
    return None


def kv_outer_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float,
                     item_queries: int = SCHEDULE_DEFAULTS["item_queries"], stages: int = 2, tma_stores: bool = True,
                     pingpong: bool = True, persistent: bool = False, ctas: int = 132, store_eviction: str = "",
                     o_buffers: int = 2, tma_gathers: bool = False, direct_stores: bool = False,
                     consumers: int = 2, store_warp: bool = False, combine_warps: bool = False,
                     combine_stages: int = 6, combine_prefetch: int = 0, pdl: bool = False, dtype: str = "bfloat16",
                     partial_dtype: str = "bfloat16", query_offset: bool = False):
    """Q [B, N, Hq, D], K/V [B, N, G, D], the schedule -> Opart [B, C*G*topk*R, D], Lpart [B, C*G*topk*R].

    Partial row ``((t * G + g) * topk + s) * R + r`` (R = Hq / G) holds query ``t0 + t``, head
    ``g * R + r``, slot s: the R rows one query's slot writes are contiguous. ``item_queries`` bounds the
    entries of one work item (the schedule's item size); ``stages`` is the depth of each consumer's Q
    ring. ``tma_stores``: each query's R x D partial box leaves a double-buffered O tile as one TMA
    tensor store, issued by one thread, instead of the consumers' 16-byte stores (needs R >= 8).
    ``pingpong``: the two consumers take turns issuing their MMAs. ``persistent``: ``ctas`` CTAs take the
    work items as they free up (CTA c first item c, then the next from the counter in Work [1 + 4 ctas]
    int32, zero at launch: :func:`persistent_work`), K/V and the entries double-buffered, so the producer
    loads the next item's while the consumers work on this one and the ring runs on across items (the O tile is then single-buffered:
    shared memory holds two K/V blocks instead). Items are taken dynamically because their sizes vary: a
    fixed share of ~50 random items a CTA leaves the slowest CTA 7-19% over the mean (NOTES.md).
    ``store_eviction``: the L2 policy of the TMA partial stores ("evict_first": written once, read by the
    combine much later, they should not push the chunk's Q rows, which each item gathers again, out of the L2).
    ``o_buffers``: O tiles a consumer's TMA stores alternate between (2: a tile's stores overlap the next tile;
    1: its stores must have left before the next tile's O is written, and the 32 KB saved hold a third ring
    stage). The persistent kernel has one. ``tma_gathers``: one producer warp loads K/V and gathers each query's
    R x D box of Q with TMA (a copy per 64 columns, completing on the slot's mbarrier) instead of 128 threads'
    16-byte cp.async; padding rows are then left as they were (their rows' results are never stored). R >= 8
    only (a box of fewer rows is not a whole 1 KB swizzle atom); on in ``ATTENTION_DEFAULTS`` (the persistent
    kernel takes them only where asked, with the store warp or ``tma_gathers`` itself: :func:`without_unfit_persistent`).
    In the persistent kernel the producer warpgroup's first three warps take the items and write the entries, and
    the first of them loads K/V and gathers.
    ``direct_stores``: each consumer thread stores its two rows of O straight from its registers (16-byte stores
    after a transpose within each quad, :data:`DIRECT_STORES_CUDA`), with no O tile, fence or TMA store:
    per-item CTAs with ``tma_stores=False`` only. ``consumers``: consumer warpgroups a CTA. With 1 (and TMA
    gathers, direct stores, no ping-pong) a CTA is 256 threads (one producer warp of its four works) within
    :data:`TWO_CTA_SMEM` of shared memory, so two run on an SM and one's item start (entries, K/V) and tail run
    under the other's tiles. With 3 (per-item CTAs of 512 threads with the store warp, no ping-pong, registers 40 /
    152) consumer c takes tiles 3 i + c and waits for each tile's S before its softmax: the registers of a second S
    tile are not there, so the other two consumers' GEMMs run under this one's softmax and epilogue instead.
    ``store_warp``: a warp of the producer warpgroup that TMA gathers leave idle (the
    second; the last in the persistent kernel) issues the TMA partial stores of every finished O tile, in the
    consumers' order, and hands each O tile back on an mbarrier once the TMA unit has read it, so no consumer issues
    a store or waits for one (TMA gathers and TMA stores only). The persistent kernel's store warp follows the items
    as the consumers take them and frees each item's entries with them.
    ``combine_warps``: the producer warpgroup's last two warps, idle beside TMA gathers and the store warp, merge the
    *previous* query chunk's partials while the consumers work (:func:`~msa_tl.attention.combine.combine_warps_macro`,
    a ring of ``combine_stages`` slot boxes, and ``combine_prefetch`` boxes ahead of it asked of the L2), so that
    the combine's DRAM reads run under attention tiles that leave DRAM idle; the kernel then takes OpartPrev [B,
    n_prev, D], LpartPrev [B, n_prev / R, R] (the previous chunk's partials), O [B, rows, D] and LSE [B, rows] after
    Lpart and, after t0 (and q0), the previous chunk's first query t_prev (O's row / Hq) and its query count (0:
    nothing to merge). Per-item CTAs with the store warp only.
    ``pdl`` (persistent kernel only): programmatic dependent launch. The kernel is launched before the one ahead of
    it on the stream has finished (its CTAs wait for it at their start, griddepcontrol.wait) and lets the next one
    launch at once (griddepcontrol.launch_dependents), so no launch latency separates a chunk's attention from the
    combines around it: the next kernel's CTAs take each SM as this one's leave it.
    """
    batch, seq, n_bg, n_items, cap, n_part = T.dynamic("batch, seq, n_bg, n_items, cap, n_part")
    queries = T.dynamic("queries") if query_offset else seq  # Q's rows
    R = heads // groups
    if tma_stores and R < TMA_MIN_HEADS:
        raise ValueError(f"tma_stores needs >= {TMA_MIN_HEADS} query heads per KV head (one TMA box a query), got {R}")
    if o_buffers not in (1, 2):
        raise ValueError(f"o_buffers must be 1 or 2, got {o_buffers}")
    single_o = persistent or o_buffers == 1
    conflict = attention_knob_conflict(dict(tma_stores=tma_stores, pingpong=pingpong, persistent=persistent,
                                            tma_gathers=tma_gathers, direct_stores=direct_stores, consumers=consumers,
                                            store_warp=store_warp, combine_warps=combine_warps))
    if conflict:
        raise ValueError(conflict)
    NC = consumers  # consumer warpgroups a CTA: consumer c takes the item's tiles NC i + c
    if direct_stores and head_dim % 32:
        raise ValueError(f"direct_stores needs a head dim that is a multiple of 32, got {head_dim}")
    partial_bytes = 4 if partial_dtype == "float32" else 2
    if tma_gathers and (R < TMA_MIN_HEADS or head_dim % 64):
        raise ValueError(f"tma_gathers needs >= {TMA_MIN_HEADS} query heads per KV head and a head dim that is a "
                         f"multiple of 64, got {R} and {head_dim}")
    rows, D, Bk = CONSUMER_ROWS, head_dim, block_size
    TQ = rows // R  # queries per consumer tile
    n_entries = math.ceil(item_queries / TQ) * TQ  # whole tiles: a tail tile reads -1, not stale entries
    if NC == 1:
        smem = item_shared_bytes(D, Bk, n_entries, stages, tma_stores, direct_stores=True, consumers=1)
        if smem > TWO_CTA_SMEM:
            raise ValueError(f"consumers=1: {smem} B of shared memory > {TWO_CTA_SMEM} B, two CTAs would not fit an "
                             f"SM (stages={stages}, head_dim={D}, block_size={Bk})")
    if NC == 3:
        smem = item_shared_bytes(D, Bk, n_entries, stages, tma_stores, o_buffers, consumers=3)
        if smem > SMEM_LIMIT:
            raise ValueError(f"consumers=3: {smem} B of shared memory > {SMEM_LIMIT} B (stages={stages}, "
                             f"o_buffers={o_buffers}, item_queries={item_queries})")
    # S of a consumer's next tile is issued before this tile's epilogue, so the tensor cores work through it; with
    # three consumers the registers of a second S tile are not there, and the other two consumers' GEMMs fill it
    early_scores = NC < 3
    vec = 16 // partial_bytes  # partial elements per 16-byte store
    store_policy = store_eviction or None
    neg_inf = -T.infinity("float32")
    scale_log2 = scale * _LOG2E
    # setmaxnreg only moves registers within what the CTA got at launch (168 x 384 threads; with one consumer two
    # CTAs of 256 threads, 128 each): a split that asks for more hangs the consumers. The cp.async producer spills
    # at 56 with the TMA store descriptor, the combine warps with their 32 accumulators below 104.
    producer_regs, consumer_regs = (72, 216) if tma_stores and not tma_gathers else (56, 224)
    if combine_warps:
        producer_regs, consumer_regs = 104, 200
    if NC == 1:
        producer_regs, consumer_regs = 40, 216
    if NC == 3:
        producer_regs, consumer_regs = 40, 152
    threads = 128 * NC + 128
    launch_regs = 65536 // ((2 if NC == 1 else 1) * threads) // 8 * 8
    assert 128 * producer_regs + 128 * NC * consumer_regs <= launch_regs * threads
    P = 96 if store_warp else 128  # the persistent kernel's producer threads that take items and write entries
    if combine_warps:
        if partial_dtype == "float32":
            raise ValueError("combine_warps: 16-bit partials only")
        combine_previous = combine_warps_macro(heads, D, topk, groups, combine_stages, dtype, combine_prefetch)
        smem = item_shared_bytes(D, Bk, n_entries, stages, tma_stores, o_buffers, direct_stores) + \
            combine_warps_shared_bytes(heads, D, topk, groups, combine_stages)
        if smem > SMEM_LIMIT:
            raise ValueError(f"combine_warps: {smem} B of shared memory > {SMEM_LIMIT} B (combine_stages="
                             f"{combine_stages}, stages={stages}, item_queries={item_queries})")
    if persistent:
        smem = persistent_shared_bytes(R, D, Bk, item_queries, stages, tma_stores, partial_bytes)
        if smem > SMEM_LIMIT:
            raise ValueError(f"persistent: {smem} B of shared memory > {SMEM_LIMIT} B (stages={stages}, "
                             f"item_queries={item_queries}, head_dim={D}, block_size={Bk})")
    first_query = first_query_macro(TQ, topk)
    gather_tile_rows = tile_rows_macro(R, D, TQ, topk)  # zero-fill for padding rows (src = -1)
    tma_load_block, tma_gather_tile = tma_loads_macros(R, D, Bk, TQ, topk)

    def q_rows(t0, q0):  # Q's row of the chunk's first query: its position t0, less Q's first position q0 if given
        return t0 if q0 is None else t0 - q0

    def consumer_tiles(n=2):
        """``n`` consumers' register tiles, each kind for every consumer in turn: S [rows, Bk] fp32, P [rows, Bk],
        O [rows, D] fp32, row max and sum [rows], query positions and partial rows [rows] int32."""
        shapes = [((rows, Bk), "float32"), ((rows, Bk), dtype), ((rows, D), "float32"), ((rows,), "float32"),
                  ((rows,), "float32"), ((rows,), "int32"), ((rows,), "int32")]
        return [T.alloc_fragment(shape, kind) for shape, kind in shapes for _ in range(n)]

    def o_buf(i):
        """The O tile of the consumer's tile i: two alternate; one with ``o_buffers=1`` and in the persistent kernel
        (its shared memory holds two K/V blocks instead)."""
        return 0 if single_o else i % 2

    n_o = 1 if single_o else 2  # O tiles a consumer

    @T.macro
    def issue_scores(i, j, c, ring, full, K_blk, ent_s, e0, t0, acc_s, qpos):
        """Wait for the consumer's i-th tile of the item (its j-th in all) and start S = Q_tile K_blk^T."""
        T.barrier_wait(full[NC * (j % stages) + c], (j // stages) & 1)
        for r in T.Parallel(rows):  # the row's query position (-1: padding)
            qpos[r] = T.if_then_else(ent_s[e0 + (NC * i + c) * TQ + r // R] >= 0,
                                     t0 + ent_s[e0 + (NC * i + c) * TQ + r // R] // topk, -1)
        T.wgmma_gemm(ring[NC * (j % stages) + c, :, :], K_blk, acc_s, transpose_B=True, clear_accum=True)

    @T.macro
    def issue_partial_boxes(buf, dst_s, O_s, Opart, b):
        """TMA stores of one finished tile: one R x D box a query, exactly TQ bulk groups (empty for padding)."""
        for q in T.serial(TQ):
            if dst_s[buf * rows + q * R] >= 0:
                T.tma_copy(O_s[buf, q, :, :], Opart[b, dst_s[buf * rows + q * R]:dst_s[buf * rows + q * R] + R, :],
                           eviction_policy=store_policy)
            else:
                T.tma_store_arrive()

    @T.macro
    def store_sender(n_tiles, dst_s0, dst_s1, O_s0, O_s1, Opart, b, o_full, o_free, dst_s2=None, O_s2=None):
        """The store warp: the TMA partial stores of the item's tiles in the consumers' order (tile j is consumer
        j % NC's tile j // NC), TQ bulk groups a tile; a tile's O is handed back once the TMA unit has read it,
        checked after the next tile's groups are issued, so the TMA unit always has a tile's stores queued."""
        for j in T.serial(n_tiles):
            i = j // NC
            T.barrier_wait(o_full[j % NC * n_o + o_buf(i)], (i // n_o) & 1)
            if j % NC == 0:
                issue_partial_boxes(o_buf(i), dst_s0, O_s0, Opart, b)
            elif NC == 2 or j % NC == 1:
                issue_partial_boxes(o_buf(i), dst_s1, O_s1, Opart, b)
            else:
                issue_partial_boxes(o_buf(i), dst_s2, O_s2, Opart, b)
            T.tma_store_wait(TQ)  # tile j - 1's boxes have been read (tile j's may still be in flight)
            if j > 0:
                T.barrier_arrive(o_free[(j - 1) % NC * n_o + o_buf((j - 1) // NC)])
        T.tma_store_wait(0)  # the CTA's shared memory must outlive the copies
        if n_tiles > 0:
            T.barrier_arrive(o_free[(n_tiles - 1) % NC * n_o + o_buf((n_tiles - 1) // NC)])

    @T.macro
    def issue_entry_boxes(ent_s, tile, g, O_s, Opart, b):
        """As issue_partial_boxes, each query's partial row from its entry in ent_s (the persistent kernel
        keeps no copy of the rows: its shared memory is full)."""
        for q in T.serial(TQ):
            entry = ent_s[tile * TQ + q]  # query (t - t0) * topk + slot
            row = ((entry // topk * groups + g) * topk + entry % topk) * R
            if entry >= 0:
                T.tma_copy(O_s[0, q, :, :], Opart[b, row:row + R, :], eviction_policy=store_policy)
            else:
                T.tma_store_arrive()

    # The persistent kernel with TMA stores keeps no rows in dst_s: each box's row comes from its entry.
    rows_from_entries = persistent and tma_stores

    @T.macro
    def issue_boxes(i, c, e0, ent_s, g, dst_s, O_s, Opart, b):
        """TMA stores of the consumer's tile i of the item."""
        if rows_from_entries:
            issue_entry_boxes(ent_s, e0 // TQ + 2 * i + c, g, O_s, Opart, b)
        else:
            issue_partial_boxes(o_buf(i), dst_s, O_s, Opart, b)

    @T.macro
    def partial_row_stats(i, dst_s, dst, m, l, Lpart, b):
        """Each row's partial row (kept in dst_s for its stores), its partial LSE, and 1 / l."""
        for r in T.Parallel(rows):
            if not rows_from_entries and not direct_stores:
                dst_s[o_buf(i) * rows + r if tma_stores else r] = dst[r]
            if dst[r] >= 0:
                Lpart[b, dst[r]] = (m[r] * scale_log2 + T.log2(l[r])) * _LN2
            l[r] = 1.0 / l[r]

    @T.macro
    def pass_turn(c, i, n_other):
        """Ping-pong: let the other consumer issue, if it has a next tile (arrivals match syncs exactly)."""
        if pingpong:
            if i + c < n_other:
                T.named_barrier_arrive(4 - c, 256)

    @T.macro
    def consumer(c, ctx, n_mine, n_other, base, ring, full, empty, K_blk, V_blk, ent_s, e0, blk, t0, b, g, seq, acc_s,
                 p, acc_o, m, l, qpos, dst, first, dst_s, O_s, Opart, Lpart, o_full, o_free):
        """Consumer c's tiles NC i + c of the item (entries from ent_s[e0]; its ring tiles from ``base`` on): the
        scores of tile i + 1 run on the tensor cores during tile i's stores.

        ``pingpong``: the consumers take turns issuing P V and the next S (named barriers 3 and 4), so one's
        softmax runs under the other's MMAs. ``store_warp``: its O tiles go to the store warp (o_full) and come back
        from it (o_free), one mbarrier pair an O tile.
        """
        if pingpong and c == 1:
            if n_other > 0:
                T.named_barrier_arrive(3, 256)  # consumer 0 goes first
        if early_scores:
            if n_mine > 0:
                issue_scores(0, base, c, ring, full, K_blk, ent_s, e0, t0, acc_s, qpos)
        for i in T.serial(n_mine):
            if not early_scores:
                issue_scores(i, base + i, c, ring, full, K_blk, ent_s, e0, t0, acc_s, qpos)
            T.wait_wgmma(0)  # S of tile i  [rows, Bk]
            T.barrier_arrive(empty[NC * ((base + i) % stages) + c])  # the producer may refill its ring slot
            if tma_stores and not store_warp:
                # Issued here, where no wgmma is in flight: a single-thread branch while S of tile i + 1
                # runs makes ptxas serialise the wgmma (C7518).
                if i > 0:
                    if ctx < 32:
                        issue_boxes(i - 1, c, e0, ent_s, g, dst_s, O_s, Opart, b)
                        if not single_o:
                            T.tma_store_wait(TQ)  # tile i - 2's boxes have left O_s[i % 2]
            first_query(first, ent_s, e0 // TQ + NC * i + c, t0, seq)
            if first[0] < blk * Bk + Bk - 1:
                for r, col in T.Parallel(rows, Bk):
                    acc_s[r, col] = T.if_then_else(blk * Bk + col <= qpos[r], acc_s[r, col], neg_inf)
            T.reduce_max(acc_s, m, dim=1)
            for r, col in T.Parallel(rows, Bk):  # one FFMA and one exp2 per score
                acc_s[r, col] = T.exp2(acc_s[r, col] * scale_log2 - m[r] * scale_log2)
            T.reduce_sum(acc_s, l, dim=1)
            T.copy(acc_s, p)
            for r in T.Parallel(rows):  # the row's partial row, -1 for padding
                dst[r] = T.if_then_else(qpos[r] >= 0, (((qpos[r] - t0) * groups + g) * topk
                                                      + ent_s[e0 + (NC * i + c) * TQ + r // R] % topk) * R + r % R, -1)
            if pingpong:
                T.sync_threads(3 + c, 256)  # this consumer's turn: the other has issued its GEMMs
            T.wgmma_gemm(p, V_blk, acc_o, clear_accum=True)  # [rows, D]
            if not early_scores:
                T.wait_wgmma(0)
            elif i + 1 < n_mine:
                issue_scores(i + 1, base + i + 1, c, ring, full, K_blk, ent_s, e0, t0, acc_s, qpos)
                pass_turn(c, i, n_other)
                T.wait_wgmma(1)  # P V of tile i done; S of tile i + 1 still running
            else:
                pass_turn(c, i, n_other)
                T.wait_wgmma(0)
            if tma_stores and single_o and not store_warp:
                # every thread, not one warp: a branch while S of tile i + 1 runs would serialise the wgmma (C7518);
                # threads that issued no copies return at once
                T.tma_store_wait(0)  # the single O tile's last boxes have left it
            if store_warp:  # the store warp has read this O tile's previous rows
                T.barrier_wait(o_free[c * n_o + o_buf(base + i)], (((base + i) // n_o) & 1) ^ 1)
            elif not direct_stores:
                T.sync_threads(1 + c, 128)  # O_s and dst_s may be overwritten (the previous tile's rows have left)
            partial_row_stats(i, dst_s, dst, m, l, Lpart, b)
            if direct_stores:  # [rows, D] from the registers, scaled by 1 / l on the way
                half = str(partial_dtype == "float16").lower()
                T.call_extern("handle", f"msa_store_rows<{D}, {partial_bytes}, {half}>", acc_o.data, l.data, dst.data,
                              T.address_of(Opart[b, 0, 0]))
            else:
                for r, d in T.Parallel(rows, D):
                    acc_o[r, d] *= l[r]
                if tma_stores:
                    for r, d in T.Parallel(rows, D):  # [TQ, R, D]: one query's R partial rows are one TMA box
                        O_s[o_buf(i), r // R, r % R, d] = acc_o[r, d]
                    T.fence_proxy_async()  # the generic-proxy writes of O_s, before the TMA unit reads it
                    if store_warp:
                        T.barrier_arrive(o_full[c * n_o + o_buf(base + i)])
                    else:
                        T.sync_threads(1 + c, 128)
                else:
                    T.copy(acc_o, O_s)
                    T.sync_threads(1 + c, 128)
                    for j in T.unroll(rows * D // vec // 128):  # 16-byte stores of whole partial rows
                        row, col = (j * 128 + ctx) // (D // vec), (j * 128 + ctx) % (D // vec) * vec
                        if dst_s[row] >= 0:
                            for v in T.vectorized(vec):
                                Opart[b, dst_s[row], col + v] = O_s[row, col + v]
        if tma_stores and not store_warp:
            if n_mine > 0:
                if ctx < 32:
                    issue_boxes(n_mine - 1, c, e0, ent_s, g, dst_s, O_s, Opart, b)
                    if not persistent:  # persistent: waited for before the next tile writes O_s, or at the end
                        T.tma_store_wait(0)  # the CTA's shared memory must outlive the copies

    if not persistent:
        @T.macro
        def attention_items(Q, K, V, Items, ItemCount, Entries, Opart, Lpart, t0, q0, OpartPrev=None, LpartPrev=None,
                            O=None, LSE=None, t_prev=None, n_prev=None):
            prelude = DIRECT_STORES_CUDA if direct_stores else COMBINE_PREFETCH_CUDA if combine_warps and \
                combine_prefetch else None
            with T.Kernel(n_items, n_bg, threads=threads, prelude=prelude) as (item, bg):
                K_s = T.alloc_shared((Bk, D), dtype)
                V_s = T.alloc_shared((Bk, D), dtype)
                ring = T.alloc_shared((NC * stages, rows, D), dtype)  # slot NC s + c: consumer c's tiles
                o_tile = (o_buffers, TQ, R, D) if tma_stores else (rows, D)  # TMA stores: o_buffers O tiles a consumer
                O_s0 = None if direct_stores else T.alloc_shared(o_tile, partial_dtype)
                O_s1 = None if direct_stores else T.alloc_shared(o_tile, partial_dtype)
                dst_s_shape = (o_buffers * rows if tma_stores else rows,)
                dst_s0 = None if direct_stores else T.alloc_shared(dst_s_shape, "int32")  # the partial rows of O_s
                dst_s1 = None if direct_stores else T.alloc_shared(dst_s_shape, "int32")
                ent_s = T.alloc_shared((n_entries,), "int32")  # the item's (query, slot) entries, -1 past its length
                if NC == 3:
                    O_s2 = T.alloc_shared(o_tile, partial_dtype)
                    dst_s2 = T.alloc_shared(dst_s_shape, "int32")
                    (acc_s0, acc_s1, acc_s2, p0, p1, p2, acc_o0, acc_o1, acc_o2, m0, m1, m2, l0, l1, l2, qpos0, qpos1,
                     qpos2, dst0, dst1, dst2) = consumer_tiles(3)
                else:
                    O_s2 = dst_s2 = None
                    acc_s0, acc_s1, p0, p1, acc_o0, acc_o1, m0, m1, l0, l1, qpos0, qpos1, dst0, dst1 = consumer_tiles()
                src = T.alloc_local((1,), "int32")  # the producer's current entry
                first = T.alloc_local((1,), "int32")  # a consumer's first query of its tile
                # combine warps: the previous chunk's slot boxes, a unit's LSEs, weights, sums, and their locals
                c_ring, c_lse, c_wt, c_sum, c_full, c_acc, c_xv, c_ov = combine_warps_buffers(
                    heads, D, topk, groups, combine_stages, partial_dtype, dtype) if combine_warps else (None,) * 8
                if not direct_stores:  # O_s2 only with three consumers
                    T.annotate_layout({o: make_swizzled_layout(o) for o in (O_s0, O_s1, O_s2) if o is not None})
                kv_ready = T.alloc_barrier(32 if tma_gathers else 128)
                full = T.alloc_barrier([32 if tma_gathers else 128] * (NC * stages))  # per ring slot
                empty = T.alloc_barrier([128] * (NC * stages))
                # store warp: per O tile (consumer c's tile u at c * n_o + u), written (its consumer's 128 threads) and
                # read by the TMA unit (the store warp's 32 lanes)
                o_full = T.alloc_barrier([128] * (NC * n_o)) if store_warp else None
                o_free = T.alloc_barrier([32] * (NC * n_o)) if store_warp else None

                b = bg // groups
                g = bg % groups
                blk, start, length = work_item(Items, ItemCount, bg, item)
                n_tiles = T.ceildiv(length, TQ)
                n_rounds = T.ceildiv(n_tiles, NC * stages)
                tx = T.get_thread_binding()
                for i in T.Parallel(n_entries):
                    ent_s[i] = T.if_then_else(i < length, Entries[bg, start + i], -1)
                T.sync_threads()

                if NC == 1:
                    T.annotate_min_blocks_per_sm(2)  # a second CTA's item starts under this one's tiles
                if tx >= 128 * NC:  # producer
                    T.set_max_nreg(producer_regs, 0)
                    if tma_gathers:
                        if tx < 128 * NC + 32:  # one warp
                            tma_load_block(K, V, b, blk, g, K_s, V_s, None, kv_ready, 0)
                            T.barrier_arrive(kv_ready[0])
                    else:
                        T.async_copy(K[b, blk * Bk:(blk + 1) * Bk, g, :], K_s)
                        T.async_copy(V[b, blk * Bk:(blk + 1) * Bk, g, :], V_s)
                        T.cp_async_barrier_noinc(kv_ready[0])
                    if not tma_gathers or tx < 128 * NC + 32:  # TMA gathers: the one warp
                        for rnd in T.serial(n_rounds):
                            for u in T.serial(NC * stages):
                                if rnd * NC * stages + u < n_tiles:
                                    T.barrier_wait(empty[u], (rnd & 1) ^ 1)
                                    if tma_gathers:
                                        tma_gather_tile(ring, u, full, ent_s, (rnd * NC * stages + u) * TQ, Q, b, g,
                                                        q_rows(t0, q0), src)
                                    else:
                                        gather_tile_rows(ent_s, rnd * NC * stages + u, q_rows(t0, q0), b, g, tx - 128 * NC, src, u,
                                                         ring, Q)
                                        T.cp_async_barrier_noinc(full[u])
                    if store_warp:
                        if tx >= 128 * NC + 32 and tx < 128 * NC + 64:  # the producer's second warp
                            store_sender(n_tiles, dst_s0, dst_s1, O_s0, O_s1, Opart, b, o_full, o_free, dst_s2, O_s2)
                    if combine_warps:
                        if tx >= threads - COMBINE_WARP_THREADS:  # the producer's last two warps
                            # the CTAs that share the merge: this chunk's items of (b, g), and where those are few
                            # (a KV head whose rows the shared tiles took) idle CTAs of the grid too, <= 8 units each
                            sharing = T.max(ItemCount[bg], T.min(n_items, T.ceildiv(n_prev, 8)))
                            combine_previous(tx - (threads - COMBINE_WARP_THREADS), item, T.max(sharing, 1), n_prev,
                                             b, g, t_prev, OpartPrev, LpartPrev, O, LSE, c_ring, c_lse, c_wt,
                                             c_sum, c_full, c_acc, c_xv, c_ov)
                elif tx < 128:  # consumer 0: tiles 0, NC, 2 NC, ... (every tile with one consumer)
                    T.set_max_nreg(consumer_regs, 1)
                    T.barrier_wait(kv_ready[0], 0)
                    n_mine, n_other = ((n_tiles + 1) // 2, n_tiles // 2) if NC == 2 else ((n_tiles + NC - 1) // NC, 0)
                    consumer(0, tx, n_mine, n_other, 0, ring, full, empty, K_s, V_s, ent_s, 0, blk, t0, b, g,
                             seq, acc_s0, p0, acc_o0, m0, l0, qpos0, dst0, first, dst_s0, O_s0, Opart, Lpart, o_full,
                             o_free)
                elif NC == 2:  # consumer 1: tiles 1, 3, 5, ...
                    T.set_max_nreg(consumer_regs, 1)
                    T.barrier_wait(kv_ready[0], 0)
                    consumer(1, tx - 128, n_tiles // 2, (n_tiles + 1) // 2, 0, ring, full, empty, K_s, V_s, ent_s, 0, blk, t0,
                             b, g, seq, acc_s1, p1, acc_o1, m1, l1, qpos1, dst1, first, dst_s1, O_s1, Opart, Lpart, o_full,
                             o_free)
                elif NC == 3:  # three consumers: 1 takes tiles 1, 4, 7, ..., 2 takes tiles 2, 5, 8, ...
                    T.set_max_nreg(consumer_regs, 1)
                    T.barrier_wait(kv_ready[0], 0)
                    if tx < 256:
                        consumer(1, tx - 128, (n_tiles + 1) // 3, 0, 0, ring, full, empty, K_s, V_s, ent_s, 0, blk, t0,
                                 b, g, seq, acc_s1, p1, acc_o1, m1, l1, qpos1, dst1, first, dst_s1, O_s1, Opart, Lpart,
                                 o_full, o_free)
                    else:
                        consumer(2, tx - 256, n_tiles // 3, 0, 0, ring, full, empty, K_s, V_s, ent_s, 0, blk, t0,
                                 b, g, seq, acc_s2, p2, acc_o2, m2, l2, qpos2, dst2, first, dst_s2, O_s2, Opart, Lpart,
                                 o_full, o_free)


        if combine_warps:
            n_prev, n_prev_l, n_out = T.dynamic("n_prev, n_prev_l, n_out")

            if query_offset:
                @T.prim_func
                def kv_outer_attention_combine_offset(
                    Q: T.Tensor((batch, queries, heads, head_dim), dtype),
                    K: T.Tensor((batch, seq, groups, head_dim), dtype),
                    V: T.Tensor((batch, seq, groups, head_dim), dtype),
                    Items: T.Tensor((n_bg, n_items, 3), "int32"),
                    ItemCount: T.Tensor((n_bg,), "int32"),
                    Entries: T.Tensor((n_bg, cap), "int32"),
                    Opart: T.Tensor((batch, n_part, head_dim), partial_dtype),
                    Lpart: T.Tensor((batch, n_part), "float32"),
                    OpartPrev: T.Tensor((batch, n_prev, head_dim), partial_dtype),
                    LpartPrev: T.Tensor((batch, n_prev_l, R), "float32"),
                    O: T.Tensor((batch, n_out, head_dim), dtype),
                    LSE: T.Tensor((batch, n_out), "float32"),
                    t0: T.int32,
                    q0: T.int32,
                    t_prev: T.int32,
                    prev_queries: T.int32,
                ):
                    attention_items(Q, K, V, Items, ItemCount, Entries, Opart, Lpart, t0, q0, OpartPrev, LpartPrev, O,
                                    LSE, t_prev, prev_queries)

                return kv_outer_attention_combine_offset

            @T.prim_func
            def kv_outer_attention_combine(
                Q: T.Tensor((batch, seq, heads, head_dim), dtype),
                K: T.Tensor((batch, seq, groups, head_dim), dtype),
                V: T.Tensor((batch, seq, groups, head_dim), dtype),
                Items: T.Tensor((n_bg, n_items, 3), "int32"),
                ItemCount: T.Tensor((n_bg,), "int32"),
                Entries: T.Tensor((n_bg, cap), "int32"),
                Opart: T.Tensor((batch, n_part, head_dim), partial_dtype),
                Lpart: T.Tensor((batch, n_part), "float32"),
                OpartPrev: T.Tensor((batch, n_prev, head_dim), partial_dtype),
                LpartPrev: T.Tensor((batch, n_prev_l, R), "float32"),
                O: T.Tensor((batch, n_out, head_dim), dtype),
                LSE: T.Tensor((batch, n_out), "float32"),
                t0: T.int32,
                t_prev: T.int32,
                prev_queries: T.int32,
            ):
                attention_items(Q, K, V, Items, ItemCount, Entries, Opart, Lpart, t0, None, OpartPrev, LpartPrev, O,
                                LSE, t_prev, prev_queries)

            return kv_outer_attention_combine

        if query_offset:
            @T.prim_func
            def kv_outer_attention_offset(
                Q: T.Tensor((batch, queries, heads, head_dim), dtype),
                K: T.Tensor((batch, seq, groups, head_dim), dtype),
                V: T.Tensor((batch, seq, groups, head_dim), dtype),
                Items: T.Tensor((n_bg, n_items, 3), "int32"),
                ItemCount: T.Tensor((n_bg,), "int32"),
                Entries: T.Tensor((n_bg, cap), "int32"),
                Opart: T.Tensor((batch, n_part, head_dim), partial_dtype),
                Lpart: T.Tensor((batch, n_part), "float32"),
                t0: T.int32,
                q0: T.int32,
            ):
                attention_items(Q, K, V, Items, ItemCount, Entries, Opart, Lpart, t0, q0)

            return kv_outer_attention_offset

        @T.prim_func
        def kv_outer_attention(
            Q: T.Tensor((batch, seq, heads, head_dim), dtype),
            K: T.Tensor((batch, seq, groups, head_dim), dtype),
            V: T.Tensor((batch, seq, groups, head_dim), dtype),
            Items: T.Tensor((n_bg, n_items, 3), "int32"),
            ItemCount: T.Tensor((n_bg,), "int32"),
            Entries: T.Tensor((n_bg, cap), "int32"),
            Opart: T.Tensor((batch, n_part, head_dim), partial_dtype),
            Lpart: T.Tensor((batch, n_part), "float32"),
            t0: T.int32,
        ):
            attention_items(Q, K, V, Items, ItemCount, Entries, Opart, Lpart, t0, None)

        return kv_outer_attention

    if persistent:
        @T.macro
        def take_item(turn, cta, kv, Work, ItemCount, w):
            """Producer thread 0: the CTA's next item (its first is item ``cta``, later ones from the launch's
            counter Work[0]) as (bg, item of bg) in its K/V buffer's pair of Work; bg -1 when none is left. Items
            are numbered over the live ones only (ItemCount of each bg), so no turn goes to an empty item. The pair
            is global memory, ordered by the kv_ready mbarrier: shared memory has no 16 bytes left."""
            if turn == 0:
                w[0] = cta
            else:
                w[0] = ctas + T.atomic_add(Work[0], 1, return_prev=True)
            w[1] = -1  # its bg
            for x in T.serial(n_bg):
                if w[1] < 0:
                    if w[0] < ItemCount[x]:
                        w[1] = x
                    else:
                        w[0] -= ItemCount[x]
            Work[1 + 4 * cta + 2 * kv] = w[1]
            Work[1 + 4 * cta + 2 * kv + 1] = w[0]

        @T.macro
        def wait_item(kv, kv_ready, Work, cta, item, done):
            """A consumer's or the store warp's next item: wait for its K/V buffer ``kv`` (the role's item count
            ``done`` % 2), then read the (bg, item) pair the producer left for it (bg -1: none left)."""
            T.barrier_wait(kv_ready[kv], (done[0] // 2) & 1)
            item[0] = Work[1 + 4 * cta + 2 * kv]
            item[1] = Work[1 + 4 * cta + 2 * kv + 1]

        @T.macro
        def consumer_items(c, ctx, base, acc_s, p, acc_o, m, l, qpos, dst, dst_s, O_s, max_turns, Items, ItemCount,
                           ring, full, empty, kv_ready, kv_free, K_s, V_s, ent_s, Work, cta, item, done, first, t0,
                           seq, Opart, Lpart, o_full, o_free):
            """Consumer c's share of every item this CTA takes: wait for its K/V buffer, read which item it holds
            (its pair of Work: bg -1 when none is left), start it with the other consumer (the ping-pong's turns),
            run its tiles from ring tile base[0] on, free the buffer."""
            for _ in T.serial(max_turns):
                kv = done[0] % 2
                wait_item(kv, kv_ready, Work, cta, item, done)
                if item[0] < 0:
                    T.loop_break()
                blk, start, length = work_item(Items, ItemCount, item[0], item[1])
                T.sync_threads(6, 256)
                consumer(c, ctx, (T.ceildiv(length, TQ) + 1 - c) // 2, (T.ceildiv(length, TQ) + c) // 2, base[0],
                         ring, full, empty, K_s[kv, :, :], V_s[kv, :, :], ent_s, kv * n_entries, blk, t0,
                         item[0] // groups, item[0] % groups, seq, acc_s, p, acc_o, m, l, qpos, dst,
                         first, dst_s, O_s, Opart, Lpart, o_full, o_free)
                T.wait_wgmma(0)  # nothing is in flight; without it ptxas serialises every wgmma (C7518)
                T.barrier_arrive(kv_free[kv])
                base[0] += (T.ceildiv(length, TQ) + 1 - c) // 2
                done[0] += 1
            if tma_stores and not store_warp:
                T.tma_store_wait(0)  # the CTA's shared memory must outlive the copies

        @T.macro
        def store_items(max_turns, Items, ItemCount, kv_ready, kv_free, o_full, o_free, ent_s, Work, cta, item, done,
                        base0, base1, O_s0, O_s1, Opart):
            """The store warp of the persistent kernel: item after item (as the consumers take them), the TMA partial
            stores of each tile in the consumers' order, rows from the entries. A tile's O goes back to its consumer
            once the TMA unit has read it, before the next tile is taken: a consumer's next tile may follow its
            last at an item's end, so no release may wait for a later tile. It frees the item's entries (kv_free)
            after its last tile's stores are issued."""
            for _ in T.serial(max_turns):
                kv = done[0] % 2
                wait_item(kv, kv_ready, Work, cta, item, done)
                if item[0] < 0:
                    T.loop_break()
                length = work_item(Items, ItemCount, item[0], item[1])[2]
                for t in T.serial(T.ceildiv(length, TQ)):  # tile t is consumer t % 2's tile k in all
                    k = T.if_then_else(t % 2 == 0, base0[0], base1[0]) + t // 2
                    T.barrier_wait(o_full[t % 2], k & 1)
                    if t % 2 == 0:
                        issue_entry_boxes(ent_s, kv * (n_entries // TQ) + t, item[0] % groups, O_s0, Opart,
                                          item[0] // groups)
                    else:
                        issue_entry_boxes(ent_s, kv * (n_entries // TQ) + t, item[0] % groups, O_s1, Opart,
                                          item[0] // groups)
                    T.tma_store_wait(0)  # the tile's boxes have been read
                    T.barrier_arrive(o_free[t % 2])
                T.barrier_arrive(kv_free[kv])
                base0[0] += (T.ceildiv(length, TQ) + 1) // 2
                base1[0] += T.ceildiv(length, TQ) // 2
                done[0] += 1

        @T.macro
        def attention_persistent(Q, K, V, Items, ItemCount, Entries, Opart, Lpart, Work, t0, q0):
            with T.Kernel(ctas, threads=384) as cta:
                K_s = T.alloc_shared((2, Bk, D), dtype)  # [2, Bk, D]: this item's block and the next one's
                V_s = T.alloc_shared((2, Bk, D), dtype)
                ring = T.alloc_shared((2 * stages, rows, D), dtype)  # slot 2 s + c: consumer c's tiles, across items
                o_tile = (1, TQ, R, D) if tma_stores else (rows, D)
                O_s0 = T.alloc_shared(o_tile, partial_dtype)
                O_s1 = T.alloc_shared(o_tile, partial_dtype)
                # thread stores read each row's partial row from dst_s; TMA stores compute it from the entries
                dst_s0 = None if tma_stores else T.alloc_shared((rows,), "int32")
                dst_s1 = None if tma_stores else T.alloc_shared((rows,), "int32")
                ent_s = T.alloc_shared((2 * n_entries,), "int32")  # [2 x n_entries]: entries of K_s[0] / K_s[1]'s items
                acc_s0, acc_s1, p0, p1, acc_o0, acc_o1, m0, m1, l0, l1, qpos0, qpos1, dst0, dst1 = consumer_tiles()
                src = T.alloc_local((1,), "int32")  # the producer's current entry
                w = T.alloc_local((2,), "int32")  # the producer's next item (counted over live items, then in its bg), its bg
                item = T.alloc_local((2,), "int32")  # the (bg, item) a role works on
                first = T.alloc_local((1,), "int32")  # a consumer's first query of its tile
                done = T.alloc_local((1,), "int32")  # items this CTA has finished (K/V buffer done % 2)
                base0 = T.alloc_local((1,), "int32")  # tiles consumer 0 (the producer: each consumer) has had so far
                base1 = T.alloc_local((1,), "int32")
                T.annotate_layout({O_s0: make_swizzled_layout(O_s0), O_s1: make_swizzled_layout(O_s1)})
                # per K/V buffer: 128 cp.async completions + 128 entry writers; with TMA gathers the gathering warp,
                # after the entry writers' named barrier
                kv_ready = T.alloc_barrier([32, 32] if tma_gathers else [256, 256])
                # per K/V buffer: both consumers are done with its item (and the store warp with its entries)
                kv_free = T.alloc_barrier([288, 288] if store_warp else [256, 256])
                full = T.alloc_barrier([32 if tma_gathers else 128] * (2 * stages))  # per ring slot
                empty = T.alloc_barrier([128] * (2 * stages))
                o_full = T.alloc_barrier([128, 128]) if store_warp else None  # per consumer's O tile
                o_free = T.alloc_barrier([32, 32]) if store_warp else None

                tx = T.get_thread_binding()
                if pdl:
                    T.pdl_trigger()  # the next kernel may launch; its CTAs wait for this grid before they read
                    T.pdl_sync()  # the kernel before (the previous chunk's combine reads the partials written here)
                max_turns = n_bg * n_items + 1  # a bound only: every role leaves at the item with bg -1
                done[0] = 0
                base0[0] = 0
                base1[0] = 0
                if tx >= 256:  # producer: item after item, K/V and entries into the free buffer, then its tiles
                    T.set_max_nreg(producer_regs, 0)
                    if store_warp:
                        if tx >= 256 + P:  # the store warp: the warpgroup's last
                            store_items(max_turns, Items, ItemCount, kv_ready, kv_free, o_full, o_free, ent_s, Work,
                                        cta, item, done, base0, base1, O_s0, O_s1, Opart)
                    for turn in T.serial(T.if_then_else(tx < 256 + P, max_turns, 0)):  # the store warp takes none
                        kv = done[0] % 2
                        T.barrier_wait(kv_free[kv], ((done[0] // 2) & 1) ^ 1)
                        if tx == 256:
                            take_item(turn, cta, kv, Work, ItemCount, w)
                        T.sync_threads(5, P)  # the item is written
                        item[0] = Work[1 + 4 * cta + 2 * kv]
                        item[1] = Work[1 + 4 * cta + 2 * kv + 1]
                        if item[0] < 0:  # none left: release the consumers (and the store warp) and stop
                            if tma_gathers:
                                if tx < 256 + 32:
                                    T.barrier_arrive(kv_ready[kv])
                            else:  # 256 arrivals
                                T.barrier_arrive(kv_ready[kv])
                                T.barrier_arrive(kv_ready[kv])
                            T.loop_break()
                        bg = item[0]
                        blk, start, length = work_item(Items, ItemCount, bg, item[1])
                        for e in T.serial(T.ceildiv(n_entries, P)):
                            if e * P + tx - 256 < n_entries:
                                ent_s[kv * n_entries + e * P + tx - 256] = T.if_then_else(
                                    e * P + tx - 256 < length, Entries[bg, start + e * P + tx - 256], -1)
                        T.sync_threads(5, P)  # every gathering thread reads every entry
                        if tma_gathers:
                            if tx < 256 + 32:  # one warp
                                tma_load_block(K, V, bg // groups, blk, bg % groups, K_s, V_s, kv, kv_ready, kv)
                                T.barrier_arrive(kv_ready[kv])  # release: the item and the entries written above
                        else:
                            T.async_copy(K[bg // groups, blk * Bk:(blk + 1) * Bk, bg % groups, :], K_s[kv, :, :])
                            T.async_copy(V[bg // groups, blk * Bk:(blk + 1) * Bk, bg % groups, :], V_s[kv, :, :])
                            T.cp_async_barrier_noinc(kv_ready[kv])
                            T.barrier_arrive(kv_ready[kv])  # release: the item and the entries written above
                        if not tma_gathers or tx < 256 + 32:  # TMA gathers: the one warp
                            for t in T.serial(T.ceildiv(length, TQ)):  # tile t is consumer t % 2's tile j in all
                                j = T.if_then_else(t % 2 == 0, base0[0], base1[0]) + t // 2
                                T.barrier_wait(empty[2 * (j % stages) + t % 2], ((j // stages) & 1) ^ 1)
                                if tma_gathers:
                                    tma_gather_tile(ring, 2 * (j % stages) + t % 2, full, ent_s,
                                                    kv * n_entries + t * TQ, Q, bg // groups, bg % groups,
                                                    q_rows(t0, q0), src)
                                else:
                                    gather_tile_rows(ent_s, kv * (n_entries // TQ) + t, q_rows(t0, q0), bg // groups,
                                                     bg % groups, tx - 256, src, 2 * (j % stages) + t % 2, ring, Q)
                                    T.cp_async_barrier_noinc(full[2 * (j % stages) + t % 2])
                        base0[0] += (T.ceildiv(length, TQ) + 1) // 2
                        base1[0] += T.ceildiv(length, TQ) // 2
                        done[0] += 1
                elif tx < 128:  # consumer 0: tiles 0, 2, 4, ... of every item
                    T.set_max_nreg(consumer_regs, 1)
                    consumer_items(0, tx, base0, acc_s0, p0, acc_o0, m0, l0, qpos0, dst0, dst_s0, O_s0, max_turns,
                                   Items, ItemCount, ring, full, empty, kv_ready, kv_free, K_s, V_s, ent_s, Work,
                                   cta, item, done, first, t0, seq, Opart, Lpart, o_full, o_free)
                else:  # consumer 1: tiles 1, 3, 5, ... of every item
                    T.set_max_nreg(consumer_regs, 1)
                    consumer_items(1, tx - 128, base1, acc_s1, p1, acc_o1, m1, l1, qpos1, dst1, dst_s1, O_s1,
                                   max_turns, Items, ItemCount, ring, full, empty, kv_ready, kv_free, K_s, V_s, ent_s,
                                   Work, cta, item, done, first, t0, seq, Opart, Lpart, o_full, o_free)


        if query_offset:
            @T.prim_func
            def kv_outer_attention_persistent_offset(
                Q: T.Tensor((batch, queries, heads, head_dim), dtype),
                K: T.Tensor((batch, seq, groups, head_dim), dtype),
                V: T.Tensor((batch, seq, groups, head_dim), dtype),
                Items: T.Tensor((n_bg, n_items, 3), "int32"),
                ItemCount: T.Tensor((n_bg,), "int32"),
                Entries: T.Tensor((n_bg, cap), "int32"),
                Opart: T.Tensor((batch, n_part, head_dim), partial_dtype),
                Lpart: T.Tensor((batch, n_part), "float32"),
                Work: T.Tensor((1 + 4 * ctas,), "int32"),
                t0: T.int32,
                q0: T.int32,
            ):
                attention_persistent(Q, K, V, Items, ItemCount, Entries, Opart, Lpart, Work, t0, q0)

            return kv_outer_attention_persistent_offset

        @T.prim_func
        def kv_outer_attention_persistent(
            Q: T.Tensor((batch, seq, heads, head_dim), dtype),
            K: T.Tensor((batch, seq, groups, head_dim), dtype),
            V: T.Tensor((batch, seq, groups, head_dim), dtype),
            Items: T.Tensor((n_bg, n_items, 3), "int32"),
            ItemCount: T.Tensor((n_bg,), "int32"),
            Entries: T.Tensor((n_bg, cap), "int32"),
            Opart: T.Tensor((batch, n_part, head_dim), partial_dtype),
            Lpart: T.Tensor((batch, n_part), "float32"),
            Work: T.Tensor((1 + 4 * ctas,), "int32"),
            t0: T.int32,
        ):
            attention_persistent(Q, K, V, Items, ItemCount, Entries, Opart, Lpart, Work, t0, None)

        return kv_outer_attention_persistent


# Roles and barriers are written by hand: TileLang's own warp specialisation and its automatic
# shared-memory syncs (which would put barriers between every two gathers of the producer) stay off.
# Fast math makes exp2 one ex2.approx: the accurate exp2f costs four instructions per score, a
# quarter of the consumers' issue slots (NOTES.md).
kv_outer_program.pass_configs = {"tl.disable_warp_specialized": True, "tl.disable_thread_storage_sync": True,
                                 "tl.enable_fast_math": True}


# build_once: one schedule build for every query chunk (3 launches, not 3 per chunk; the schedule then holds
# ~N * G * topk int32) instead of one build per chunk. shared_tiles: query tiles whose rows chose the same
# blocks run msa_tl.attention.shared_tiles' Q-outer kernel instead of leaving partials. persistent_combine: the combine
# runs msa_tl.attention.combine's persistent program (a CTA an SM, TMA bulk copies) where its ring fits.
# combine_ctas: 0, each chunk's combine follows its attention on the caller's stream; else it runs as a persistent
# combine of this many CTAs on a side stream of higher priority, beside the next chunk's attention (which then keeps
# the other SMs): at small chunks the attention is bound by its tiles, not by DRAM, and the combine's bytes fill the
# idle DRAM (NOTES.md). local_combine: each query's own block is left out of the KV-outer items and attended by
# msa_tl.attention.local_combine's combine instead, which writes and reads no partial for it. fused_prep: the index
# rows' bookkeeping (shared tiles, the KV-outer copy, RowFlags) in one launch (msa_tl.attention.row_prep) instead of
# ~12 torch ops ("warps": a warp a query tile). tiles_stream: with the local combine, the shared tiles' kernel runs on
# a side stream beside the chunks (on the SMs each chunk's local combine leaves idle) instead of after the last chunk:
# listed, once the host has their count; a CTA every triple, from the start.
SCHEDULE_TUNABLES = dict(SCHEDULE_DEFAULTS, query_chunk=16384, build_once=True, shared_tiles=True,
                         persistent_combine=True, accumulate=False, combine_ctas=0, local_combine=False,
                         fused_prep=False, tiles_stream=False)
# The persistent combine streams the shared tiles' empty partials too; it is ~6% faster a row than the per-row
# combine (8.48 vs 9.01 ms at 128K, H200), so it stays the default while the tiles own at most this share of the
# tiles (random selections: the first topk blocks' queries, 1.6% at 128K; realistic: all).
PERSISTENT_COMBINE_TILE_SHARE = 1 / 16
SCHEDULE_KNOBS = dict(item_queries=(128, 256, 512, 1024, 4096), query_chunk=(4096, 8192, 16384, 32768),
                      build_once=(False, True), shared_tiles=(False, True), persistent_combine=(False, True),
                      accumulate=(False, True), combine_ctas=(0, 16, 24, 32, 48), local_combine=(False, True),
                      fused_prep=FUSED_CHOICES, tiles_stream=(False, True))


def persistent_work(ctas: int, launches: int, device) -> torch.Tensor:
    """The persistent attention's Work [launches, 1 + 4 ctas] int32, zeroed: a row a launch (its item counter,
    then each CTA's (bg, item) pair of both K/V buffers)."""
    return torch.zeros(launches, 1 + 4 * ctas, device=device, dtype=torch.int32)


def attention_defaults(heads_per_group: int, partial_bytes: int = 2) -> dict:
    """The forward kernel's defaults for a GQA ratio and partial element size: TMA partial stores (and their L2
    policy) only where a query's box has >= 8 rows and the double-buffered O tiles are bf16/fp16 (fp32 ones
    overflow shared memory); TMA gathers where a query's box has >= 8 rows."""
    tma = ATTENTION_DEFAULTS["tma_stores"] and heads_per_group >= TMA_MIN_HEADS and partial_bytes == 2
    return dict(ATTENTION_DEFAULTS, tma_stores=tma, store_eviction=ATTENTION_DEFAULTS["store_eviction"] if tma else "",
                tma_gathers=ATTENTION_DEFAULTS["tma_gathers"] and heads_per_group >= TMA_MIN_HEADS)


def without_unfit_persistent(config: dict, asked, heads_per_group: int, head_dim: int, block_size: int,
                             item_queries: int, partial_bytes: int) -> dict:
    """``config`` with the persistent kernel off where it came from a default or tuned config (not from ``asked``,
    the caller's own knobs) and its shared memory does not fit beside the other knobs, and with TMA gathers off
    where they came from one and the kernel is persistent (its TMA gathers have not been measured against its
    cp.async ones) unless the store warp, which needs them, is on; asked for, the kernel raises instead."""
    asked = asked or {}
    if config["persistent"] and "persistent" not in asked and persistent_shared_bytes(
            heads_per_group, head_dim, block_size, item_queries, config["stages"], config["tma_stores"],
            partial_bytes) > SMEM_LIMIT:
        config = dict(config, persistent=False)
    if config["persistent"] and config.get("tma_gathers") and "tma_gathers" not in asked and \
            not config.get("store_warp"):
        config = dict(config, tma_gathers=False)
    return config


# Above this head dim a 128-key block's K/V, two consumers' Q tiles and their O tiles do not fit shared memory, nor
# S and O registers: the forward runs a block as its 64-key halves (split_blocks), with direct stores.
WIDE_HEAD_DIM = 128
WIDE_HEAD_BLOCK = 64
WIDE_HEAD_CONFIG = dict(tma_stores=False, direct_stores=True, stages=2)
WIDE_HEAD_CHUNK = 4096  # queries a chunk: 4 GiB of bf16 partials at Hq = 64, 2 x 16 slots, D = 256


def split_blocks(indices: torch.Tensor, block_size: int, into: int, query_start: int = 0) -> torch.Tensor:
    """indices [B, N, G, k] of ``block_size``-key blocks (queries from position ``query_start``) -> [B, N, G,
    k * block_size // into] of their ``into``-key parts that each query can see (parts in its future -1), in the
    same slot order."""
    B, N, G, k = indices.shape
    parts = block_size // into
    child = (indices[..., None] * parts + torch.arange(parts, device=indices.device)).flatten(-2)
    local = ((torch.arange(N, device=indices.device) + query_start) // into).view(1, N, 1, 1)
    return torch.where((indices >= 0).repeat_interleave(parts, dim=-1) & (child <= local), child, -1).int()


def wide_head_blocks(indices: torch.Tensor, block_size: int, head_dim: int, query_chunk, query_start: int = 0):
    """(indices, block_size, query_chunk) as the attention stages run them: above ``WIDE_HEAD_DIM`` each block as its
    ``WIDE_HEAD_BLOCK``-key parts (:func:`split_blocks`) in chunks of ``WIDE_HEAD_CHUNK`` queries unless told; else
    as given."""
    if head_dim <= WIDE_HEAD_DIM:
        return indices, block_size, query_chunk
    if block_size > WIDE_HEAD_BLOCK:
        indices, block_size = split_blocks(indices, block_size, WIDE_HEAD_BLOCK, query_start), WIDE_HEAD_BLOCK
    return indices, block_size, query_chunk or WIDE_HEAD_CHUNK


def sparse_attention_forward(q, k, v, indices, block_size: int, scale=None, *, query_chunk=None,
                             item_queries=None, build_once=None, shared_tiles=None, persistent_combine=None,
                             partial_dtype=None, attention_config=None, combine_config=None,
                             persistent_combine_config=None, accumulate=None, accumulate_config=None,
                             combine_ctas=None, local_combine=None, local_combine_config=None, fused_prep=None,
                             tiles_stream=None, tile_config=None, out=None, lse_out=None, query_start: int = 0):
    """Main-branch forward on the GPU (KV-outer + combine).

    q [B, N, Hq, D], k/v [B, N, G, D] (bf16/fp16, contiguous), indices
    [B, N, G, topk] int32 (-1 = unused) -> (o [B, N, Hq, D] in q's dtype,
    lse [B, N, Hq] float32; ``out`` / ``lse_out`` may supply them). ``query_start``: q, indices, o and lse hold
    the queries from that position on (N of them), k / v the query_start + N keys up to the last: the kernels read
    and write the query side at that offset (no rows before it are allocated); shared tiles need it to be a
    multiple of ``block_size``. Workspace:
    B * chunk * Hq * topk * (D * partial bytes + 4) plus the schedule: every chunk's, built in one go
    (~4 * B * N * G * topk bytes) with ``build_once`` (the default), else one chunk's at a time.
    ``shared_tiles`` (default on): query tiles whose queries chose the same blocks (:mod:`msa_tl.attention.shared_tiles`)
    are attended Q-outer, with no partials; the host reads their count (behind an event, after the KV-outer schedule
    is queued: the GPU is not drained), and where they hold every row the KV-outer path is not launched.
    ``persistent_combine``: the combine is :func:`msa_tl.attention.combine.persistent_combine_program` (a ValueError
    where its ring does not fit, if asked for; by default not where shared tiles own more than
    ``PERSISTENT_COMBINE_TILE_SHARE`` of the tiles, whose rows' empty partials it would stream). ``combine_ctas``:
    where > 0, each chunk's persistent combine runs on that many CTAs on a side stream of higher priority, beside
    the next chunk's attention, and the partials are double-buffered (the last chunk's combine takes every SM);
    it needs the persistent combine (asked for without it, a ValueError). ``query_chunk``, ``item_queries``,
    ``build_once``, ``shared_tiles``, ``persistent_combine``, ``combine_ctas`` and the kernels' configs default to
    the tuned configs of this GPU and shape (:func:`msa_tl.tuning.cache.tuned_config`), else the documented defaults.

    ``accumulate``: the KV-outer rows run :func:`msa_tl.attention.accumulate.accumulate_forward` (each block's
    P V added into per-query fp32 accumulators kept in the L2: no partials, no combine; ``accumulate_config``:
    its ``query_chunk``, ``item_queries``, ``stages``) instead of partials and a combine; rows it flags (exponents
    past its fp32 range) are recomputed on the partials path (one host sync on the flag count). Asked for where
    the layout does not allow it, a ValueError; by default where it does.

    ``local_combine``: each query's own key block is left out of the KV-outer items; the combine
    (:func:`msa_tl.attention.local_combine.local_combine_program`, a CTA per key block and KV head) attends it and
    merges it with the other partials, so no partial is written or read for it. 16-bit partials, 8-64 heads per KV
    head, head dims 64 / 128, queries from position 0, not with the accumulators, combine warps or ``combine_ctas``
    (asked for there, a ValueError; a tuned config's local combine is left off there); ``local_combine_config``: its
    knobs (``LOCAL_COMBINE_DEFAULTS``). With it the KV-outer chunks are queued before the shared tiles' count is
    read (rows without partials load nothing, an empty schedule has no work), so the host waits only for the row
    prep, long done by then, and the GPU is never drained; where the tiles own every row, the empty chunks still
    launch (~0.7 ms at 128K on the H100, NOTES.md session 29). The roles tile kernel (128-row tiles) runs a CTA a
    shared (tile, KV head) only, from :func:`msa_tl.attention.shared_tiles.list_shared_tiles` (a CTA every triple
    while a CUDA graph is captured, with the persistent tile kernel, or with ``tile_config=dict(listed=False)``).
    ``fused_prep``: the index rows' bookkeeping (:func:`msa_tl.attention.row_prep.prepare_rows`) in one
    launch instead of torch ops (``"warps"``: a warp a query tile instead of a thread). ``tiles_stream`` (with the
    local combine; asked for without it, a ValueError): the shared tiles' kernel runs on a side stream, beside the
    chunks (on the SMs their combines leave idle): listed, it is queued there once the host has read the count
    (after the chunks), behind an event after the list; unlisted (a CTA every triple), first, beside the schedule
    build. The caller's stream waits for the side stream before the forward returns.
    ``tile_config``: the shared tiles' kernel's knobs (:func:`msa_tl.attention.shared_tiles.shared_tile_attention`;
    ``listed=False``: a CTA every triple).

    Head dims above ``WIDE_HEAD_DIM`` (e.g. 256) run each block as its 64-key halves (:func:`split_blocks`: twice the
    slots) with ``WIDE_HEAD_CONFIG`` (direct stores), without shared tiles, in chunks of ``WIDE_HEAD_CHUNK``
    queries unless told.
    """
    B, N, Hq, D = q.shape
    if k.shape[1] != query_start + N:
        raise ValueError(f"k / v hold the {query_start + N} keys up to the last query (query_start {query_start} + "
                         f"{N} queries), got {k.shape[1]}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    wide = D > WIDE_HEAD_DIM
    if wide or query_start % block_size:
        if shared_tiles:
            raise ValueError(f"shared_tiles: head dims up to {WIDE_HEAD_DIM} and queries from a block boundary only, "
                             f"got {D} and query_start {query_start}")
        shared_tiles = False
    indices, block_size, query_chunk = wide_head_blocks(indices, block_size, D, query_chunk, query_start)
    G, topk = k.shape[2], indices.shape[3]
    R = Hq // G
    partial_dtype = partial_dtype or q.dtype  # fp16 inputs keep fp16 partials: bf16 ones would cost 3 bits
    shape = dict(groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk, seq=N)
    schedule_config = tuned_config("schedule", shape, SCHEDULE_TUNABLES, q.device)
    item_queries = item_queries or schedule_config["item_queries"]
    chunk = min(N, query_chunk or schedule_config["query_chunk"])
    # wide heads: a tuned config for the shape (searched within what fits) still wins over WIDE_HEAD_CONFIG
    defaults = {**attention_defaults(R, partial_dtype.itemsize), **(WIDE_HEAD_CONFIG if wide else {})}
    asked_attention = attention_config
    merged = {**tuned_config("kv_outer_attention", shape, defaults, q.device), **(attention_config or {})}
    if attention_knob_conflict(merged):  # the tuned knobs yield to the caller's (the defaults' conflicts raise)
        merged = {**defaults, **(attention_config or {})}
    attention_config = without_unfit_persistent(merged, attention_config, R, D, block_size, item_queries,
                                                partial_dtype.itemsize)
    if attention_config.get("persistent"):  # one CTA an SM unless told
        attention_config.setdefault("ctas", sm_count(q.device))
    combine_config = {**tuned_config("lse_combine", shape, COMBINE_DEFAULTS, q.device), **(combine_config or {})}
    persistent_config = {**PERSISTENT_COMBINE_DEFAULTS, **(persistent_combine_config or {})}
    unfit = persistent_combine_limit(Hq, D, topk, G, partial_dtype.itemsize, persistent_config)
    if persistent_combine and unfit:
        raise ValueError(f"persistent_combine: {unfit}")
    o = torch.empty_like(q) if out is None else out
    lse = torch.empty((B, N, Hq), device=q.device, dtype=torch.float32) if lse_out is None else lse_out
    build_once = schedule_config["build_once"] if build_once is None else build_once
    shared_tiles = schedule_config["shared_tiles"] if shared_tiles is None else shared_tiles
    unsupported = "head dims <= 128" if wide else accumulate_unsupported(R, D, q.dtype, query_start)
    if accumulate and combine_ctas:
        raise ValueError("combine_ctas: the accumulators have no combine to overlap")
    if accumulate and unsupported:
        raise ValueError(f"accumulate: {unsupported}")
    accumulate = (schedule_config["accumulate"] and not unsupported) if accumulate is None else accumulate
    asked_local = local_combine
    local_combine = schedule_config["local_combine"] if local_combine is None else local_combine
    local_config = {**LOCAL_COMBINE_DEFAULTS, **(local_combine_config or {})}
    if local_combine:
        conflicts = {"head dims <= 128": wide, "queries from position 0": query_start,
                     "not with the accumulators": accumulate, "not with combine_ctas": combine_ctas,
                     "not with combine warps": attention_config.get("combine_warps")}
        why = next((why for why, bad in conflicts.items() if bad), None) or local_combine_unsupported(
            R, D, block_size, topk, partial_dtype.itemsize, local_config)
        if why and asked_local:
            raise ValueError(f"local_combine: {why}")
        # a tuned config's local combine yields to what the caller asked for (or the layout needs)
        local_combine = not why
    if local_combine:
        combine_ctas = 0  # not the tuned config's side-stream combine either
    tiles = 0  # query tiles attended Q-outer
    count_tiles = shared_tiles and not local_combine  # the host reads the count (one sync on an event)
    # shared [B, N // TQ, G] (with shared tiles), the KV-outer path's indices, the local combine's RowFlags [B, N, G]
    fused_prep = schedule_config["fused_prep"] if fused_prep is None else fused_prep
    if tiles_stream and not local_combine:
        raise ValueError("tiles_stream: with local_combine (the path that does not wait for the tiles' count)")
    tiles_stream = (schedule_config["tiles_stream"] if tiles_stream is None else tiles_stream) and local_combine
    shared, kv_indices, flags = prepare_rows(indices, R, block_size, shared_tiles, local_combine, fused=fused_prep)

    def attend_shared_tiles(listed=None):
        shared_tile_attention(q, k, v, indices, shared, block_size, scale, o, lse, config=tile_config,
                              query_start=query_start, listed=listed)

    # The shared triples listed for a grid of only them (a random selection shares ~1 in 64, a CTA each of the
    # others costs an SM's shared memory to start and leave): the host reads their count once the KV-outer chunks
    # are queued, so the GPU is not drained; a CUDA graph being captured keeps a CTA every triple.
    listing = (shared_tiles and tile_rows(R, block_size) == 128
               and not (tile_config or {}).get("persistent") and (tile_config or {}).get("listed", True)
               and not (q.is_cuda and torch.cuda.is_current_stream_capturing()))
    if listing:
        tile_list, listed_count = list_shared_tiles(shared)
    if count_tiles or listing:
        tile_count, counted = _count_to_host(listed_count if listing else shared)  # the list's prefix sum holds it
    tiles_side = None  # the side stream the shared tiles run on: listed, they are queued there once the host has
    # their count, after the chunks, and run beside them (on the SMs the chunks' combines leave); else every triple
    # from the start
    if tiles_stream and shared_tiles:
        main, tiles_side = torch.cuda.current_stream(q.device), _side_stream(q.device, "tiles")
        if listing:
            listed_ready = main.record_event()  # the list and the inputs
        else:
            tiles_side.wait_stream(main)  # shared and the inputs
            with torch.cuda.stream(tiles_side):
                attend_shared_tiles()
    # The schedule is queued before the tile count is read, so the GPU builds it while the host waits for the count
    # (a plain host sync would drain the GPU and leave it idle while the launches after it are issued: ~1 ms a
    # forward, NOTES.md). Where the tiles hold every row it goes unused. The accumulators build their own.
    schedule = None if accumulate else _kv_outer_schedule(kv_indices, block_size, chunk, item_queries, build_once,
                                                          math.ceil(k.shape[1] / block_size))
    kv_outer_rows = True  # any row left for the KV-outer path
    if count_tiles:
        counted.synchronize()
        tiles = int(tile_count)
        kv_outer_rows = tiles < shared.numel() or N % tile_queries(R, block_size) > 0
    flagged = None  # with the accumulators: the (query, KV head) rows past their fp32 range
    if kv_outer_rows and accumulate:
        config = {**ACCUMULATE_DEFAULTS, **(accumulate_config or {})}
        flagged = accumulate_forward(q, k, v, kv_indices, block_size, scale, o, lse, **config).bool()
        flag_count, flags_counted = _count_to_host(flagged)
    elif kv_outer_rows:
        # by default only beside few shared tiles: the persistent combine streams every pair's partials, where the
        # per-row combine skips the rows the tiles own
        few_tiles = not tiles or tiles <= shared.numel() * PERSISTENT_COMBINE_TILE_SHARE
        persistent_combine = (schedule_config["persistent_combine"] and few_tiles if persistent_combine is None
                              else persistent_combine)
        if combine_ctas and not (persistent_combine and not unfit):
            raise ValueError(f"combine_ctas: the overlapped combine is the persistent one, which is "
                             f"{unfit or 'off'} here")
        if combine_ctas is None:
            combine_ctas = schedule_config["combine_ctas"] if persistent_combine and not unfit else 0
        if combine_ctas and attention_config.get("combine_warps"):
            raise ValueError("combine_ctas: the attention's combine warps already merge the previous chunk")
        if combine_ctas and attention_config.get("persistent") and "ctas" not in (asked_attention or {}):
            # the attention's CTAs each take their first item at once: none should wait for the combine's SMs
            attention_config["ctas"] = max(1, sm_count(q.device) - combine_ctas)
        _kv_outer_forward(q, k, v, kv_indices, schedule, block_size, scale, o, lse, chunk, partial_dtype,
                          attention_config, combine_config, persistent_config, unfit, bool(tiles), persistent_combine,
                          query_start, combine_ctas, flags, local_config)
    if listing:
        if not count_tiles:  # the count was queued before the chunks, which the GPU runs while the host waits here
            counted.synchronize()
            tiles = int(tile_count)
        if tiles and tiles_side is not None:
            tiles_side.wait_event(listed_ready)
            with torch.cuda.stream(tiles_side):
                attend_shared_tiles(tile_list[:tiles])
        elif tiles:
            attend_shared_tiles(tile_list[:tiles])
    if tiles_side is not None:
        # the rows are disjoint from the KV-outer path's; o, lse, shared and the list (freed for the caller's stream)
        # are safe once the caller's stream has waited for the side stream
        torch.cuda.current_stream(q.device).wait_stream(tiles_side)
    elif not listing and (tiles or (shared_tiles and not count_tiles)):
        attend_shared_tiles()
    if flagged is not None:
        flags_counted.synchronize()
        if int(flag_count):  # exactly on the partials path
            redo = torch.where(flagged[..., None], kv_indices, -1).contiguous()
            o2, lse2 = torch.empty_like(o), torch.empty_like(lse)
            sparse_attention_forward(q, k, v, redo, block_size, scale, accumulate=False, shared_tiles=False,
                                     query_chunk=query_chunk, out=o2, lse_out=lse2)
            rows = flagged.repeat_interleave(R, dim=2)  # [B, N, Hq]
            o[rows], lse[rows] = o2[rows], lse2[rows]
    return o, lse


def _count_to_host(mask: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """``mask.sum()`` (a 0/1 mask, or a count already summed) copied into pinned host memory, and the event after the
    copy: synchronizing on the event waits for the count only, not for the work queued after it."""
    count = torch.empty((), dtype=torch.int64, pin_memory=True)
    count.copy_(mask.sum(), non_blocking=True)
    counted = torch.cuda.Event()
    counted.record(torch.cuda.current_stream(mask.device))
    return count, counted


def _kv_outer_schedule(indices, block_size: int, chunk: int, item_queries: int, build_once: bool,
                       n_blocks: int) -> Schedule:
    """The KV-outer path's schedule buffers over ``n_blocks`` key blocks, built here for every chunk at once with
    ``build_once`` or where there is one chunk (else one chunk's buffers, built per chunk by
    :func:`_kv_outer_forward`)."""
    B, N, G, topk = indices.shape
    chunks = math.ceil(N / chunk)
    schedule = Schedule(B, G, n_blocks, chunk, topk, item_queries, indices.device,
                        chunks=chunks if build_once else 1)
    if schedule.chunks == chunks:
        schedule.build(indices, 0, N)
    return schedule


def _kv_outer_forward(q, k, v, indices, schedule, block_size, scale, o, lse, chunk, partial_dtype, attention_config,
                      combine_config, persistent_config, unfit, tiles: bool, persistent_combine: bool,
                      query_start: int = 0, combine_ctas: int = 0, flags=None, local_config=None):
    """The KV-outer path of :func:`sparse_attention_forward` (attention and combine by query chunk; ``schedule`` from
    :func:`_kv_outer_schedule`: built for every chunk, or here per chunk where it holds one) into o / lse.
    ``tiles``: shared tiles own some rows, whose empty partials the per-row combine skips. ``query_start``: the
    position of q's first row (the attention's build with a query offset). ``combine_ctas`` > 0: each chunk but the
    last is combined on a side stream by that many persistent CTAs while the next chunk's attention runs.
    ``attention_config["combine_warps"]``: each chunk but the last is merged by the next chunk's attention kernel (its
    combine warps), the last by the combine kernel; the partials are double-buffered. ``flags`` [B, N, G]
    (:func:`msa_tl.attention.local_combine.row_flags`): the own blocks are left out of ``indices`` and each chunk's
    combine is the local combine (knobs ``local_config``), which attends them and reads only the slots the flags
    mark, so its chunks' LSE partials need no -inf fill."""
    B, N, Hq, D = q.shape
    G, topk = k.shape[2], indices.shape[3]
    chunks = math.ceil(N / chunk)
    built = schedule.chunks == chunks  # every chunk's schedule is already there
    overlap = bool(combine_ctas) and chunks > 1
    fused = bool(attention_config.get("combine_warps"))
    # chunk c's partials in buffer c % 2: the next chunk writes the other
    buffers = 2 if overlap or (fused and chunks > 1) else 1
    o_part = torch.empty(buffers, B * chunk * Hq * topk * D, device=q.device, dtype=partial_dtype)
    l_part = torch.empty(buffers, B * chunk * Hq * topk, device=q.device, dtype=torch.float32)
    dt, pdt = tl_dtype(q.dtype), tl_dtype(partial_dtype)
    attention = compiled_kernel(kv_outer_program, groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk,
                                scale=scale, item_queries=schedule.item_queries, dtype=dt, partial_dtype=pdt,
                                **attention_config, **(dict(query_offset=True) if query_start else {}))
    if flags is not None:
        combine = compiled_kernel(local_combine_program, heads=Hq, head_dim=D, topk=topk, groups=G,
                                  block_size=block_size, scale=scale, dtype=dt, partial_dtype=pdt, **local_config)
    elif persistent_combine and not unfit:
        ctas = persistent_config["ctas"] or sm_count(q.device)
        combine = compiled_kernel(persistent_combine_program, heads=Hq, head_dim=D, topk=topk, groups=G, dtype=dt,
                                  partial_dtype=pdt, **dict(persistent_config, ctas=ctas))
    else:
        combine = compiled_kernel(combine_program, heads=Hq, head_dim=D, topk=topk, groups=G, dtype=dt,
                                  partial_dtype=pdt, **combine_config, **(dict(skip_empty=True) if tiles else {}))
    side_combine = side = None
    if overlap:
        side_combine = compiled_kernel(persistent_combine_program, heads=Hq, head_dim=D, topk=topk, groups=G,
                                       dtype=dt, partial_dtype=pdt, **dict(persistent_config, ctas=combine_ctas))
        main, side = torch.cuda.current_stream(q.device), _side_stream(q.device, "combine")
        read = [None] * buffers  # the event after the side combine that last read each buffer
    work = persistent_work(attention_config["ctas"], chunks, q.device) if attention_config.get("persistent") else None
    previous = None  # combine warps: the (partials, LSE partials, first query, queries) the next launch merges
    o_rows, lse_rows = o.view(B, N * Hq, D), lse.view(B, N * Hq)  # a row a (query, head): the merges write them
    for c, t0 in enumerate(range(0, N, chunk)):
        count = min(chunk, N - t0)
        if not built:
            schedule.build(indices, t0, count)
        items, item_count, entries = schedule.part(c if built else 0)
        op = o_part[c % buffers, : B * count * Hq * topk * D].view(B, count * Hq * topk, D)
        lp = l_part[c % buffers, : B * count * Hq * topk].view(B, count * Hq * topk)
        if overlap and read[c % buffers] is not None:
            main.wait_event(read[c % buffers])
        if flags is None:  # the slots no item writes keep -inf
            lp.fill_(float("-inf"))
        merged, last = (), ()
        if fused:  # the first chunk's launch merges nothing
            op_prev, lp_prev, t_prev, n_prev = previous or (op, lp, 0, 0)
            merged = (op_prev, lp_prev.view(B, -1, Hq // G), o_rows, lse_rows)
            last = (t_prev, n_prev)
        attention(q, k, v, items, item_count, entries, op, lp, *merged, *([] if work is None else [work[c]]),
                  query_start + t0, *((query_start,) if query_start else ()), *last)
        args = (op.view(B, count * G, topk, Hq // G, D), lp.view(B, count * G, topk, Hq // G), o_rows, lse_rows, t0)
        if overlap and c + 1 < chunks:
            side.wait_stream(main)  # this chunk's attention (and o, lse, the partials: the caller's stream's)
            with torch.cuda.stream(side):
                side_combine(*args)
            read[c % buffers] = side.record_event()
        elif fused and c + 1 < chunks:
            previous = (op, lp, t0, count)
        elif flags is not None:
            combine(q, k, v, flags, op, lp.view(B, -1, Hq // G), o, lse, t0, t0 + count)
        else:
            combine(*args)
    if overlap:
        main.wait_stream(side)


_SIDE_STREAMS = {}
# the overlapped combine's: the highest priority (a priority below the range maps to the highest the device has), so as
# the attention's CTAs drain the combine's are placed first and it holds its SMs from the start of the next chunk's
# attention; the shared tiles': the lowest, the default stream's (CTAs of equal priority are placed in launch order)
_SIDE_STREAM_PRIORITY = dict(combine=-100, tiles=0)


def _side_stream(device, role: str) -> torch.cuda.Stream:
    """The device's side stream for ``role`` ("combine", "tiles"), made once."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (index, role) not in _SIDE_STREAMS:
        _SIDE_STREAMS[index, role] = torch.cuda.Stream(device=index, priority=_SIDE_STREAM_PRIORITY[role])
    return _SIDE_STREAMS[index, role]


def _reject_attention(config: dict, shape: dict):
    R = shape["heads"] // shape["groups"]
    if 64 % R:
        return f"{R} heads per group do not tile a consumer's 64 rows"
    if config["tma_stores"] and R < TMA_MIN_HEADS:
        return f"{R} heads per group: a TMA box a query is too small (TMA_MIN_HEADS)"
    if config.get("store_eviction") and not config["tma_stores"]:
        return "an L2 policy for the partial stores needs TMA stores"
    if config.get("tma_gathers") and R < TMA_MIN_HEADS:
        return f"TMA gathers need >= {TMA_MIN_HEADS} heads per group"
    if config.get("direct_stores") and (config["tma_stores"] or config.get("persistent", False)):
        return "direct stores replace the O tile: per-item CTAs with thread stores only"
    if config.get("store_warp") and not (config["tma_stores"] and config.get("tma_gathers")):
        return "a store warp issues TMA stores beside the TMA gathers' warp: TMA gathers and stores only"
    if config.get("direct_stores") and shape["head_dim"] % 32:
        return "direct stores need a head dim that is a multiple of 32"
    if config.get("consumers", 2) == 1 and not (config.get("tma_gathers") and config.get("direct_stores")
                                                and not config["pingpong"]):
        return "one consumer a CTA needs TMA gathers, direct stores and no ping-pong"
    if config.get("consumers", 2) == 3 and (config.get("persistent", False) or config.get("combine_warps")
                                            or config["pingpong"] or not config.get("store_warp")):
        return "three consumers: per-item CTAs with the store warp and no ping-pong"
    ring = config.get("combine_stages", ATTENTION_DEFAULTS["combine_stages"])
    if config.get("combine_warps"):
        if config.get("persistent", False) or not config.get("store_warp") or config.get("consumers", 2) != 2:
            return "combine warps: per-item CTAs with the store warp and two consumers only"
        unfit = combine_warps_limit(shape["heads"], shape["head_dim"], shape["topk"], shape["groups"], ring)
        if unfit:
            return unfit
    elif ring != ATTENTION_DEFAULTS["combine_stages"] or config.get("combine_prefetch", 0):
        return "the combine warps' ring and prefetch without the combine warps change nothing"
    D, Bk = shape["head_dim"], shape["block_size"]
    if config.get("combine_warps"):  # the kernel's own count, at the schedule's default item size
        smem = item_shared_bytes(D, Bk, SCHEDULE_TUNABLES["item_queries"], config["stages"], config["tma_stores"],
                                 config.get("o_buffers", 2), config.get("direct_stores", False)) + \
            combine_warps_shared_bytes(shape["heads"], D, shape["topk"], shape["groups"], ring)
    elif config.get("persistent", False):  # the kernel's own count, at the schedule's default item size
        smem = persistent_shared_bytes(R, D, Bk, SCHEDULE_TUNABLES["item_queries"], config["stages"],
                                       config["tma_stores"])
    else:  # at the largest item the schedule space allows
        consumers = config.get("consumers", 2)
        smem = item_shared_bytes(D, Bk, max(SCHEDULE_KNOBS["item_queries"]), config["stages"], config["tma_stores"],
                                 config.get("o_buffers", 2), config.get("direct_stores", False), consumers)
        if consumers == 1 and smem > TWO_CTA_SMEM:
            return f"shared memory {smem} B > {TWO_CTA_SMEM} B: two CTAs would not fit an SM"
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    return None


def _attention_units(shape: dict, config: dict) -> list:
    return [(kv_outer_program, dict(attention_program_args(shape), partial_dtype="bfloat16",
                                    item_queries=SCHEDULE_TUNABLES["item_queries"], **config))]


def forward_trial(shape: dict, check_seq: int, forward, launch=None) -> tuple:
    """(check, timed) of a forward program's GPU trial (:class:`~msa_tl.tunable.TunableProgram`), on random inputs.

    ``forward(config)`` -> ``f(q, k, v, indices, o, lse)``, the whole forward with ``config``: checked against the
    reference at ``check_seq``. Without ``launch`` it is also what is timed, at ``shape["seq"]``. With it,
    ``launch(config, chunk) -> call`` times one kernel on the last (heaviest) query chunk of at most 16K queries;
    ``chunk`` holds q, k, v [1, seq, *, D], its schedule (the default item size), random partials o_part
    [1, C*G, topk, R, D] and l_part [1, C*G, topk, R] (-inf), o, lse [1, seq, Hq] and t0.
    """
    from types import SimpleNamespace

    from msa_tl.checks import attention_inputs, check_attention

    N, Bk, topk, G, Hq, D = (shape[d] for d in ("seq", "block_size", "topk", "groups", "heads", "head_dim"))
    q, k, v, indices = attention_inputs(shape, N)
    o = torch.empty_like(q)

    def check(config):
        check_attention(shape, check_seq, forward(config))

    if launch is None:
        def timed(config):
            run = forward(config)
            lse = torch.empty(q.shape[:3], device="cuda")
            return lambda: run(q, k, v, indices, o, lse)

        return check, timed
    chunk = min(N, 16384)
    t0 = N - chunk
    schedule = Schedule(1, G, math.ceil(N / Bk), chunk, topk, SCHEDULE_TUNABLES["item_queries"], "cuda")
    schedule.build(indices, t0, chunk)
    buffers = SimpleNamespace(
        q=q, k=k, v=v, schedule=schedule, t0=t0, o=o,
        o_part=torch.randn(1, chunk * G, topk, Hq // G, D, device="cuda", dtype=torch.bfloat16),
        l_part=torch.full((1, chunk * G, topk, Hq // G), float("-inf"), device="cuda"),
        lse=torch.empty(1, N, Hq, device="cuda"))
    return check, lambda config: launch(config, buffers)


def driver_forward(shape: dict, key=None):
    """forward(config) for :func:`forward_trial`: :func:`sparse_attention_forward` with ``config`` as its keyword
    arguments, or as the one named ``key`` (``"attention_config"``, ``"combine_config"``)."""
    def forward(config):
        options = config if key is None else {key: config}
        return lambda q, k, v, indices, o, lse: sparse_attention_forward(q, k, v, indices, shape["block_size"], out=o,
                                                                         lse_out=lse, **options)

    return forward


def _attention_trial(shape: dict, check_seq: int) -> tuple:
    """Timed: the kernel alone on the last (heaviest) query chunk, launched as the driver launches it."""
    D = shape["head_dim"]

    def launch(config, c):
        unit = _attention_units(shape, config)[0][1]
        args = (c.q, c.k, c.v, c.schedule.items, c.schedule.item_count, c.schedule.entries, c.o_part.view(1, -1, D),
                c.l_part.view(1, -1))
        if unit.get("combine_warps"):  # timed with a chunk's merge, here of its own partials (results unread)
            kernel = compiled_kernel(kv_outer_program, **unit)
            merged = (c.o_part.view(1, -1, D), c.l_part.view(1, -1, shape["heads"] // shape["groups"]),
                      c.o.view(1, -1, D), c.lse.view(1, -1))
            return lambda: kernel(*args, *merged, c.t0, 0, c.o_part.shape[1] // shape["groups"])
        if not unit.get("persistent"):
            kernel = compiled_kernel(kv_outer_program, **unit)
            return lambda: kernel(*args, c.t0)
        unit = dict(unit, ctas=unit.get("ctas") or sm_count(c.q.device))
        kernel = compiled_kernel(kv_outer_program, **unit)
        work = persistent_work(unit["ctas"], 1, c.q.device)[0]
        return lambda: (work.zero_(), kernel(*args, work, c.t0))  # its item counter starts at zero

    return forward_trial(shape, check_seq, driver_forward(shape, "attention_config"), launch)


def _schedule_units(shape: dict, config: dict) -> list:
    units = [(plan_program, dict(item_queries=config["item_queries"]))]
    if config.get("accumulate"):  # the accumulating forward's three programs at its defaults
        args = dict(attention_program_args(shape), stages=ACCUMULATE_DEFAULTS["stages"])
        units += [(accumulate_program, dict(args, init=True)),
                  (accumulate_program, dict(args, item_queries=ACCUMULATE_DEFAULTS["item_queries"])),
                  (finalize_program, dict(heads=shape["heads"], head_dim=shape["head_dim"], groups=shape["groups"],
                                          dtype="bfloat16", scale=args["scale"]))]
        if ACCUMULATE_DEFAULTS["item_queries"] != config["item_queries"]:
            units.append((plan_program, dict(item_queries=ACCUMULATE_DEFAULTS["item_queries"])))
    elif config.get("combine_ctas"):  # the side stream's persistent combine at its CTA count
        units.append((persistent_combine_program, dict(heads=shape["heads"], head_dim=shape["head_dim"],
                                                       topk=shape["topk"], groups=shape["groups"], dtype="bfloat16",
                                                       partial_dtype="bfloat16", **dict(PERSISTENT_COMBINE_DEFAULTS,
                                                                                        ctas=config["combine_ctas"]))))
    if config.get("fused_prep") and (config["shared_tiles"] or config.get("local_combine")):
        units.append((row_prep_builder(config["fused_prep"]), dict(groups=shape["groups"], topk=shape["topk"],
                                                                   heads_per_group=shape["heads"] // shape["groups"],
                                                                   block_size=shape["block_size"],
                                                                   tiles=bool(config["shared_tiles"]),
                                                                   local=bool(config.get("local_combine")))))
    if config.get("local_combine"):  # the combine that attends the own blocks
        units.append((local_combine_program, dict(attention_program_args(shape), partial_dtype="bfloat16",
                                                   **LOCAL_COMBINE_DEFAULTS)))
    return units


def _reject_schedule(config: dict, shape: dict):
    partial_bytes = config["query_chunk"] * shape["heads"] * shape["topk"] * shape["head_dim"] * 2
    if partial_bytes > 8 * 2**30:
        return f"partials of one chunk take {partial_bytes / 2**30:.0f} GiB > 8 GiB"
    if config.get("combine_ctas") and (config.get("accumulate") or not config["persistent_combine"]):
        return "the combine on a side stream is the persistent combine of the partials path"
    if config.get("combine_ctas") and 2 * partial_bytes > 8 * 2**30:
        return f"double-buffered partials take {2 * partial_bytes / 2**30:.0f} GiB > 8 GiB"
    if config.get("local_combine") and (config.get("accumulate") or config.get("combine_ctas")):
        return "the local combine is the partials path's combine, on the caller's stream"
    if config.get("local_combine"):
        return local_combine_unsupported(shape["heads"] // shape["groups"], shape["head_dim"], shape["block_size"],
                                         shape["topk"], 2, LOCAL_COMBINE_DEFAULTS)
    return None


ATTENTION_TUNING = TunableProgram(
    name="kv_outer_attention", dims=ATTENTION_DIMS,
    defaults=lambda shape: attention_defaults(shape["heads"] // shape["groups"]), knobs=ATTENTION_KNOBS,
    reject=_reject_attention, compile_units=_attention_units, gpu_trial=_attention_trial)
SCHEDULE_TUNING = TunableProgram(  # timed: the whole main branch
    name="schedule", dims=ATTENTION_DIMS, defaults=SCHEDULE_TUNABLES, knobs=SCHEDULE_KNOBS, reject=_reject_schedule,
    compile_units=_schedule_units, gpu_trial=lambda shape, check_seq: forward_trial(shape, check_seq,
                                                                                    driver_forward(shape)))
