"""Main-branch backward (TileLang): the delta pre-pass, a pipelined KV-outer pass for dQ, dK and dV, the dQ sum.

With P = softmax of the scaled scores over the chosen keys, delta = rowsum(dO * O) - dlse:

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q

1. :func:`delta_program` reads O and dO once per (query, head) row and writes that row's
   (lse * log2 e, delta).
2. :func:`kv_outer_backward_program` runs one CTA per work item of :mod:`msa_tl.attention.scheduler` (a key
   block and up to ``item_queries`` of the (query, slot) entries that chose it), with roles and
   mbarriers written by hand:
   - a **producer** warpgroup loads K/V[blk] once, then gathers each tile's Q and dO rows
     (``64 / R`` queries x R heads, one contiguous R x D box each) and their (lse, delta) with
     ``cp.async`` into a ring of ``stages`` slots, each completed on its ``full`` mbarrier;
   - ``Bk / 64`` **consumer** warpgroups each own 64 key rows. Per tile a consumer computes
     S^T = K Q^T and dP^T = V dO^T (two async wgmma), P^T and dS^T in registers, issues
     dV += P^T dO and dK += dS^T Q with P^T, dS^T as register operands, and puts its dS^T rows in
     shared memory; once every consumer's rows are there, each computes its D / (Bk / 64) columns
     of dQ = dS K for the tile's rows.
   - dQ leaves either by fp32 atomics into dQ (one add per (query, head, chosen block) element) or as
     one partial row per (query, head, slot) in the input dtype, which :func:`dq_reduce_program`
     sums; dK and dV stay in registers for the whole item and are added once with fp32 atomics
     (hot blocks are split into several items).
3. The fp32 dK, dV (and atomic dQ) are cast to the input dtype.
Causal masking happens only on tiles that reach into the key block itself; -1 slots are never scheduled.
At head dim 256 a consumer's dK and dV [64, 256] fp32 would need 256 registers a thread: the blocks run as their
64-key halves (one consumer) and each chunk as two launches of 128 columns of dQ, dK and dV (``columns``,
``column0``), each computing S and dP over all 256.
"""

import math

import tilelang.language as T
import torch
from tilelang.layout import make_swizzled_layout

from msa_tl.attention.kv_outer import WIDE_HEAD_DIM, sparse_attention_forward, wide_head_blocks
from msa_tl.attention.scheduler import Schedule, first_query_macro, tile_rows_macro, work_item
from msa_tl.tl_compile import SMEM_LIMIT, compiled_kernel, tl_dtype
from msa_tl.tunable import ATTENTION_DIMS, TunableProgram, attention_program_args
from msa_tl.tuning.cache import tuned_config

DELTA_DEFAULTS = dict(rows=64, threads=128)
BACKWARD_ITEM_QUERIES = 1024
BACKWARD_QUERY_CHUNK = 16384  # with dQ partials: 2 * chunk * Hq * topk * D bytes of workspace (4 GiB, paper shape)
# H200, 128K: partials 60.6 ms, atomic dQ 74.8 (NOTES.md). item_queries (a work item's entries: the program's) and
# query_chunk (the driver's dQ-partial chunk) are tuned with the program's own knobs
BACKWARD_DEFAULTS = dict(stages=2, dq_partials=True, item_queries=BACKWARD_ITEM_QUERIES,
                         query_chunk=BACKWARD_QUERY_CHUNK)
BACKWARD_KNOBS = dict(stages=(1, 2, 3, 4), dq_partials=(False, True), item_queries=(256, 512, 1024, 2048, 4096),
                      query_chunk=(4096, 8192, 16384, 32768))  # the tuner's choices (BACKWARD_TUNING)
MAX_PARTIAL_BYTES = 8 << 30
REDUCE_DEFAULTS = dict(rows=64, threads=128)
_LOG2E = 1.4426950408889634


def delta_program(head_dim: int, rows: int = 64, threads: int = 128, dtype: str = "bfloat16"):
    """O, dO [n_rows, D], LSE, dLSE [n_rows] (fp32) -> Stats [n_rows, 2] = (lse * log2 e, rowsum(dO * O) - dlse)."""
    n_rows = T.dynamic("n_rows")

    @T.prim_func
    def attention_backward_delta(
        O: T.Tensor((n_rows, head_dim), dtype),
        dO: T.Tensor((n_rows, head_dim), dtype),
        LSE: T.Tensor((n_rows,), "float32"),
        dLSE: T.Tensor((n_rows,), "float32"),
        Stats: T.Tensor((n_rows, 2), "float32"),
    ):
        with T.Kernel(T.ceildiv(n_rows, rows), threads=threads) as bx:
            o = T.alloc_fragment((rows, head_dim), dtype)
            do = T.alloc_fragment((rows, head_dim), dtype)
            prod = T.alloc_fragment((rows, head_dim), "float32")
            delta = T.alloc_fragment((rows,), "float32")
            T.copy(O[bx * rows:(bx + 1) * rows, :], o)
            T.copy(dO[bx * rows:(bx + 1) * rows, :], do)
            for r, d in T.Parallel(rows, head_dim):
                prod[r, d] = T.cast(o[r, d], "float32") * T.cast(do[r, d], "float32")
            T.reduce_sum(prod, delta, dim=1)
            for r in T.Parallel(rows):
                if bx * rows + r < n_rows:
                    Stats[bx * rows + r, 0] = LSE[bx * rows + r] * _LOG2E
                    Stats[bx * rows + r, 1] = delta[r] - dLSE[bx * rows + r]

    return attention_backward_delta


CONSUMER_KEYS = 64  # key rows per consumer warpgroup: one wgmma M tile of S^T = K Q^T
TILE_ROWS = 64  # query rows (TQ queries x R heads) per tile: the wgmma N of S^T, the M of dQ


def backward_shared_bytes(heads_per_group: int, head_dim: int, block_size: int, stages: int,
                          item_queries: int = BACKWARD_ITEM_QUERIES, columns: int | None = None) -> int:
    """Shared memory of :func:`kv_outer_backward_program` (16-bit inputs): K and V, the ring of Q, dO and (lse, delta)
    rows, dS^T of two tiles, the consumers' dQ staging slices, the item's entries and its tiles' query positions."""
    rows, NC = TILE_ROWS, block_size // CONSUMER_KEYS
    TQ = rows // heads_per_group
    dq_slice = min((columns or head_dim) // NC, 64)
    return (2 * 2 * block_size * head_dim + stages * (2 * 2 * rows * head_dim + 8 * rows) + 2 * 2 * block_size * rows
            + 2 * NC * rows * dq_slice + 4 * math.ceil(item_queries / TQ) * TQ + 4 * NC * 2 * rows)


def kv_outer_backward_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float,
                              item_queries: int = BACKWARD_ITEM_QUERIES, stages: int = 2, dq_partials: bool = False,
                              columns: int | None = None, column0: int = 0, dtype: str = "bfloat16",
                              query_offset: bool = False):
    """Q, dO [B, N, Hq, D], K/V [B, N, G, D], Stats [B, N, Hq, 2], the schedule -> dK, dV (fp32, added into) and dQ.

    dQ is either fp32 [B, N, Hq, D], added into with atomics (``dq_partials=False``), or one partial
    row per (query, head, slot), DQpart [B, C*Hq*topk, D] in the input dtype at row
    ``(t * Hq + h) * topk + s`` for query ``t0 + t`` (``dq_partials=True``), summed by
    :func:`dq_reduce_program`. ``stages`` is the depth of the shared (Q, dO, stats) ring.
    ``columns`` / ``column0``: this launch computes only columns column0 .. column0 + columns - 1 of dQ, dK and dV
    (default: all D). Wide heads (D = 256) run as two such launches: S and dP need every column of Q, K, V and dO,
    but dK and dV [keys, D] in fp32 would not fit a consumer's registers.
    """
    batch, seq, n_bg, n_items, cap, n_part, n_dq = T.dynamic("batch, seq, n_bg, n_items, cap, n_part, n_dq")
    queries = T.dynamic("queries") if query_offset else seq  # the rows of Q, dO and Stats
    R = heads // groups
    rows, D, Bk = TILE_ROWS, head_dim, block_size
    W, c0 = columns or D, column0  # the launch's columns of dQ, dK and dV
    if c0 % 64 or W % 64 or c0 + W > D:
        raise ValueError(f"columns {c0} .. {c0 + W - 1}: whole 64-column slices of the head dim {D} only")
    NC = Bk // CONSUMER_KEYS  # consumer warpgroups, each owning 64 key rows of dK and dV
    DQ = W // NC  # dQ columns per consumer
    DQC = min(DQ, 64)  # of which one wgmma computes
    smem = backward_shared_bytes(R, D, Bk, stages, item_queries, W)
    if smem > SMEM_LIMIT:
        raise ValueError(f"backward: {smem} B of shared memory > {SMEM_LIMIT} B (stages={stages}, head_dim={D}, "
                         f"block_size={Bk}, columns={W})")
    TQ = rows // R
    n_entries = math.ceil(item_queries / TQ) * TQ
    scale_log2 = scale * _LOG2E
    threads = 128 * (NC + 1)
    first_query = first_query_macro(TQ, topk)
    gather_tile_rows = tile_rows_macro(R, D, TQ, topk)

    def q_rows(t, q0):  # the Q-side row of query position t: less the first position q0 the Q-side tensors hold
        return t if q0 is None else t - q0

    @T.macro
    def consumer(c, ctx, n_tiles, K_s, V_s, Q_r, dO_r, st_r, dS_s, full, empty, ent_s, qcol_s, blk, t0, q0, b, g,
                 s_t, dp_t, p_cast, ds_cast, dk, dv, dq, qrow, first, dQ_s, dQ, dQpart, dK, dV):
        """Consumer c: key rows c * 64 .. c * 64 + 63 of every tile; dQ columns c * DQ .. c * DQ + DQ - 1."""
        # A non-finite key must not reach the dQ of rows that do not see it (0 * NaN in dS K): zero it here.
        # The rows that do see it still get NaN, through their forward LSE (NaN) in P.
        for k, d in T.Parallel(CONSUMER_KEYS, D):
            K_s[c * CONSUMER_KEYS + k, d] = T.if_then_else(T.isfinite(T.cast(K_s[c * CONSUMER_KEYS + k, d], "float32")),
                                                           K_s[c * CONSUMER_KEYS + k, d], 0)
        T.fence_proxy_async()  # before the tensor cores read K_s (the first tile's barrier orders the other half)
        T.clear(dk)
        T.clear(dv)
        for i in T.serial(n_tiles):
            u = i % stages
            for j in T.Parallel(rows):  # the column's query position (-1: padding)
                qcol_s[c, i % 2, j] = T.if_then_else(ent_s[i * TQ + j // R] >= 0, t0 + ent_s[i * TQ + j // R] // topk, -1)
            first_query(first, ent_s, i, t0, seq)
            T.barrier_wait(full[u], (i // stages) & 1)
            T.wgmma_gemm(K_s[c * CONSUMER_KEYS:(c + 1) * CONSUMER_KEYS, :], Q_r[u, :, :], s_t, transpose_B=True,
                         clear_accum=True)  # S^T [64 keys, rows]
            T.wgmma_gemm(V_s[c * CONSUMER_KEYS:(c + 1) * CONSUMER_KEYS, :], dO_r[u, :, :], dp_t, transpose_B=True,
                         clear_accum=True)  # dP^T [64 keys, rows]
            T.sync_threads(1 + c, 128)  # qcol_s written
            T.wait_wgmma(1)
            if first[0] < blk * Bk + Bk - 1:
                for k, j in T.Parallel(CONSUMER_KEYS, rows):
                    s_t[k, j] = T.if_then_else(blk * Bk + c * CONSUMER_KEYS + k <= qcol_s[c, i % 2, j],
                                               T.exp2(s_t[k, j] * scale_log2 - st_r[u, j, 0]), 0)
            else:
                for k, j in T.Parallel(CONSUMER_KEYS, rows):
                    s_t[k, j] = T.exp2(s_t[k, j] * scale_log2 - st_r[u, j, 0])  # P^T
            T.copy(s_t, p_cast)
            T.wait_wgmma(0)
            for k, j in T.Parallel(CONSUMER_KEYS, rows):
                ds_cast[k, j] = s_t[k, j] * (dp_t[k, j] - st_r[u, j, 1])  # dS^T / scale
            T.wgmma_gemm(p_cast, dO_r[u, :, c0:c0 + W], dv)  # dV += P^T dO  [64 keys, W]
            T.wgmma_gemm(ds_cast, Q_r[u, :, c0:c0 + W], dk)  # dK += dS^T Q
            T.copy(ds_cast, dS_s[i % 2, c * CONSUMER_KEYS:(c + 1) * CONSUMER_KEYS, :])
            T.fence_proxy_async()
            T.sync_threads(1 + NC, 128 * NC)  # every consumer's dS^T rows are in dS_s
            for h in range(DQ // DQC):  # slices of DQC columns: a [rows, DQ] fp32 tile would serialise the wgmma
                col = c0 + c * DQ + h * DQC  # the slice's first column of dQ
                T.wgmma_gemm(dS_s[i % 2, :, :], K_s[:, col:col + DQC], dq, transpose_A=True,
                             clear_accum=True)  # dQ / scale [rows, DQC]
                if h == 0:
                    for r in T.Parallel(rows):
                        qrow[r] = qcol_s[c, i % 2, r]
                T.wait_wgmma(0)
                if h == 0:
                    T.barrier_arrive(empty[u])  # the producer may refill the slot
                if dq_partials:
                    T.sync_threads(1 + c, 128)  # the previous slice's rows have left dQ_s
                    for r, d in T.Parallel(rows, DQC):
                        dq[r, d] *= scale
                    T.copy(dq, dQ_s[c, :, :])
                    T.sync_threads(1 + c, 128)
                    for jj in T.unroll(rows * DQC // 8 // 128):  # 16-byte stores of whole partial row pieces
                        e = jj * 128 + ctx
                        if qcol_s[c, i % 2, e // (DQC // 8)] >= 0:
                            for v in T.vectorized(8):
                                dQpart[b, ((qcol_s[c, i % 2, e // (DQC // 8)] - t0) * heads + g * R
                                           + e // (DQC // 8) % R) * topk + ent_s[i * TQ + e // (DQC // 8) // R] % topk,
                                       col + e % (DQC // 8) * 8 + v] = dQ_s[c, e // (DQC // 8), e % (DQC // 8) * 8 + v]
                else:
                    for r, d in T.Parallel(rows, DQC):
                        if qrow[r] >= 0:
                            T.atomic_add(dQ[b, q_rows(qrow[r], q0), g * R + r % R, col + d], dq[r, d] * scale)
        if n_tiles > 0:
            for k, d in T.Parallel(CONSUMER_KEYS, W):
                if blk * Bk + c * CONSUMER_KEYS + k < seq:
                    T.atomic_add(dK[b, blk * Bk + c * CONSUMER_KEYS + k, g, c0 + d], dk[k, d] * scale)
                    T.atomic_add(dV[b, blk * Bk + c * CONSUMER_KEYS + k, g, c0 + d], dv[k, d])

    @T.macro
    def backward_items(Q, K, V, dO, Stats, Items, ItemCount, Entries, dQ, dQpart, dK, dV, t0, q0):
        with T.Kernel(n_items, n_bg, threads=threads) as (item, bg):
            K_s = T.alloc_shared((Bk, D), dtype)
            V_s = T.alloc_shared((Bk, D), dtype)
            Q_r = T.alloc_shared((stages, rows, D), dtype)  # the ring: Q, dO and (lse, delta) rows of a tile
            dO_r = T.alloc_shared((stages, rows, D), dtype)
            st_r = T.alloc_shared((stages, rows, 2), "float32")
            dS_s = T.alloc_shared((2, Bk, rows), dtype)  # dS^T of the last two tiles
            dQ_s = T.alloc_shared((NC, rows, DQC), dtype)
            ent_s = T.alloc_shared((n_entries,), "int32")  # the item's (query, slot) entries, -1 past its length
            qcol_s = T.alloc_shared((NC, 2, rows), "int32")  # per consumer, last two tiles: query positions, -1 = padding
            s_t0 = T.alloc_fragment((CONSUMER_KEYS, rows), "float32")  # S^T, then P^T
            s_t1 = T.alloc_fragment((CONSUMER_KEYS, rows), "float32")
            dp_t0 = T.alloc_fragment((CONSUMER_KEYS, rows), "float32")  # dP^T
            dp_t1 = T.alloc_fragment((CONSUMER_KEYS, rows), "float32")
            p_cast0 = T.alloc_fragment((CONSUMER_KEYS, rows), dtype)
            p_cast1 = T.alloc_fragment((CONSUMER_KEYS, rows), dtype)
            ds_cast0 = T.alloc_fragment((CONSUMER_KEYS, rows), dtype)
            ds_cast1 = T.alloc_fragment((CONSUMER_KEYS, rows), dtype)
            dk0 = T.alloc_fragment((CONSUMER_KEYS, W), "float32")
            dk1 = T.alloc_fragment((CONSUMER_KEYS, W), "float32")
            dv0 = T.alloc_fragment((CONSUMER_KEYS, W), "float32")
            dv1 = T.alloc_fragment((CONSUMER_KEYS, W), "float32")
            dq0 = T.alloc_fragment((rows, DQC), "float32")
            dq1 = T.alloc_fragment((rows, DQC), "float32")
            qrow0 = T.alloc_fragment((rows,), "int32")
            qrow1 = T.alloc_fragment((rows,), "int32")
            src = T.alloc_local((1,), "int32")  # the producer's current entry
            first = T.alloc_local((1,), "int32")
            T.annotate_layout({dQ_s: make_swizzled_layout(dQ_s)})
            kv_ready = T.alloc_barrier(128)
            full = T.alloc_barrier([128] * stages)
            empty = T.alloc_barrier([128 * NC] * stages)

            b = bg // groups
            g = bg % groups
            blk, start, length = work_item(Items, ItemCount, bg, item)
            n_tiles = T.ceildiv(length, TQ)
            tx = T.get_thread_binding()
            for i in T.Parallel(n_entries):
                ent_s[i] = T.if_then_else(i < length, Entries[bg, start + i], -1)
            T.sync_threads()

            if tx >= 128 * NC:  # producer
                T.set_max_nreg(40, 0)
                p = tx - 128 * NC
                T.async_copy(K[b, blk * Bk:(blk + 1) * Bk, g, :], K_s)
                T.async_copy(V[b, blk * Bk:(blk + 1) * Bk, g, :], V_s)
                T.cp_async_barrier_noinc(kv_ready[0])
                for i in T.serial(n_tiles):
                    u = i % stages
                    T.barrier_wait(empty[u], ((i // stages) & 1) ^ 1)
                    gather_tile_rows(ent_s, i, q_rows(t0, q0), b, g, p, src, u, Q_r, Q, dO_r, dO)  # zero-fill for padding
                    if p < rows:  # 8 bytes of (lse, delta) per row
                        src[0] = ent_s[i * TQ + p // R]
                        T.ptx_cp_async(T.access_ptr(st_r[u, p, 0], "w", 2),
                                       T.access_ptr(Stats[b, q_rows(t0, q0) + T.max(src[0], 0) // topk, g * R + p % R, 0],
                                                    "r", 2),
                                       2, src[0] >= 0)
                    T.cp_async_barrier_noinc(full[u])
            elif tx < 128:
                T.set_max_nreg(232 if NC == 2 else 240, 1)
                T.barrier_wait(kv_ready[0], 0)
                consumer(0, tx, n_tiles, K_s, V_s, Q_r, dO_r, st_r, dS_s, full, empty, ent_s, qcol_s, blk, t0, q0, b, g,
                         s_t0, dp_t0, p_cast0, ds_cast0, dk0, dv0, dq0, qrow0, first, dQ_s, dQ, dQpart, dK, dV)
            elif NC == 2:
                T.set_max_nreg(232, 1)
                T.barrier_wait(kv_ready[0], 0)
                consumer(1, tx - 128, n_tiles, K_s, V_s, Q_r, dO_r, st_r, dS_s, full, empty, ent_s, qcol_s, blk, t0,
                         q0, b, g, s_t1, dp_t1, p_cast1, ds_cast1, dk1, dv1, dq1, qrow1, first, dQ_s, dQ, dQpart, dK, dV)


    if query_offset:
        @T.prim_func
        def kv_outer_attention_backward_offset(
            Q: T.Tensor((batch, queries, heads, head_dim), dtype),
            K: T.Tensor((batch, seq, groups, head_dim), dtype),
            V: T.Tensor((batch, seq, groups, head_dim), dtype),
            dO: T.Tensor((batch, queries, heads, head_dim), dtype),
            Stats: T.Tensor((batch, queries, heads, 2), "float32"),
            Items: T.Tensor((n_bg, n_items, 3), "int32"),
            ItemCount: T.Tensor((n_bg,), "int32"),
            Entries: T.Tensor((n_bg, cap), "int32"),
            dQ: T.Tensor((batch, n_dq, heads, head_dim), "float32"),  # atomic dQ (else unused)
            dQpart: T.Tensor((batch, n_part, head_dim), dtype),  # dQ partials (else unused)
            dK: T.Tensor((batch, seq, groups, head_dim), "float32"),
            dV: T.Tensor((batch, seq, groups, head_dim), "float32"),
            t0: T.int32,
            q0: T.int32,
        ):
            backward_items(Q, K, V, dO, Stats, Items, ItemCount, Entries, dQ, dQpart, dK, dV, t0, q0)

        return kv_outer_attention_backward_offset

    @T.prim_func
    def kv_outer_attention_backward(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        V: T.Tensor((batch, seq, groups, head_dim), dtype),
        dO: T.Tensor((batch, seq, heads, head_dim), dtype),
        Stats: T.Tensor((batch, seq, heads, 2), "float32"),
        Items: T.Tensor((n_bg, n_items, 3), "int32"),
        ItemCount: T.Tensor((n_bg,), "int32"),
        Entries: T.Tensor((n_bg, cap), "int32"),
        dQ: T.Tensor((batch, n_dq, heads, head_dim), "float32"),  # atomic dQ (else unused)
        dQpart: T.Tensor((batch, n_part, head_dim), dtype),  # dQ partials (else unused)
        dK: T.Tensor((batch, seq, groups, head_dim), "float32"),
        dV: T.Tensor((batch, seq, groups, head_dim), "float32"),
        t0: T.int32,
    ):
        backward_items(Q, K, V, dO, Stats, Items, ItemCount, Entries, dQ, dQpart, dK, dV, t0, None)

    return kv_outer_attention_backward


# As in the forward: roles and barriers by hand, no automatic shared-memory syncs, fast exp2.
kv_outer_backward_program.pass_configs = {"tl.disable_warp_specialized": True, "tl.disable_thread_storage_sync": True,
                                          "tl.enable_fast_math": True}


def dq_reduce_program(groups: int, heads: int, head_dim: int, topk: int, rows: int = 64, threads: int = 128,
                      dtype: str = "bfloat16"):
    """dQpart [B, C*Hq, topk, D], Indices [B, N, G, topk] -> dQ [B, N*Hq, D]: the sum of each row's chosen slots."""
    batch, seq, rows_c = T.dynamic("batch, seq, rows_c")
    R = heads // groups

    @T.prim_func
    def dq_reduce(
        dQpart: T.Tensor((batch, rows_c, topk, head_dim), dtype),
        Indices: T.Tensor((batch, seq, groups, topk), "int32"),
        dQ: T.Tensor((batch, seq * heads, head_dim), dtype),
        t0: T.int32,
    ):
        with T.Kernel(T.ceildiv(rows_c, rows), batch, threads=threads) as (bx, b):
            chosen = T.alloc_shared((rows, topk), "int32")  # 1 where the slot holds a block (its partial was written)
            acc = T.alloc_fragment((rows, head_dim), "float32")
            r0 = bx * rows
            for r, s in T.Parallel(rows, topk):
                chosen[r, s] = T.if_then_else(r0 + r < rows_c, T.if_then_else(
                    Indices[b, t0 + (r0 + r) // heads, (r0 + r) % heads // R, s] >= 0, 1, 0), 0)
            T.clear(acc)
            for s in T.serial(topk):  # a select: unwritten partials hold garbage (even NaN)
                for r, d in T.Parallel(rows, head_dim):
                    acc[r, d] += T.if_then_else(chosen[r, s] > 0, T.cast(dQpart[b, r0 + r, s, d], "float32"), 0.0)
            for r, d in T.Parallel(rows, head_dim):
                if r0 + r < rows_c:
                    dQ[b, t0 * heads + r0 + r, d] = acc[r, d]

    return dq_reduce


def sparse_attention_backward(do, dlse, q, k, v, indices, o, lse, block_size: int, scale=None, *,
                              item_queries: int | None = None, query_chunk=None, config=None, query_start: int = 0):
    """Main-branch backward on the GPU -> (dq, dk, dv) in the input dtype.

    do, o, q [B, N, Hq, D]; k, v [B, N, G, D]; lse (and dlse, or None) [B, N, Hq] float32;
    indices [B, N, G, topk] int32 (-1 = unused). ``query_start``: the query-side tensors (do, o, q, lse, dlse,
    indices; dq) hold the N queries from that position on, k / v the query_start + N keys up to the last (the
    kernel's build with a query offset). Workspace: fp32 dK, dV, the (lse, delta) rows
    (8 bytes per query head), a schedule, and either an fp32 dQ (atomic dQ: one schedule over the
    whole sequence) or the dQ partials of one query chunk (``query_chunk`` queries). ``item_queries`` and
    ``query_chunk`` override the config's (:data:`BACKWARD_DEFAULTS`, or the tuned one).

    Head dims above ``WIDE_HEAD_DIM`` (128; up to 256) run, as in the forward, each block as its 64-key halves
    (:func:`~msa_tl.attention.kv_outer.split_blocks`) in chunks of ``WIDE_HEAD_CHUNK`` queries unless told, and
    each chunk as two launches of ``WIDE_HEAD_DIM`` columns of dQ, dK and dV (each computes S and dP in full).
    """
    B, N, Hq, D = q.shape
    n_keys = k.shape[1]
    if n_keys != query_start + N:
        raise ValueError(f"k / v hold the {query_start + N} keys up to the last query (query_start {query_start} + "
                         f"{N} queries), got {n_keys}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    wide = D > WIDE_HEAD_DIM
    shape = dict(groups=k.shape[2], heads=Hq, head_dim=D, block_size=block_size, topk=indices.shape[3], seq=N)
    config = {**tuned_config("kv_outer_backward", shape, BACKWARD_DEFAULTS, q.device), **(config or {})}
    tuned_items, tuned_chunk = config.pop("item_queries"), config.pop("query_chunk")  # the rest: the program's
    item_queries = item_queries or tuned_items
    if not wide:  # wide heads run their own chunk unless told
        query_chunk = query_chunk or tuned_chunk
    indices, block_size, query_chunk = wide_head_blocks(indices, block_size, D, query_chunk, query_start)
    G, topk = k.shape[2], indices.shape[3]
    dt = tl_dtype(q.dtype)
    stats = torch.empty((B, N, Hq, 2), device=q.device, dtype=torch.float32)
    dlse = torch.zeros_like(lse) if dlse is None else dlse.float().contiguous()
    delta = compiled_kernel(delta_program, head_dim=D, dtype=dt, **DELTA_DEFAULTS)
    delta(o.reshape(-1, D), do.reshape(-1, D), lse.reshape(-1), dlse.reshape(-1), stats.view(-1, 2))
    chunk = min(N, query_chunk) if config["dq_partials"] else N
    schedule = Schedule(B, G, math.ceil(n_keys / block_size), chunk, topk, item_queries, q.device)
    dk = torch.zeros((B, n_keys, G, D), device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    if config["dq_partials"]:
        dq_acc = torch.empty((B, 1, Hq, D), device=q.device, dtype=torch.float32)  # unused
        dq = torch.empty_like(q)
        dq_part = torch.empty(B * chunk * Hq * topk * D, device=q.device, dtype=q.dtype)
        reduce = compiled_kernel(dq_reduce_program, groups=G, heads=Hq, head_dim=D, topk=topk, dtype=dt,
                                 **REDUCE_DEFAULTS)
    else:
        dq_acc = torch.zeros((B, N, Hq, D), device=q.device, dtype=torch.float32)
        dq_part = torch.empty(B * D, device=q.device, dtype=q.dtype)  # unused
    windows = [dict(columns=WIDE_HEAD_DIM, column0=c0) for c0 in range(0, D, WIDE_HEAD_DIM)] if wide else [{}]
    kernels = [compiled_kernel(kv_outer_backward_program, groups=G, heads=Hq, head_dim=D, block_size=block_size,
                               topk=topk, scale=scale, item_queries=item_queries, dtype=dt, **config, **window,
                               **(dict(query_offset=True) if query_start else {}))
               for window in windows]
    for t0 in range(0, N, chunk):
        count = min(chunk, N - t0)
        schedule.build(indices, t0, count)
        part = dq_part[: B * count * Hq * topk * D].view(B, -1, D) if config["dq_partials"] else dq_part.view(B, 1, D)
        for kernel in kernels:
            kernel(q, k, v, do, stats, schedule.items, schedule.item_count, schedule.entries, dq_acc, part, dk, dv,
                   query_start + t0, *((query_start,) if query_start else ()))
        if config["dq_partials"]:
            reduce(part.view(B, count * Hq, topk, D), indices, dq.view(B, N * Hq, D), t0)
    dq = dq if config["dq_partials"] else dq_acc.to(q.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _reject_backward(config: dict, shape: dict):
    R, D, Bk = shape["heads"] // shape["groups"], shape["head_dim"], shape["block_size"]
    if 64 % R or Bk % 64:
        return f"tiles of 64 rows need whole queries ({R} heads) and 64-key consumers (Bk {Bk})"
    smem = backward_shared_bytes(R, D, Bk, config["stages"], config["item_queries"])
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    if not config["dq_partials"] and config["query_chunk"] != BACKWARD_QUERY_CHUNK:
        return "query_chunk sizes the dQ partials: with atomic dQ every value runs the same (one schedule)"
    partial_bytes = 2 * config["query_chunk"] * shape["heads"] * shape["topk"] * D
    if config["dq_partials"] and partial_bytes > MAX_PARTIAL_BYTES:
        return f"dQ partials of one chunk take {partial_bytes / 2**30:.0f} GiB > {MAX_PARTIAL_BYTES >> 30} GiB"
    return None


def _program_config(config: dict) -> dict:
    """The program's own knobs of a backward config (query_chunk is the driver's)."""
    return {name: value for name, value in config.items() if name != "query_chunk"}


def _compile_units(shape: dict, config: dict) -> list:
    units = [(kv_outer_backward_program, dict(attention_program_args(shape), **_program_config(config)))]
    if config["dq_partials"]:
        units.append((dq_reduce_program, dict(groups=shape["groups"], heads=shape["heads"], head_dim=shape["head_dim"],
                                              topk=shape["topk"], dtype="bfloat16", **REDUCE_DEFAULTS)))
    return units


def _gpu_trial(shape: dict, check_seq: int) -> tuple:
    """Timed: the whole backward (delta, dQ/dK/dV pass, dQ sum) after one forward, at ``shape["seq"]``."""
    from msa_tl import reference as R
    from msa_tl.checks import attention_inputs, relative_error

    Bk = shape["block_size"]
    q, k, v, indices = attention_inputs(shape, shape["seq"])
    o, lse = sparse_attention_forward(q, k, v, indices, Bk)
    do = torch.randn_like(q)

    def check(config):
        qc, kc, vc, ic = attention_inputs(shape, check_seq)
        oc, lc = sparse_attention_forward(qc, kc, vc, ic, Bk)
        doc = torch.randn_like(qc)
        grads = sparse_attention_backward(doc, None, qc, kc, vc, ic, oc, lc, Bk, config=config)
        for got, ref in zip(grads, R.sparse_attention_backward(doc, None, qc, kc, vc, ic, Bk)):
            rel = relative_error(got, ref)
            assert rel <= 2e-2, f"gradient rel err {rel:.2e}"

    def timed(config):
        return lambda: sparse_attention_backward(do, None, q, k, v, indices, o, lse, Bk, config=config)

    return check, timed


BACKWARD_TUNING = TunableProgram(
    name="kv_outer_backward", dims=ATTENTION_DIMS, defaults=BACKWARD_DEFAULTS, knobs=BACKWARD_KNOBS,
    reject=_reject_backward, compile_units=_compile_units, gpu_trial=_gpu_trial)
