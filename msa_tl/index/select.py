"""Exp-free top-k block selection (TileLang), standalone over stored block scores and fused with scoring.

For each (b, t, g) the local block t // Bk takes slot 0; slots 1 .. k-1 take the
k-1 highest-scoring earlier blocks in descending score order, -1 where fewer
exist. Raw scores are ranked (softmax preserves order): no exp, max or sum.
With ``local_blocks`` = L the L newest visible blocks take slots 0 .. L-1 and
the list ranks the blocks before them; with ``varlen`` a query's candidates
start at its document's first block (``BlockStart``), so a packed batch of
documents (:mod:`msa_tl.ops.varlen`) reads only its own document's keys.

Both kernels give every row of a CTA's ``block_M`` rows (``block_M / G`` tokens
x G heads, all in one key block, so all with the same candidate set
``0 .. local-1``) to one thread, which keeps its k-1 best (score, block) pairs
sorted in registers. Inserting a value v into the sorted list a is branch-light
and in place when walked from the tail: ``a[j] <- v > a[j] ? (v <= a[j-1] ? v : a[j-1]) : a[j]``;
a value below the current k-1-th is rejected with one compare, which is the
common case once the list fills.

* ``topk_program`` reads S [B, C*G, nblk] (from :mod:`msa_tl.index.scores`)
  tile by tile through shared memory (rows padded by one word against bank
  conflicts).
* ``fused_select_program`` computes each block score with a tensor-core GEMM
  and feeds it to the list directly, so block scores never reach device memory
  and the local block's score (never needed: it is forced) is not computed.
* ``pipelined_select_program`` (the default where a key block holds >= 128
  rows) does the same with the roles written by hand: a producer warpgroup
  streams key blocks into a ring of cp.async stages on mbarriers, and two
  consumer warpgroups, each owning up to 128 rows, run GEMM, row max and
  inserts on every block, so one's row maxima and inserts run under the
  other's GEMM and each key block is read once for 256 rows. Each row's list
  is filled in block order, as in the fused kernel, so the two select
  identically.
"""


import math

import tilelang.language as T
import torch

from msa_tl.index.scores import block_scores, reject_row_tile, row_tile
from msa_tl.tl_compile import SMEM_LIMIT, compiled_kernel, tl_dtype
from msa_tl.tunable import TunableProgram, acc_regs
from msa_tl.tuning.cache import tuned_config

TOPK_DEFAULTS = dict(block_M=128, col_tile=32)
FUSED_DEFAULTS = dict(block_M=128, num_stages=2, threads=128, heavy_first=True)  # best of the H100 sweep (NOTES.md)
# stages 2-4 within 1% on the H200 (NOTES.md); consumers=4 / register_max: built for the FP8 select, not yet timed
PIPELINED_DEFAULTS = dict(stages=3, heavy_first=True, consumers=2, register_max=False)
# the tuner's choices of each knob (the *_TUNING descriptions at the end add the constraints)
TOPK_KNOBS = dict(block_M=(64, 128, 256), col_tile=(16, 32, 64))
FUSED_KNOBS = dict(block_M=(64, 128, 256), num_stages=(1, 2, 3, 4), threads=(128, 256), heavy_first=(False, True))
PIPELINED_KNOBS = dict(stages=(2, 3, 4), heavy_first=(False, True), consumers=(2, 4), register_max=(False, True))
SELECT_METHODS = ("pipelined", "fused", "two_pass")
_LOWEST = -3.0e38  # below every finite score; "no candidate yet"


def _list_insert(top_val, top_blk, slots: int):
    @T.macro
    def insert(value, blk):
        if value > top_val[slots - 1]:
            for step in T.unroll(slots):
                j = slots - 1 - step
                if value > top_val[j]:
                    if j == 0:
                        top_val[j] = value
                        top_blk[j] = blk
                    elif value <= top_val[j - 1]:
                        top_val[j] = value
                        top_blk[j] = blk
                    else:
                        top_val[j] = top_val[j - 1]
                        top_blk[j] = top_blk[j - 1]

    return insert


def _selection_writer(topk: int, local_blocks: int):
    """A row's output for ``local_blocks`` > 1: its newest visible blocks (forced; -1 for any before the row's first
    visible block ``start``), then the list's ``topk - local_blocks`` best earlier blocks. (With one local block the
    kernels write the row inline, as their builds tuned and precompiled for it do.)"""

    @T.macro
    def write(Idx, bz, row, local, start, top_blk):
        for j in T.serial(local_blocks):
            Idx[bz, row, j] = T.if_then_else(local - j >= start, local - j, -1)
        for j in T.serial(topk - local_blocks):
            Idx[bz, row, local_blocks + j] = top_blk[j]

    return write


def _candidate_count(local, start, topk: int, local_blocks: int):
    """How many blocks a row ranks: ``start .. local - local_blocks``, none when every slot is forced."""
    if topk == local_blocks:
        return 0
    return local - start if local_blocks == 1 else T.max(local - local_blocks + 1 - start, 0)


def _check_local_blocks(topk: int, local_blocks: int) -> int:
    """The list's length (at least one slot, so its arrays exist) after checking 1 <= local_blocks <= topk."""
    if not 1 <= local_blocks <= topk:
        raise ValueError(f"local_blocks must be in [1, topk = {topk}], got {local_blocks}")
    return max(topk - local_blocks, 1)


def topk_program(groups: int, block_size: int, topk: int, block_M: int = 128, col_tile: int = 32,
                 local_blocks: int = 1, varlen: bool = False):
    """S [batch, chunk_rows, nblk] fp32 + t0 -> Idx [batch, seq*G, topk] int32 rows of the chunk.

    ``local_blocks`` and ``varlen`` (BlockStart [batch, nblk] int32 after S) as in :func:`fused_select_program`.
    """
    batch, seq, chunk_rows, nblk = T.dynamic("batch"), T.dynamic("seq"), T.dynamic("chunk_rows"), T.dynamic("nblk")
    block_M = row_tile(groups, block_size, block_M)
    slots = _check_local_blocks(topk, local_blocks)
    write = _selection_writer(topk, local_blocks)

    def candidates_end(local, start):  # a row ranks blocks start .. candidates_end - 1
        return start + _candidate_count(local, start, topk, local_blocks)

    @T.macro
    def select(S, BlockStart, Idx, t0):
        with T.Kernel(T.ceildiv(chunk_rows, block_M), batch, threads=block_M) as (bx, bz):
            S_s = T.alloc_shared((block_M, col_tile + 1), "float32")
            top_val = T.alloc_local((slots,), "float32")
            top_blk = T.alloc_local((slots,), "int32")
            insert = _list_insert(top_val, top_blk, slots)
            tx = T.get_thread_binding()
            r0 = bx * block_M
            local = (t0 * groups + r0) // groups // block_size
            start = BlockStart[bz, local] if varlen else 0
            for j in T.serial(slots):
                top_val[j] = _LOWEST
                top_blk[j] = -1
            for c in T.serial(T.ceildiv(candidates_end(local, start), col_tile)):
                for i, j in T.Parallel(block_M, col_tile):
                    S_s[i, j] = T.if_then_else(
                        (r0 + i < chunk_rows) & (c * col_tile + j < candidates_end(local, start)),
                        S[bz, r0 + i, c * col_tile + j], _LOWEST
                    )
                for j in T.serial(col_tile):
                    if varlen:
                        if (c * col_tile + j < candidates_end(local, start)) & (c * col_tile + j >= start):
                            insert(S_s[tx, j], c * col_tile + j)
                    elif c * col_tile + j < candidates_end(local, start):
                        insert(S_s[tx, j], c * col_tile + j)
            if r0 + tx < chunk_rows:
                if local_blocks == 1:
                    Idx[bz, t0 * groups + r0 + tx, 0] = local
                    for j in T.serial(topk - 1):
                        Idx[bz, t0 * groups + r0 + tx, j + 1] = top_blk[j]
                else:
                    write(Idx, bz, t0 * groups + r0 + tx, local, start, top_blk)

    if varlen:
        @T.prim_func
        def index_topk_varlen(
            S: T.Tensor((batch, chunk_rows, nblk), "float32"),
            BlockStart: T.Tensor((batch, nblk), "int32"),
            Idx: T.Tensor((batch, seq * groups, topk), "int32"),
            t0: T.int32,
        ):
            select(S, BlockStart, Idx, t0)

        return index_topk_varlen

    @T.prim_func
    def index_topk(
        S: T.Tensor((batch, chunk_rows, nblk), "float32"),
        Idx: T.Tensor((batch, seq * groups, topk), "int32"),
        t0: T.int32,
    ):
        select(S, None, Idx, t0)

    return index_topk


def fused_select_program(groups: int, index_dim: int, block_size: int, topk: int, block_M: int = 128,
                         num_stages: int = 2, threads: int = 128, heavy_first: bool = True, dtype: str = "bfloat16",
                         local_blocks: int = 1, varlen: bool = False):
    """Q [batch, seq*G, Di], K [batch, seq, Di] -> Idx [batch, seq*G, topk] int32, scores kept on chip.

    ``varlen``: also BlockStart [batch, ceil(seq / Bk)] int32, the first visible block of each query block's
    document (documents packed block-aligned); ``local_blocks`` newest visible blocks are forced."""
    batch, seq = T.dynamic("batch"), T.dynamic("seq")
    block_M = row_tile(groups, block_size, block_M)
    slots = _check_local_blocks(topk, local_blocks)
    write = _selection_writer(topk, local_blocks)

    @T.macro
    def select(Q, K, BlockStart, Idx):
        with T.Kernel(T.ceildiv(seq * groups, block_M), batch, threads=threads) as (tile, bz):
            bx = T.ceildiv(seq * groups, block_M) - 1 - tile if heavy_first else tile
            Q_s = T.alloc_shared((block_M, index_dim), dtype)
            K_s = T.alloc_shared((block_size, index_dim), dtype)
            acc = T.alloc_fragment((block_M, block_size), "float32")
            row_max = T.alloc_fragment((block_M,), "float32")
            row_max_s = T.alloc_shared((block_M,), "float32")
            top_val = T.alloc_local((slots,), "float32")
            top_blk = T.alloc_local((slots,), "int32")
            insert = _list_insert(top_val, top_blk, slots)
            tx = T.get_thread_binding()
            r0 = bx * block_M
            local = r0 // groups // block_size
            start = BlockStart[bz, local] if varlen else 0
            for j in T.serial(slots):
                top_val[j] = _LOWEST
                top_blk[j] = -1
            T.copy(Q[bz, r0:r0 + block_M, :], Q_s)
            # candidates: start .. local - local_blocks (the newer ones are forced)
            for i in T.Pipelined(_candidate_count(local, start, topk, local_blocks), num_stages=num_stages):
                T.copy(K[bz, (start + i) * block_size:(start + i + 1) * block_size, :], K_s)
                T.clear(acc)
                T.gemm(Q_s, K_s, acc, transpose_B=True)
                T.reduce_max(acc, row_max, dim=1)
                T.copy(row_max, row_max_s)
                if tx < block_M:
                    insert(row_max_s[tx], start + i)
            if tx < block_M and r0 + tx < seq * groups:
                if local_blocks == 1:
                    Idx[bz, r0 + tx, 0] = local
                    for j in T.serial(topk - 1):
                        Idx[bz, r0 + tx, j + 1] = top_blk[j]
                else:
                    write(Idx, bz, r0 + tx, local, start, top_blk)

    if varlen:
        @T.prim_func
        def index_select_fused_varlen(
            Q: T.Tensor((batch, seq * groups, index_dim), dtype),
            K: T.Tensor((batch, seq, index_dim), dtype),
            BlockStart: T.Tensor((batch, T.ceildiv(seq, block_size)), "int32"),
            Idx: T.Tensor((batch, seq * groups, topk), "int32"),
        ):
            select(Q, K, BlockStart, Idx)

        return index_select_fused_varlen

    @T.prim_func
    def index_select_fused(
        Q: T.Tensor((batch, seq * groups, index_dim), dtype),
        K: T.Tensor((batch, seq, index_dim), dtype),
        Idx: T.Tensor((batch, seq * groups, topk), "int32"),
    ):
        select(Q, K, None, Idx)

    return index_select_fused


def pipelined_rows(groups: int, block_size: int) -> int:
    """Rows per consumer of :func:`pipelined_select_program` (two consumers' rows lie in one key block), 0 if
    fewer than one wgmma M tile (64) would fit."""
    rows = min(128, groups * block_size // 2)
    return rows if rows >= 64 else 0


def pipelined_select_program(groups: int, index_dim: int, block_size: int, topk: int, stages: int = 3,
                             heavy_first: bool = True, dtype: str = "bfloat16", local_blocks: int = 1,
                             varlen: bool = False, offset: bool = False, consumers: int = 2,
                             register_max: bool = False):
    """Q [batch, seq*G, Di], K [batch, seq, Di] -> Idx [batch, seq*G, topk] int32; a producer and two consumers.

    A CTA's 2 x :func:`pipelined_rows` rows are split over ``consumers`` warpgroups (2, or 4 of 64 rows where a
    key block holds 256 rows), all reading every key block of a ``stages``-deep ring. ``local_blocks`` and
    ``varlen`` (BlockStart [batch, ceil(seq / Bk)] int32 after K) as in :func:`fused_select_program`. ``offset``:
    the queries are ``t0 ..`` of the keys' sequence (a runtime scalar after Idx, a multiple of Bk): Q [batch,
    queries*G, Di] and Idx [batch, queries*G, topk] hold their rows alone.
    """
    return _pipelined_select(groups, index_dim, block_size, topk, stages, heavy_first, dtype, False, local_blocks,
                             varlen, offset, consumers, register_max)


def pipelined_select_fp8_program(groups: int, index_dim: int, block_size: int, topk: int, stages: int = 3,
                                 heavy_first: bool = True, dtype: str = "bfloat16", local_blocks: int = 1,
                                 varlen: bool = False, offset: bool = False, consumers: int = 2,
                             register_max: bool = False):
    """The pipelined select over FP8 operands: Q [batch, seq*G, Di] and K [batch, seq, Di] float8_e4m3 codes, KScale
    [batch, seq] fp32 (a key is K * KScale; a query row's own scale leaves its ranking as it is, so it is not read)
    -> Idx [batch, seq*G, topk] int32. Each block is one e4m3 wgmma (twice bf16's rate) whose columns are scaled by
    their keys' scales before the row max. ``offset`` and ``consumers`` as in :func:`pipelined_select_program`
    (t0 after Idx).

    Why ``consumers=4``: a consumer's GEMM, wait, column scaling, row max and inserts run in sequence, and two
    consumers overlap only each other's; at twice bf16's MMA rate the epilogue is what sets the pace (the H200
    measured 1.13x bf16 at 128K, NOTES.md). Four warpgroups of 64 rows halve each one's epilogue and put four
    on the tensor pipe in turn, over the same ring (each key block still read once for 256 rows)."""
    return _pipelined_select(groups, index_dim, block_size, topk, stages, heavy_first, dtype, True, local_blocks,
                             varlen, offset, consumers, register_max)


SELECT_CONSUMER_REGS = {2: (40, 232), 4: (32, 112)}  # consumers -> setmaxnreg of the producer, of each consumer


# register_max: a consumer's row maxima straight from its wgmma accumulator's registers. A thread's values of
# [64 kTiles, kN] are kN / 2 t + 4 j + 2 h + e: row 64 t + 16 warp + 8 h + lane / 4, column 8 j + 2 (lane % 4) + e
# (the layout TileLang's fragment keeps). Each row's values, times their keys' scales with FP8, reduce as a tree (depth 5
# where TileLang's reduce_max is a chain of 32), then over the quad's lanes (xor 1, 2); lane q of a quad returns its
# row slot q = 2 t + h, so the row's list is kept by that lane and no row max goes through shared memory.
SELECT_ROW_MAX_CUDA = r"""
template <int kTiles, int kN, int kScaled>
__device__ __forceinline__ float msa_select_row_max(const float *acc, const float *scale) {
  const int q = threadIdx.x & 3;
  float slot[2 * kTiles];
  #pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v[kN / 4];
      #pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
        v[2 * j] = acc[kN / 2 * t + 4 * j + 2 * h];
        v[2 * j + 1] = acc[kN / 2 * t + 4 * j + 2 * h + 1];
        if (kScaled) {
          const float2 s = *reinterpret_cast<const float2 *>(scale + 8 * j + 2 * q);
          v[2 * j] *= s.x;
          v[2 * j + 1] *= s.y;
        }
      }
      #pragma unroll
      for (int i = 0; i < kN / 8; ++i) v[i] = fmaxf(v[i], v[i + kN / 8]);
      #pragma unroll
      for (int i = 0; i < kN / 16; ++i) v[i] = fmaxf(v[i], v[i + kN / 16]);
      #pragma unroll
      for (int i = 0; i < kN / 32; ++i) v[i] = fmaxf(v[i], v[i + kN / 32]);
      #pragma unroll
      for (int i = 0; i < kN / 64; ++i) v[i] = fmaxf(v[i], v[i + kN / 64]);
      #pragma unroll
      for (int i = 0; i < kN / 128; ++i) v[i] = fmaxf(v[i], v[i + kN / 128]);
      float m = fmaxf(v[0], __shfl_xor_sync(0xffffffffu, v[0], 1));
      slot[2 * t + h] = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    }
  }
  float out = slot[0];
  #pragma unroll
  for (int i = 1; i < 2 * kTiles; ++i) out = q == i ? slot[i] : out;
  return out;
}
"""


def _pipelined_select(groups: int, index_dim: int, block_size: int, topk: int, stages: int, heavy_first: bool,
                      dtype: str, fp8: bool, local_blocks: int, varlen: bool, offset: bool = False,
                      consumers: int = 2, register_max: bool = False):
    batch, seq = T.dynamic("batch"), T.dynamic("seq")
    Bk, Di, M = block_size, index_dim, pipelined_rows(groups, block_size)
    if not M:
        raise ValueError(f"the pipelined select needs >= 128 rows in a key block (G * Bk = {groups * block_size})")
    if consumers not in SELECT_CONSUMER_REGS:
        raise ValueError(f"the pipelined select runs 2 or 4 consumers, got {consumers}")
    NC, M = consumers, 2 * M // consumers  # a CTA's 2 x pipelined_rows rows, M a consumer
    if M < 64:
        raise ValueError(f"{NC} consumers of {M} rows: a consumer needs one wgmma M tile (64 rows)")
    producer_regs, consumer_regs = SELECT_CONSUMER_REGS[NC]
    if offset and varlen:
        raise ValueError("the pipelined select takes queries at an offset without documents only")
    queries = T.dynamic("queries") if offset else seq  # the query rows Q and Idx hold
    rows = queries * groups
    slots = _check_local_blocks(topk, local_blocks)
    write = _selection_writer(topk, local_blocks)
    op_dtype = "float8_e4m3" if fp8 else dtype

    def row_maxima():  # a consumer's [M] row maxima (to the rows' threads through shared memory), or with
        return T.alloc_fragment((M,), "float32") if not register_max else T.alloc_local((1,), "float32")  # [1]

    def row(ctx):  # the consumer's row thread ctx ranks: its own, or with register_max row slot ctx % 4 of its quad's
        return ctx if not register_max else ctx % 4 // 2 * 64 + ctx // 32 * 16 + ctx % 32 // 4 + ctx % 2 * 8

    def ranks(ctx):  # thread ctx keeps a row's list
        return ctx < M if not register_max else ctx % 4 < M // 32

    @T.macro
    def consume(c, ctx, r0, local, start, Q_s, ring, scale_ring, full, empty, acc, rmax, rmax_s, top_val, top_blk,
                Idx, bz):  # r0: the tile's first row of Q / Idx
        insert = _list_insert(top_val, top_blk, slots)
        for j in T.serial(slots):
            top_val[j] = _LOWEST
            top_blk[j] = -1
        for blk in T.serial(_candidate_count(local, start, topk, local_blocks)):  # ring slot blk, key block start + blk
            T.barrier_wait(full[blk % stages], (blk // stages) & 1)
            T.wgmma_gemm(Q_s, ring[blk % stages, :, :], acc, transpose_B=True, clear_accum=True)
            T.wait_wgmma(0)
            if register_max:
                rmax[0] = T.call_extern("float32", f"msa_select_row_max<{M // 64}, {Bk}, {int(fp8)}>", acc.data,
                                        T.address_of(scale_ring[blk % stages, 0]) if fp8 else acc.data)
                T.barrier_arrive(empty[blk % stages])
                if ranks(ctx):
                    insert(rmax[0], start + blk)
            else:
                if fp8:
                    for r, k in T.Parallel(M, Bk):
                        acc[r, k] = acc[r, k] * scale_ring[blk % stages, k]
                T.barrier_arrive(empty[blk % stages])
                T.reduce_max(acc, rmax, dim=1)
                T.sync_threads(1 + c, 128)  # every thread has read the previous block's row maxima
                T.copy(rmax, rmax_s)
                T.sync_threads(1 + c, 128)
                if ctx < M:
                    insert(rmax_s[ctx], start + blk)
        if ranks(ctx) and r0 + c * M + row(ctx) < rows:
            if local_blocks == 1:
                Idx[bz, r0 + c * M + row(ctx), 0] = local
                for j in T.serial(topk - 1):
                    Idx[bz, r0 + c * M + row(ctx), j + 1] = top_blk[j]
            else:
                write(Idx, bz, r0 + c * M + row(ctx), local, start, top_blk)

    @T.macro
    def select(Q, K, KScale, BlockStart, Idx, t0):
        with T.Kernel(T.ceildiv(rows, NC * M), batch, threads=128 * (NC + 1),
                      **(dict(prelude=SELECT_ROW_MAX_CUDA) if register_max else {})) as (tile, bz):
            bx = T.ceildiv(rows, NC * M) - 1 - tile if heavy_first else tile
            Q_s0 = T.alloc_shared((M, Di), op_dtype)  # [M, Di] consumer 0's rows
            Q_s1 = T.alloc_shared((M, Di), op_dtype)  # [M, Di] consumer 1's rows
            Q_s2 = T.alloc_shared((M, Di), op_dtype) if NC == 4 else None  # [M, Di] consumers 2 and 3's
            Q_s3 = T.alloc_shared((M, Di), op_dtype) if NC == 4 else None
            ring = T.alloc_shared((stages, Bk, Di), op_dtype)  # [stages, Bk, Di]
            scale_ring = T.alloc_shared((stages, Bk), "float32") if fp8 else None  # [stages, Bk] the keys' scales
            acc0 = T.alloc_fragment((M, Bk), "float32")  # [M, Bk]
            acc1 = T.alloc_fragment((M, Bk), "float32")
            acc2 = T.alloc_fragment((M, Bk), "float32") if NC == 4 else None
            acc3 = T.alloc_fragment((M, Bk), "float32") if NC == 4 else None
            rmax0, rmax1 = row_maxima(), row_maxima()
            rmax2, rmax3 = (row_maxima(), row_maxima()) if NC == 4 else (None, None)
            rmax_s0 = T.alloc_shared((M,), "float32") if not register_max else None
            rmax_s1 = T.alloc_shared((M,), "float32") if not register_max else None
            rmax_s2 = T.alloc_shared((M,), "float32") if NC == 4 and not register_max else None
            rmax_s3 = T.alloc_shared((M,), "float32") if NC == 4 and not register_max else None
            top_val = T.alloc_local((slots,), "float32")
            top_blk = T.alloc_local((slots,), "int32")
            q_ready = T.alloc_barrier(128)
            full = T.alloc_barrier([128] * stages)
            empty = T.alloc_barrier([128 * NC] * stages)  # every consumer releases a slot
            tx = T.get_thread_binding()
            r0 = bx * NC * M
            local = (r0 if t0 is None else t0 * groups + r0) // groups // Bk  # the tile's key block
            start = BlockStart[bz, local] if varlen else 0
            if tx >= 128 * NC:  # producer: the consumers' Q rows once, then the candidate key blocks from start on
                T.set_max_nreg(producer_regs, 0)
                T.async_copy(Q[bz, r0:r0 + M, :], Q_s0)
                T.async_copy(Q[bz, r0 + M:r0 + 2 * M, :], Q_s1)
                if NC == 4:
                    T.async_copy(Q[bz, r0 + 2 * M:r0 + 3 * M, :], Q_s2)
                    T.async_copy(Q[bz, r0 + 3 * M:r0 + 4 * M, :], Q_s3)
                T.cp_async_barrier_noinc(q_ready[0])
                for blk in T.serial(_candidate_count(local, start, topk, local_blocks)):
                    T.barrier_wait(empty[blk % stages], ((blk // stages) & 1) ^ 1)
                    T.async_copy(K[bz, (start + blk) * Bk:(start + blk + 1) * Bk, :], ring[blk % stages, :, :])
                    if fp8:
                        T.async_copy(KScale[bz, (start + blk) * Bk:(start + blk + 1) * Bk], scale_ring[blk % stages, :])
                    T.cp_async_barrier_noinc(full[blk % stages])
            elif tx < 128:
                T.set_max_nreg(consumer_regs, 1)
                T.barrier_wait(q_ready[0], 0)
                consume(0, tx, r0, local, start, Q_s0, ring, scale_ring, full, empty, acc0, rmax0, rmax_s0, top_val,
                        top_blk, Idx, bz)
            elif NC == 2 or tx < 256:  # with two consumers a static branch: every thread left
                T.set_max_nreg(consumer_regs, 1)
                T.barrier_wait(q_ready[0], 0)
                consume(1, tx - 128, r0, local, start, Q_s1, ring, scale_ring, full, empty, acc1, rmax1, rmax_s1,
                        top_val, top_blk, Idx, bz)
            elif tx < 384:
                T.set_max_nreg(consumer_regs, 1)
                T.barrier_wait(q_ready[0], 0)
                consume(2, tx - 256, r0, local, start, Q_s2, ring, scale_ring, full, empty, acc2, rmax2, rmax_s2,
                        top_val, top_blk, Idx, bz)
            else:
                T.set_max_nreg(consumer_regs, 1)
                T.barrier_wait(q_ready[0], 0)
                consume(3, tx - 384, r0, local, start, Q_s3, ring, scale_ring, full, empty, acc3, rmax3, rmax_s3,
                        top_val, top_blk, Idx, bz)

    nblk = T.ceildiv(seq, Bk)
    if fp8 and varlen:
        @T.prim_func
        def index_select_pipelined_fp8_varlen(
            Q: T.Tensor((batch, seq * groups, index_dim), op_dtype),
            K: T.Tensor((batch, seq, index_dim), op_dtype),
            KScale: T.Tensor((batch, seq), "float32"),
            BlockStart: T.Tensor((batch, nblk), "int32"),
            Idx: T.Tensor((batch, seq * groups, topk), "int32"),
        ):
            select(Q, K, KScale, BlockStart, Idx, None)

        return index_select_pipelined_fp8_varlen

    if fp8 and offset:
        @T.prim_func
        def index_select_pipelined_fp8_offset(
            Q: T.Tensor((batch, queries * groups, index_dim), op_dtype),
            K: T.Tensor((batch, seq, index_dim), op_dtype),
            KScale: T.Tensor((batch, seq), "float32"),
            Idx: T.Tensor((batch, queries * groups, topk), "int32"),
            t0: T.int32,
        ):
            select(Q, K, KScale, None, Idx, t0)

        return index_select_pipelined_fp8_offset

    if fp8:
        @T.prim_func
        def index_select_pipelined_fp8(
            Q: T.Tensor((batch, seq * groups, index_dim), op_dtype),
            K: T.Tensor((batch, seq, index_dim), op_dtype),
            KScale: T.Tensor((batch, seq), "float32"),
            Idx: T.Tensor((batch, seq * groups, topk), "int32"),
        ):
            select(Q, K, KScale, None, Idx, None)

        return index_select_pipelined_fp8

    if varlen:
        @T.prim_func
        def index_select_pipelined_varlen(
            Q: T.Tensor((batch, seq * groups, index_dim), dtype),
            K: T.Tensor((batch, seq, index_dim), dtype),
            BlockStart: T.Tensor((batch, nblk), "int32"),
            Idx: T.Tensor((batch, seq * groups, topk), "int32"),
        ):
            select(Q, K, None, BlockStart, Idx, None)

        return index_select_pipelined_varlen

    if offset:
        @T.prim_func
        def index_select_pipelined_offset(
            Q: T.Tensor((batch, queries * groups, index_dim), dtype),
            K: T.Tensor((batch, seq, index_dim), dtype),
            Idx: T.Tensor((batch, queries * groups, topk), "int32"),
            t0: T.int32,
        ):
            select(Q, K, None, None, Idx, t0)

        return index_select_pipelined_offset

    @T.prim_func
    def index_select_pipelined(
        Q: T.Tensor((batch, seq * groups, index_dim), dtype),
        K: T.Tensor((batch, seq, index_dim), dtype),
        Idx: T.Tensor((batch, seq * groups, topk), "int32"),
    ):
        select(Q, K, None, None, Idx, None)

    return index_select_pipelined


# The roles are written by hand: TileLang's own warp specialisation and its inserted syncs would fight them.
pipelined_select_program.pass_configs = {"tl.disable_warp_specialized": True, "tl.disable_thread_storage_sync": True}
pipelined_select_fp8_program.pass_configs = pipelined_select_program.pass_configs


def select_blocks(q_idx, k_idx, block_size: int, topk: int, index_scale=None, *, local_blocks: int = 1,
                  block_start=None, method: str | None = None, query_chunk: int = 16384, config=None, out=None,
                  query_start: int = 0, first_query: int = 0):
    """Index branch on the GPU. q_idx [B, N, G, Di], k_idx [B, N, Di] -> indices [B, N, G, topk] int32.

    ``local_blocks``: the newest visible blocks each query is given (its own block and the ones before it).
    ``block_start`` [B, ceil(N / Bk)] int32, if given: the first visible block for the queries of each block
    (documents packed block-aligned, :mod:`msa_tl.ops.varlen`); blocks before it are never chosen or read.

    ``method``: ``"pipelined"`` (default where G * Bk >= 128, else ``"fused"``) or ``"fused"`` score and
    select in one kernel with no score buffer (the two select identically); ``"two_pass"`` writes block
    scores to a buffer of B * query_chunk * G * ceil(N / Bk) float32 for the standalone top-k kernel.
    ``index_scale`` only matters to the two-pass scores: a positive scale does not change ranks. ``out`` may supply the contiguous int32
    [B, N, G, topk] result tensor. ``config`` overrides the tuned config
    (:func:`msa_tl.tuning.cache.tuned_config`) of the select kernel that runs.

    ``query_start``: q_idx [B, C, G, Di] holds the queries ``query_start ..`` of the keys' sequence, k_idx
    [B, query_start + C, Di] -> indices [B, C, G, topk]. The pipelined select reads them where they are if
    ``query_start`` is a multiple of Bk (its tiles never span two key blocks); the two-pass select runs them as the
    tail of a zero-padded row (scoring from the offset's block on); the fused select does not take them.
    ``first_query`` (two-pass): rows before its block are neither scored nor written.
    """
    if query_start:
        return _select_at_offset(q_idx, k_idx, block_size, topk, index_scale, local_blocks, block_start, method,
                                 query_chunk, config, out, query_start)
    B, N, G, Di = q_idx.shape
    if method is None:
        method = "pipelined" if pipelined_rows(G, block_size) else "fused"
    if method not in SELECT_METHODS:
        raise ValueError(f"method must be one of {SELECT_METHODS}, got {method!r}")
    if out is None:
        out = torch.empty((B, N, G, topk), device=q_idx.device, dtype=torch.int32)
    indices = out.view(B, N * G, topk)
    shape = dict(groups=G, index_dim=Di, block_size=block_size, topk=topk, seq=N)
    if method != "two_pass":
        program, builder, defaults = {
            "pipelined": ("index_select_pipelined", pipelined_select_program, PIPELINED_DEFAULTS),
            "fused": ("index_select_fused", fused_select_program, FUSED_DEFAULTS)}[method]
        config = {**tuned_config(program, shape, defaults, q_idx.device), **(config or {})}
        kernel = compiled_kernel(builder, groups=G, index_dim=Di, block_size=block_size, topk=topk,
                                 dtype=tl_dtype(q_idx.dtype), **_selection_options(local_blocks, block_start), **config)
        kernel(q_idx.view(B, N * G, Di), k_idx, *_block_start(block_start), indices)
        return indices.view(B, N, G, topk)
    chunk = min(N, max(block_size, query_chunk // block_size * block_size))
    buffer = torch.empty(B * chunk * G * math.ceil(N / block_size), device=q_idx.device, dtype=torch.float32)
    config = {**tuned_config("index_topk", shape, TOPK_DEFAULTS, q_idx.device), **(config or {})}
    kernel = compiled_kernel(topk_program, groups=G, block_size=block_size, topk=topk,
                             **_selection_options(local_blocks, block_start), **config)
    # a chunk starts on a block boundary: a score tile's rows then share their key block's causal limit
    for t0 in range(first_query // block_size * block_size, N, chunk):
        count = min(chunk, N - t0)
        S = block_scores(q_idx, k_idx, block_size, index_scale, t0, count, out=buffer)
        kernel(S.view(B, count * G, -1), *_block_start(block_start), indices, t0)
    return indices.view(B, N, G, topk)


def _select_at_offset(q_idx, k_idx, block_size, topk, index_scale, local_blocks, block_start, method, query_chunk,
                      config, out, query_start):
    """:func:`select_blocks` of queries ``query_start ..`` (q_idx [B, C, G, Di]) -> [B, C, G, topk]."""
    B, C, G, Di = q_idx.shape
    aligned = query_start % block_size == 0
    if method is None:
        method = "pipelined" if aligned and pipelined_rows(G, block_size) else "two_pass"
    if block_start is not None or out is not None:
        raise ValueError("queries at an offset take no block_start and no out")
    if method == "pipelined":
        if not aligned:
            raise ValueError(f"the pipelined select takes queries from a block boundary: query_start {query_start} "
                             f"is no multiple of {block_size} (method='two_pass' takes any)")
        shape = dict(groups=G, index_dim=Di, block_size=block_size, topk=topk, seq=k_idx.shape[1])
        config = {**tuned_config("index_select_pipelined", shape, PIPELINED_DEFAULTS, q_idx.device), **(config or {})}
        kernel = compiled_kernel(pipelined_select_program, groups=G, index_dim=Di, block_size=block_size, topk=topk,
                                 dtype=tl_dtype(q_idx.dtype), offset=True, **_selection_options(local_blocks, None),
                                 **config)
        indices = torch.empty((B, C, G, topk), device=q_idx.device, dtype=torch.int32)
        kernel(q_idx.view(B, C * G, Di), k_idx, indices.view(B, C * G, topk), query_start)
        return indices
    if method != "two_pass":
        raise ValueError(f"queries at an offset run the pipelined or the two-pass select, not {method!r}")
    padded = q_idx.new_zeros((B, query_start + C, G, Di))  # rows before the offset are never scored
    padded[:, query_start:] = q_idx
    indices = select_blocks(padded, k_idx, block_size, topk, index_scale, local_blocks=local_blocks,
                            method="two_pass", query_chunk=query_chunk, config=config, first_query=query_start)
    return indices[:, query_start:].contiguous()


def _selection_options(local_blocks: int, block_start) -> dict:
    """The select programs' compile options for a call (none at the defaults, so their builds stay as tuned)."""
    options = {} if local_blocks == 1 else dict(local_blocks=local_blocks)
    return options if block_start is None else dict(options, varlen=True)


def _block_start(block_start) -> tuple:
    return () if block_start is None else (block_start.to(torch.int32).contiguous(),)


def select_blocks_fp8(q_idx, k_idx, block_size: int, topk: int, *, local_blocks: int = 1, block_start=None,
                      config=None, out=None, query_start: int = 0):
    """The index branch with FP8 operands: q_idx [B, N, G, Di] and k_idx [B, N, Di] (bf16 / fp16) are quantised
    to e4m3 with a scale per row (:func:`msa_tl.reference.quantize_fp8`; a query row's scale does not change its
    ranking, so only the keys' scales reach the kernel) and scored by :func:`pipelined_select_fp8_program` ->
    indices [B, N, G, topk] int32, as :func:`select_blocks` over the quantised values (``local_blocks``,
    ``block_start`` as there). Needs G * Bk >= 128 (the pipelined select's rows). ``query_start`` (a multiple of
    Bk): q_idx holds the queries from there, k_idx the keys up to the last of them, as in :func:`select_blocks`.
    Not yet run on a GPU."""
    from msa_tl.reference import quantize_fp8

    B, N, G, Di = q_idx.shape
    if not pipelined_rows(G, block_size):
        raise ValueError(f"the FP8 select runs the pipelined select, which needs G * Bk >= 128 (got {G * block_size})")
    if query_start % block_size or (query_start and block_start is not None):
        raise ValueError(f"the FP8 select takes queries from a block boundary (query_start {query_start}, "
                         f"Bk {block_size}), without documents")
    q_codes, _ = quantize_fp8(q_idx)
    k_codes, k_scale = quantize_fp8(k_idx)
    if out is None:
        out = torch.empty((B, N, G, topk), device=q_idx.device, dtype=torch.int32)
    config = {**PIPELINED_DEFAULTS, **(config or {})}
    offset = dict(offset=True) if query_start else {}  # the default build stays the one compiled before
    kernel = compiled_kernel(pipelined_select_fp8_program, groups=G, index_dim=Di, block_size=block_size, topk=topk,
                             dtype=tl_dtype(q_idx.dtype), **_selection_options(local_blocks, block_start), **offset,
                             **config)
    kernel(q_codes.view(B, N * G, Di), k_codes, k_scale, *_block_start(block_start), out.view(B, N * G, topk),
           *((query_start,) if query_start else ()))
    return out


SELECT_DIMS = ("groups", "index_dim", "block_size", "topk")


def _reject_pipelined(config: dict, shape: dict):
    rows = pipelined_rows(shape["groups"], shape["block_size"])
    Bk, Di = shape["block_size"], shape["index_dim"]
    if not rows:
        return "fewer than 2 x 64 rows per key block: a consumer needs one wgmma M tile"
    smem = 2 * (2 * rows * Di + config["stages"] * Bk * Di) + 8 * rows
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    consumers = config.get("consumers", 2)
    if 2 * rows // consumers < 64:
        return f"{consumers} consumers of {2 * rows // consumers} rows: a consumer needs one wgmma M tile (64 rows)"
    budget = SELECT_CONSUMER_REGS[consumers][1]
    if acc_regs(2 * rows // consumers, Bk, 128) > budget - 40:
        return f"a consumer's accumulator leaves too few of its {budget} registers for the rest"
    return None


def _reject_topk(config: dict, shape: dict):
    smem = 4 * config["block_M"] * (config["col_tile"] + 1)
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    if config["block_M"] > shape["groups"] * shape["block_size"]:
        return "block_M spans more tokens than one key block"
    return None


def _select_units(builder):
    def compile_units(shape: dict, config: dict) -> list:
        return [(builder, dict(groups=shape["groups"], index_dim=shape["index_dim"], block_size=shape["block_size"],
                               topk=shape["topk"], dtype="bfloat16", **config))]

    return compile_units


def _select_trial(method: str):
    def gpu_trial(shape: dict, check_seq: int) -> tuple:
        """Timed: the whole index branch (:func:`select_blocks` with ``method``)."""
        from msa_tl.checks import check_selection, index_inputs

        Bk, topk = shape["block_size"], shape["topk"]
        q_idx, k_idx = index_inputs(shape, shape["seq"])

        def check(config):
            check_selection(shape, check_seq, lambda q, k, out: select_blocks(q, k, Bk, topk, method=method,
                                                                              config=config, out=out))

        def timed(config):
            return lambda: select_blocks(q_idx, k_idx, Bk, topk, method=method, config=config)

        return check, timed

    return gpu_trial


def _topk_units(shape: dict, config: dict) -> list:
    return [(topk_program, dict(groups=shape["groups"], block_size=shape["block_size"], topk=shape["topk"],
                                **config))]


def _topk_trial(shape: dict, check_seq: int) -> tuple:
    """Timed: the kernel alone on the last (heaviest) query chunk of at most 16K queries."""
    from msa_tl.checks import check_selection, index_inputs

    N, Bk, topk, G = shape["seq"], shape["block_size"], shape["topk"], shape["groups"]
    chunk = min(N, 16384)
    t0 = N - chunk
    q_idx, k_idx = index_inputs(shape, N)
    scores = block_scores(q_idx, k_idx, Bk, None, t0, chunk).view(1, chunk * G, -1)
    out = torch.empty(1, N * G, topk, device="cuda", dtype=torch.int32)

    def check(config):
        check_selection(shape, check_seq, lambda q, k, o: select_blocks(q, k, Bk, topk, method="two_pass",
                                                                        query_chunk=1024, config=config, out=o))

    def timed(config):
        kernel = compiled_kernel(topk_program, groups=G, block_size=Bk, topk=topk, **{**TOPK_DEFAULTS, **config})
        return lambda: kernel(scores, out, t0)

    return check, timed


PIPELINED_TUNING = TunableProgram(
    name="index_select_pipelined", dims=SELECT_DIMS, defaults=PIPELINED_DEFAULTS, knobs=PIPELINED_KNOBS,
    reject=_reject_pipelined, compile_units=_select_units(pipelined_select_program),
    gpu_trial=_select_trial("pipelined"))
FUSED_TUNING = TunableProgram(
    name="index_select_fused", dims=SELECT_DIMS, defaults=FUSED_DEFAULTS, knobs=FUSED_KNOBS,
    reject=lambda config, shape: reject_row_tile(config, shape, stored_scores=False),
    compile_units=_select_units(fused_select_program), gpu_trial=_select_trial("fused"))
TOPK_TUNING = TunableProgram(
    name="index_topk", dims=("groups", "block_size", "topk"), defaults=TOPK_DEFAULTS, knobs=TOPK_KNOBS,
    reject=_reject_topk, compile_units=_topk_units, gpu_trial=_topk_trial)
