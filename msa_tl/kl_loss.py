"""KL alignment loss on the GPU (TileLang), over the KV-outer schedule (sparse mode: the chosen blocks).

For a (query t, group g) row with chosen tokens j:

    teacher_j = mean over the group's R heads of exp(scale q_h . k_j - lse_h)    (the main branch, detached)
    s_j       = index_scale q_idx . k_idx_j                                     (student logits)
    KL        = sum_j teacher_j (log teacher_j - s_j) + logsumexp_j s_j

(sum_j teacher_j = 1, since the lse_h are the main branch's), and d KL / d s_j = softmax(s)_j - teacher_j.
Two passes over the whole-sequence KV-outer schedule, one CTA per work item (a key block and the
(query, slot) entries that chose it):
- :func:`student_lse_program` gathers only q_idx rows and writes each (query, slot)'s logsumexp of s over
  its block; torch merges the slots into the student LSE (N * G * topk values).
- :func:`kl_fused_program`, pipelined like the attention kernels (a producer warpgroup gathering Q and q_idx
  rows into an mbarrier ring, consumers on 64-key halves), computes per tile S^T = K Q^T, the teacher as
  P^T times a head-averaging matrix (an MMA), the student logits, and from them at once the loss terms
  (added per (query, slot)) and both index gradients: dk_idx += dS^T q_idx per item, dq_idx^T = k_idx^T dS^T
  per tile. So the loss and its gradients cost one pass; :func:`kl_alignment_loss_forward` can return the
  gradients (of the loss itself) with the value, and the backward only scales them.
Nothing N x N is formed. The teacher's lse is the main branch's own, passed in by the layer (one
main-branch forward recomputes it otherwise). The warmup's KL, over every visible token, runs the same
programs on :func:`causal_selection`.
"""

import math

import tilelang.language as T
import torch

from msa_tl.attention.scheduler import Schedule, first_query_macro, tile_rows_macro, work_item
from msa_tl.tl_compile import compiled_kernel, tl_dtype

# tile_rows: query rows a tile (TQ = rows / R queries). 128 halves the tiles, each a chain of small wgmma waits and
# barriers that one CTA an SM runs in sequence (NOTES.md); it needs R >= 8 (the student's tiles stay 16 wide).
KL_DEFAULTS = dict(stages=2, tile_rows=64)
KL_ITEM_QUERIES = 1024
LSE_TILE = 64  # queries per tile of the student-LSE pass
CONSUMER_KEYS = 64
TILE_ROWS = 64
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_NAN_MARK = 2.0 ** 100  # stands for a NaN teacher probability inside the head-mean GEMM (exact in bf16)


def student_lse_program(groups: int, index_dim: int, block_size: int, topk: int, index_scale: float,
                        item_queries: int = KL_ITEM_QUERIES, dtype: str = "bfloat16", query_offset: bool = False):
    """Qidx [B, N, G, Di], Kidx [B, N, Di], the schedule -> LsePart [B, N, G, topk]: per (query, slot) the
    logsumexp of the student logits over the slot's block (causal), -inf-initialised by the caller.
    ``query_offset``: Qidx and LsePart hold the queries from position q0 (a runtime scalar after LsePart) on, the
    schedule's entries counting from there."""
    batch, seq, n_bg, n_items, cap = T.dynamic("batch, seq, n_bg, n_items, cap")
    queries = T.dynamic("queries") if query_offset else seq  # the rows of Qidx and LsePart
    Bk, Di, TQ = block_size, index_dim, LSE_TILE
    n_entries = math.ceil(item_queries / TQ) * TQ
    neg_inf = -T.infinity("float32")
    scale_log2 = index_scale * _LOG2E

    def position(row, q0):  # the query position of a row of Qidx
        return row if q0 is None else row + q0

    @T.macro
    def student_items(Qidx, Kidx, Items, ItemCount, Entries, LsePart, q0):
        with T.Kernel(n_items, n_bg, threads=128) as (item, bg):
            Kidx_s = T.alloc_shared((Bk, Di), dtype)
            Qidx_s = T.alloc_shared((TQ, Di), dtype)
            ent_s = T.alloc_shared((n_entries,), "int32")
            qpos_s = T.alloc_shared((TQ,), "int32")  # the tile's query positions, -1 for padding (for the gather)
            qpos = T.alloc_fragment((TQ,), "int32")  # the same, laid out like the score rows
            s = T.alloc_fragment((TQ, Bk), "float32")  # student logits of the tile's queries over the block
            m = T.alloc_fragment((TQ,), "float32")
            l = T.alloc_fragment((TQ,), "float32")
            b = bg // groups
            g = bg % groups
            blk, start, length = work_item(Items, ItemCount, bg, item)
            for i in T.Parallel(n_entries):
                ent_s[i] = T.if_then_else(i < length, Entries[bg, start + i], -1)
            T.copy(Kidx[b, blk * Bk:(blk + 1) * Bk, :], Kidx_s)
            for tile in T.serial(T.ceildiv(length, TQ)):
                for r in T.Parallel(TQ):
                    qpos_s[r] = T.if_then_else(ent_s[tile * TQ + r] >= 0, ent_s[tile * TQ + r] // topk, -1)
                for r in T.Parallel(TQ):
                    qpos[r] = qpos_s[r]
                for r, d in T.Parallel(TQ, Di):
                    Qidx_s[r, d] = T.if_then_else(qpos_s[r] >= 0, Qidx[b, T.max(qpos_s[r], 0), g, d], 0)
                T.gemm(Qidx_s, Kidx_s, s, transpose_B=True, clear_accum=True)
                for r, col in T.Parallel(TQ, Bk):
                    s[r, col] = T.if_then_else(blk * Bk + col <= position(qpos[r], q0), s[r, col] * scale_log2,
                                               neg_inf)
                T.reduce_max(s, m, dim=1)
                for r, col in T.Parallel(TQ, Bk):
                    s[r, col] = T.exp2(s[r, col] - m[r])
                T.reduce_sum(s, l, dim=1)
                for r in T.Parallel(TQ):
                    if qpos[r] >= 0:
                        LsePart[b, qpos[r], g, ent_s[tile * TQ + r] % topk] = (m[r] + T.log2(l[r])) * _LN2


    if query_offset:
        @T.prim_func
        def kl_student_lse_offset(
            Qidx: T.Tensor((batch, queries, groups, index_dim), dtype),
            Kidx: T.Tensor((batch, seq, index_dim), dtype),
            Items: T.Tensor((n_bg, n_items, 3), "int32"),
            ItemCount: T.Tensor((n_bg,), "int32"),
            Entries: T.Tensor((n_bg, cap), "int32"),
            LsePart: T.Tensor((batch, queries, groups, topk), "float32"),
            q0: T.int32,
        ):
            student_items(Qidx, Kidx, Items, ItemCount, Entries, LsePart, q0)

        return kl_student_lse_offset

    @T.prim_func
    def kl_student_lse(
        Qidx: T.Tensor((batch, seq, groups, index_dim), dtype),
        Kidx: T.Tensor((batch, seq, index_dim), dtype),
        Items: T.Tensor((n_bg, n_items, 3), "int32"),
        ItemCount: T.Tensor((n_bg,), "int32"),
        Entries: T.Tensor((n_bg, cap), "int32"),
        LsePart: T.Tensor((batch, seq, groups, topk), "float32"),
    ):
        student_items(Qidx, Kidx, Items, ItemCount, Entries, LsePart, None)

    return kl_student_lse


def kl_fused_program(groups: int, heads: int, head_dim: int, index_dim: int, block_size: int, topk: int,
                     scale: float, index_scale: float, item_queries: int = KL_ITEM_QUERIES, stages: int = 2,
                     mean_heads: int | None = None, dtype: str = "bfloat16", query_offset: bool = False,
                     tile_rows: int = TILE_ROWS):
    """Q [B,N,Hq,D], K [B,N,G,D], Qidx [B,N,G,Di], Kidx [B,N,Di], Lse2 [B,N,Hq] (teacher lse * log2 e),
    LseS2 [B,N,G] (student lse * log2 e), the schedule, Weight [1] -> adds into KLpart [B,N,G,topk] (per
    (query, slot): sum over the block of t (log t - s)), fp32 dQidx [B,N,G,Di] and dKidx [B,N,Di] (times Weight).

    One CTA per work item; a producer warpgroup gathers each tile's Q rows (64 / R queries x R heads), q_idx rows
    and both LSEs into a ring of ``stages`` slots; Bk / 64 consumer warpgroups own 64 keys each. ``mean_heads``:
    the teacher averages only each group's first ``mean_heads`` of its R heads (the rest are padding).
    ``query_offset``: the query-side tensors (Q, Qidx, both LSEs, KLpart, dQidx) hold the queries from position q0
    (a runtime scalar after Weight) on, the schedule's entries counting from there.
    """
    batch, seq, n_bg, n_items, cap = T.dynamic("batch, seq, n_bg, n_items, cap")
    queries = T.dynamic("queries") if query_offset else seq  # the query-side tensors' rows
    R = heads // groups
    if tile_rows not in (64, 128):
        raise ValueError(f"the KL's tiles hold 64 or 128 query rows, got {tile_rows}")
    if tile_rows == 128 and heads // groups < 8:
        raise ValueError(f"128-row KL tiles need >= 8 query heads per KV head (16 queries a tile at most), got "
                         f"{heads // groups}")
    rows, D, Di, Bk = tile_rows, head_dim, index_dim, block_size
    NC = Bk // CONSUMER_KEYS
    TQ = rows // R
    TQP = max(16, TQ)  # the query tile padded to the 16-wide MMA step
    n_entries = math.ceil(item_queries / TQ) * TQ
    scale_log2 = scale * _LOG2E
    parts = [(p, p % NC) for p in range(Di // 64)]  # (64-row slice of dq_idx^T, the consumer computing it)
    seg = 128 // TQP  # key segments of the loss sum per query (TQP <= 64)
    threads = 128 * (NC + 1)
    t0 = 0  # the schedule covers the whole sequence (of queries: the query-side tensors' first row)
    real_heads_only = mean_heads is not None and mean_heads != R
    head_sum = mean_heads if real_heads_only else 1  # what avg_s's column sums to
    first_query = first_query_macro(TQ, topk)
    gather_tile_rows = tile_rows_macro(R, D, TQ, topk)

    def positions_from(q0):  # the position of the query-side tensors' first row
        return t0 if q0 is None else q0

    def q_rows(position, q0):  # the query-side row of a query position
        return position if q0 is None else position - q0

    @T.macro
    def consumer(c, ctx, n_tiles, K_s, Kidx_s, Q_r, Qi_r, l_r, ls_r, avg_s, dSp_s, xs, full, empty, ent_s, qcol_s,
                 blk, p0, q0, b, g, s_t, sp_t, p_cast, t_t, dsp, dsp_cast, xterm, dkidx, dqidx, first, acc,
                 KLpart, dQidx, dKidx, Weight):  # p0: the first row's query position
        T.clear(dkidx)
        for i in T.serial(n_tiles):
            u = i % stages
            for j in T.Parallel(TQP):
                qcol_s[c, i % 2, j] = T.if_then_else(j < TQ, T.if_then_else(
                    ent_s[i * TQ + T.min(j, TQ - 1)] >= 0, p0 + ent_s[i * TQ + T.min(j, TQ - 1)] // topk, -1), -1)
            first_query(first, ent_s, i, p0, seq)
            T.barrier_wait(full[u], (i // stages) & 1)
            T.wgmma_gemm(K_s[c * CONSUMER_KEYS:(c + 1) * CONSUMER_KEYS, :], Q_r[u, :, :], s_t, transpose_B=True,
                         clear_accum=True)  # S^T [64 keys, rows]
            T.wgmma_gemm(Kidx_s[c * CONSUMER_KEYS:(c + 1) * CONSUMER_KEYS, :], Qi_r[u, :, :], sp_t,
                         transpose_B=True, clear_accum=True)  # student logits^T / index_scale [64 keys, TQP]
            T.sync_threads(1 + c, 128)  # qcol_s written
            T.wait_wgmma(0)
            if first[0] < blk * Bk + Bk - 1:
                for k, j in T.Parallel(CONSUMER_KEYS, rows):
                    s_t[k, j] = T.if_then_else(blk * Bk + c * CONSUMER_KEYS + k <= qcol_s[c, i % 2, j // R],
                                               T.exp2(s_t[k, j] * scale_log2 - l_r[u, j]), 0)
            else:
                for k, j in T.Parallel(CONSUMER_KEYS, rows):
                    s_t[k, j] = T.exp2(s_t[k, j] * scale_log2 - l_r[u, j])  # P^T
            # The head mean below is a GEMM: a NaN P (a row whose scores or LSE are NaN) would reach the other
            # queries of the tile as NaN * 0. It travels instead as a finite marker, which only its own query's
            # column can sum past 2 (2 x mean_heads), and turns back into NaN there.
            for k, j in T.Parallel(CONSUMER_KEYS, rows):
                s_t[k, j] = T.if_then_else(s_t[k, j] <= 2.0, s_t[k, j], _NAN_MARK)
            T.copy(s_t, p_cast)
            T.wgmma_gemm(p_cast, avg_s, t_t, clear_accum=True)  # teacher^T = P^T avg: the mean over each query's heads
            T.wait_wgmma(0)
            for k, j in T.Parallel(CONSUMER_KEYS, TQP):
                # avg_s holds 1 for a real head with mean_heads: 1 / mean_heads (inexact in bf16) is applied in fp32
                t_t[k, j] = T.if_then_else(t_t[k, j] <= 2.0 * head_sum, t_t[k, j] * (1.0 / head_sum),
                                           T.float32(float("nan")))
            for k, j in T.Parallel(CONSUMER_KEYS, TQP):
                # d loss / d s = softmax(s) - teacher, through s = index_scale q_idx . k_idx
                dsp[k, j] = T.if_then_else(blk * Bk + c * CONSUMER_KEYS + k <= qcol_s[c, i % 2, j], index_scale * (
                    T.exp2(sp_t[k, j] * (index_scale * _LOG2E) - ls_r[u, j]) - t_t[k, j]), 0)
                # 0 log 0 = 0; a NaN teacher (a NaN score the row sees) keeps its NaN
                xterm[k, j] = T.if_then_else(t_t[k, j] == 0, 0,
                                             t_t[k, j] * (T.log(t_t[k, j]) - sp_t[k, j] * index_scale))
            T.copy(dsp, dsp_cast)
            T.wgmma_gemm(dsp_cast, Qi_r[u, :, :], dkidx)  # dk_idx += dS^T q_idx  [64 keys, Di]
            T.copy(dsp_cast, dSp_s[i % 2, c * CONSUMER_KEYS:(c + 1) * CONSUMER_KEYS, :])
            T.copy(xterm, xs[c, :, :])
            T.fence_proxy_async()
            T.sync_threads(1 + NC, 128 * NC)  # every consumer's dS^T rows are in dSp_s
            T.wait_wgmma(0)  # dk_idx += ...: the slot's q_idx rows are read
            T.barrier_arrive(empty[u])
            for p, owner in parts:
                if owner == c:
                    T.wgmma_gemm(Kidx_s[:, p * 64:(p + 1) * 64], dSp_s[i % 2, :, :], dqidx, transpose_A=True,
                                 clear_accum=True)  # dq_idx^T [64 of Di, TQP]
                    T.wait_wgmma(0)
                    for r, j in T.Parallel(64, TQP):
                        if qcol_s[c, i % 2, j] >= 0:
                            T.atomic_add(dQidx[b, q_rows(qcol_s[c, i % 2, j], q0), g, p * 64 + r],
                                         dqidx[r, j] * Weight[0])
            for e in T.serial(T.ceildiv(TQP * seg, 128)):  # the tile's loss terms, summed over the consumer's keys
                if e * 128 + ctx < TQP * seg:
                    acc[0] = 0.0
                    for kk in T.serial(CONSUMER_KEYS // seg):
                        acc[0] += xs[c, (e * 128 + ctx) // TQP * (CONSUMER_KEYS // seg) + kk, (e * 128 + ctx) % TQP]
                    if qcol_s[c, i % 2, (e * 128 + ctx) % TQP] >= 0:
                        T.atomic_add(KLpart[b, q_rows(qcol_s[c, i % 2, (e * 128 + ctx) % TQP], q0), g,
                                            ent_s[i * TQ + T.min((e * 128 + ctx) % TQP, TQ - 1)] % topk], acc[0])
        if n_tiles > 0:
            for k, d in T.Parallel(CONSUMER_KEYS, Di):
                if blk * Bk + c * CONSUMER_KEYS + k < seq:
                    T.atomic_add(dKidx[b, blk * Bk + c * CONSUMER_KEYS + k, d], dkidx[k, d] * Weight[0])

    @T.macro
    def kl_items(Q, K, Qidx, Kidx, Lse2, LseS2, Items, ItemCount, Entries, KLpart, dQidx, dKidx, Weight, q0):
        with T.Kernel(n_items, n_bg, threads=threads) as (item, bg):
            K_s = T.alloc_shared((Bk, D), dtype)
            Kidx_s = T.alloc_shared((Bk, Di), dtype)
            Q_r = T.alloc_shared((stages, rows, D), dtype)  # the ring: Q rows, q_idx rows and both LSEs of a tile
            Qi_r = T.alloc_shared((stages, TQP, Di), dtype)
            l_r = T.alloc_shared((stages, rows), "float32")
            ls_r = T.alloc_shared((stages, TQP), "float32")
            avg_s = T.alloc_shared((rows, TQP), dtype)  # 1/R where row r is a head of query j
            dSp_s = T.alloc_shared((2, Bk, TQP), dtype)  # dS^T of the last two tiles
            xs = T.alloc_shared((NC, CONSUMER_KEYS, TQP), "float32")  # loss terms of the tile
            ent_s = T.alloc_shared((n_entries,), "int32")
            qcol_s = T.alloc_shared((NC, 2, TQP), "int32")
            s_t0 = T.alloc_fragment((CONSUMER_KEYS, rows), "float32")  # S^T, then P^T
            s_t1 = T.alloc_fragment((CONSUMER_KEYS, rows), "float32")
            sp_t0 = T.alloc_fragment((CONSUMER_KEYS, TQP), "float32")
            sp_t1 = T.alloc_fragment((CONSUMER_KEYS, TQP), "float32")
            p_cast0 = T.alloc_fragment((CONSUMER_KEYS, rows), dtype)
            p_cast1 = T.alloc_fragment((CONSUMER_KEYS, rows), dtype)
            t_t0 = T.alloc_fragment((CONSUMER_KEYS, TQP), "float32")  # teacher^T
            t_t1 = T.alloc_fragment((CONSUMER_KEYS, TQP), "float32")
            dsp0 = T.alloc_fragment((CONSUMER_KEYS, TQP), "float32")
            dsp1 = T.alloc_fragment((CONSUMER_KEYS, TQP), "float32")
            dsp_cast0 = T.alloc_fragment((CONSUMER_KEYS, TQP), dtype)
            dsp_cast1 = T.alloc_fragment((CONSUMER_KEYS, TQP), dtype)
            xterm0 = T.alloc_fragment((CONSUMER_KEYS, TQP), "float32")
            xterm1 = T.alloc_fragment((CONSUMER_KEYS, TQP), "float32")
            dkidx0 = T.alloc_fragment((CONSUMER_KEYS, Di), "float32")
            dkidx1 = T.alloc_fragment((CONSUMER_KEYS, Di), "float32")
            dqidx0 = T.alloc_fragment((64, TQP), "float32")  # dq_idx^T, 64 of the Di rows at a time
            dqidx1 = T.alloc_fragment((64, TQP), "float32")
            src = T.alloc_local((1,), "int32")
            first = T.alloc_local((1,), "int32")
            acc = T.alloc_local((1,), "float32")
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
            if not real_heads_only:
                for r, j in T.Parallel(rows, TQP):
                    avg_s[r, j] = T.if_then_else(r // R == j, 1.0 / R, 0.0)
            else:  # padded heads weigh nothing in the teacher
                for r, j in T.Parallel(rows, TQP):
                    avg_s[r, j] = T.if_then_else((r // R == j) & (r % R < mean_heads), 1.0, 0.0)
            for u, r, d in T.Parallel(stages, TQP, Di):  # query rows past TQ stay zero
                Qi_r[u, r, d] = 0
            T.fence_proxy_async()
            T.sync_threads()

            if tx >= 128 * NC:  # producer
                T.set_max_nreg(56, 0)
                p = tx - 128 * NC
                T.async_copy(K[b, blk * Bk:(blk + 1) * Bk, g, :], K_s)
                T.async_copy(Kidx[b, blk * Bk:(blk + 1) * Bk, :], Kidx_s)
                T.cp_async_barrier_noinc(kv_ready[0])
                for i in T.serial(n_tiles):
                    u = i % stages
                    T.barrier_wait(empty[u], ((i // stages) & 1) ^ 1)
                    gather_tile_rows(ent_s, i, t0, b, g, p, src, u, Q_r, Q)  # the Q rows
                    for j in T.unroll(T.ceildiv(TQ * Di // 8, 128)):  # the q_idx rows
                        if j * 128 + p < TQ * Di // 8:
                            src[0] = ent_s[i * TQ + (j * 128 + p) // (Di // 8)]
                            T.ptx_cp_async(
                                T.access_ptr(Qi_r[u, (j * 128 + p) // (Di // 8), (j * 128 + p) % (Di // 8) * 8], "w", 8),
                                T.access_ptr(Qidx[b, t0 + T.max(src[0], 0) // topk, g, (j * 128 + p) % (Di // 8) * 8],
                                             "r", 8),
                                8, src[0] >= 0)
                    if p < rows:
                        src[0] = ent_s[i * TQ + p // R]
                        T.ptx_cp_async(T.access_ptr(l_r[u, p], "w", 1),
                                       T.access_ptr(Lse2[b, t0 + T.max(src[0], 0) // topk, g * R + p % R], "r", 1),
                                       1, src[0] >= 0)
                    elif rows < 128 and p < rows + TQ:  # the student LSEs: the threads after the rows'
                        src[0] = ent_s[i * TQ + p - rows]
                        T.ptx_cp_async(T.access_ptr(ls_r[u, p - rows], "w", 1),
                                       T.access_ptr(LseS2[b, t0 + T.max(src[0], 0) // topk, g], "r", 1),
                                       1, src[0] >= 0)
                    if rows == 128 and p < TQ:  # every thread has a row: the first TQ load a student LSE too
                        src[0] = ent_s[i * TQ + p]
                        T.ptx_cp_async(T.access_ptr(ls_r[u, p], "w", 1),
                                       T.access_ptr(LseS2[b, t0 + T.max(src[0], 0) // topk, g], "r", 1),
                                       1, src[0] >= 0)
                    T.cp_async_barrier_noinc(full[u])
            elif tx < 128:
                T.set_max_nreg(224, 1)
                T.barrier_wait(kv_ready[0], 0)
                consumer(0, tx, n_tiles, K_s, Kidx_s, Q_r, Qi_r, l_r, ls_r, avg_s, dSp_s, xs, full, empty, ent_s,
                         qcol_s, blk, positions_from(q0), q0, b, g, s_t0, sp_t0, p_cast0, t_t0, dsp0, dsp_cast0,
                         xterm0, dkidx0, dqidx0, first, acc, KLpart, dQidx, dKidx, Weight)
            elif NC == 2:
                T.set_max_nreg(224, 1)
                T.barrier_wait(kv_ready[0], 0)
                consumer(1, tx - 128, n_tiles, K_s, Kidx_s, Q_r, Qi_r, l_r, ls_r, avg_s, dSp_s, xs, full, empty,
                         ent_s, qcol_s, blk, positions_from(q0), q0, b, g, s_t1, sp_t1, p_cast1, t_t1, dsp1,
                         dsp_cast1, xterm1, dkidx1, dqidx1, first, acc, KLpart, dQidx, dKidx, Weight)


    if query_offset:
        @T.prim_func
        def kl_alignment_fused_offset(
            Q: T.Tensor((batch, queries, heads, head_dim), dtype),
            K: T.Tensor((batch, seq, groups, head_dim), dtype),
            Qidx: T.Tensor((batch, queries, groups, index_dim), dtype),
            Kidx: T.Tensor((batch, seq, index_dim), dtype),
            Lse2: T.Tensor((batch, queries, heads), "float32"),
            LseS2: T.Tensor((batch, queries, groups), "float32"),
            Items: T.Tensor((n_bg, n_items, 3), "int32"),
            ItemCount: T.Tensor((n_bg,), "int32"),
            Entries: T.Tensor((n_bg, cap), "int32"),
            KLpart: T.Tensor((batch, queries, groups, topk), "float32"),
            dQidx: T.Tensor((batch, queries, groups, index_dim), "float32"),
            dKidx: T.Tensor((batch, seq, index_dim), "float32"),
            Weight: T.Tensor((1,), "float32"),
            q0: T.int32,
        ):
            kl_items(Q, K, Qidx, Kidx, Lse2, LseS2, Items, ItemCount, Entries, KLpart, dQidx, dKidx, Weight, q0)

        return kl_alignment_fused_offset

    @T.prim_func
    def kl_alignment_fused(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        Qidx: T.Tensor((batch, seq, groups, index_dim), dtype),
        Kidx: T.Tensor((batch, seq, index_dim), dtype),
        Lse2: T.Tensor((batch, seq, heads), "float32"),
        LseS2: T.Tensor((batch, seq, groups), "float32"),
        Items: T.Tensor((n_bg, n_items, 3), "int32"),
        ItemCount: T.Tensor((n_bg,), "int32"),
        Entries: T.Tensor((n_bg, cap), "int32"),
        KLpart: T.Tensor((batch, seq, groups, topk), "float32"),
        dQidx: T.Tensor((batch, seq, groups, index_dim), "float32"),
        dKidx: T.Tensor((batch, seq, index_dim), "float32"),
        Weight: T.Tensor((1,), "float32"),
    ):
        kl_items(Q, K, Qidx, Kidx, Lse2, LseS2, Items, ItemCount, Entries, KLpart, dQidx, dKidx, Weight, None)

    return kl_alignment_fused


kl_fused_program.pass_configs = {"tl.disable_warp_specialized": True, "tl.disable_thread_storage_sync": True,
                                 "tl.enable_fast_math": True}


# Bound on the partial outputs of the warmup's teacher-lse pass: they grow with topk = ceil(N / Bk).
WARMUP_LSE_WORKSPACE_BYTES = 2 ** 30


def causal_selection(batch: int, seq: int, groups: int, block_size: int, device) -> torch.Tensor:
    """Every causally visible block -> indices [B, N, G, ceil(N / Bk)] int32 (block j for j <= t // Bk, else -1).

    The warmup's KL runs over all visible tokens; this selection makes the sparse kernels compute it exactly.
    """
    n_blocks = math.ceil(seq / block_size)
    blocks = torch.arange(n_blocks, device=device, dtype=torch.int32)
    query_block = torch.arange(seq, device=device, dtype=torch.int32) // block_size
    chosen = torch.where(blocks[None, :] <= query_block[:, None], blocks[None, :], -1)
    return chosen[None, :, None, :].expand(batch, seq, groups, n_blocks).contiguous()


def teacher_lse(q, k, indices, block_size: int, scale: float, query_chunk=None, query_start: int = 0) -> torch.Tensor:
    """The main branch's lse [B, N, Hq] float32 over ``indices`` (it does not depend on V: K stands in for it)."""
    from msa_tl.attention.kv_outer import sparse_attention_forward

    return sparse_attention_forward(q, k, k, indices, block_size, scale, query_chunk=query_chunk,
                                    query_start=query_start)[1]


def _prepare(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse, mean_heads=None, query_start=0,
             kl_config=None):
    """The selection (indices None: :func:`causal_selection`), the schedule of every query and the kernels' common
    arguments; the teacher lse is computed here when None."""
    B, N, Hq, D = q.shape
    G, Di = k.shape[2], k_idx.shape[-1]
    if k.shape[1] != query_start + N:
        raise ValueError(f"k / k_idx hold the {query_start + N} keys up to the last query (query_start "
                         f"{query_start} + {N} queries), got {k.shape[1]}")
    warmup = indices is None
    if warmup and query_start:
        raise ValueError("the warmup's KL (indices None) takes queries from position 0 only")
    if warmup:
        indices = causal_selection(B, N, G, block_size, q.device)
    topk = indices.shape[3]
    if lse is None:
        per_query = B * Hq * topk * (D * 2 + 4)
        lse = teacher_lse(q, k, indices, block_size, scale,
                          max(block_size, WARMUP_LSE_WORKSPACE_BYTES // per_query) if warmup else None, query_start)
    schedule = Schedule(B, G, math.ceil(k.shape[1] / block_size), N, topk, KL_ITEM_QUERIES, q.device).build(
        indices, 0, N)
    config = dict(groups=G, heads=Hq, head_dim=D, index_dim=Di, block_size=block_size, topk=topk, scale=scale,
                  index_scale=index_scale, dtype=tl_dtype(q.dtype), **{**KL_DEFAULTS, **(kl_config or {})})
    if query_start:
        config["query_offset"] = True
    if mean_heads is not None and mean_heads != Hq // G:
        config["mean_heads"] = mean_heads
    return indices, config, (schedule.items, schedule.item_count, schedule.entries), lse


def _student_lse(q_idx, k_idx, indices, config, schedule, q0: int):
    """The student LSE [B, N, G] float32 over each row's chosen tokens (the queries from position q0 on)."""
    B, N, G, topk = indices.shape
    parts = torch.full((B, N, G, topk), float("-inf"), device=q_idx.device, dtype=torch.float32)
    kernel = compiled_kernel(student_lse_program, groups=G, index_dim=config["index_dim"],
                             block_size=config["block_size"], topk=topk, index_scale=config["index_scale"],
                             dtype=config["dtype"], **(dict(query_offset=True) if q0 else {}))
    kernel(q_idx, k_idx.reshape(B, q0 + N, -1), *schedule, parts, *((q0,) if q0 else ()))
    return torch.logsumexp(parts, dim=-1)


def _fused(q, k, q_idx, k_idx, indices, config, schedule, lse, lse_student, weight, q0: int):
    """The fused pass over the queries from position q0 on -> (per-row loss [B, N, G] float32, fp32 dq_idx, fp32
    dk_idx [B, q0 + N, Di]) times ``weight``."""
    B, N, G, topk = indices.shape
    # Non-finite index entries zeroed for the GEMMs: a token a row cannot see (after it in its own block) must
    # not reach that row's gradients as 0 * NaN. Rows that see it still get NaN, through the student LSE,
    # computed from the raw index tensors.
    q_idx, k_idx = (torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in (q_idx, k_idx))
    kl_part = torch.zeros((B, N, G, topk), device=q.device, dtype=torch.float32)
    dq_idx = torch.zeros(q_idx.shape, device=q.device, dtype=torch.float32)
    dk_idx = torch.zeros((B, q0 + N, k_idx.shape[-1]), device=q.device, dtype=torch.float32)
    compiled_kernel(kl_fused_program, **config)(
        q, k, q_idx, k_idx.reshape(B, q0 + N, -1), lse * _LOG2E, lse_student * _LOG2E, *schedule, kl_part, dq_idx,
        dk_idx, weight, *((q0,) if q0 else ()))
    # a row with nothing chosen has no student (lse -inf) and adds 0, as in the reference
    return kl_part.sum(-1) + torch.where(torch.isneginf(lse_student), 0.0, lse_student), dq_idx, dk_idx


def kl_alignment_loss_forward(q, k, q_idx, k_idx, indices, block_size: int, scale: float, index_scale: float,
                              lse=None, *, with_grads: bool = False, mean_heads=None, query_start: int = 0,
                              config=None):
    """KL loss over the chosen tokens on the GPU -> (loss float32 scalar, student lse [B, N, G] float32), and with
    ``with_grads`` also the loss's own gradients (fp32 dq_idx [B, N, G, Di], dk_idx shaped like k_idx), which
    the same pass computes.

    q [B, N, Hq, D], k [B, N, G, D], q_idx [B, N, G, Di], k_idx [B, N, Di], indices [B, N, G, topk] (None: every
    visible token, through :func:`causal_selection`). lse [B, N, Hq] float32: the main branch's lse over the same
    selection, when the caller has it (the layer does); otherwise one main-branch forward computes it.
    ``mean_heads``: the teacher averages each group's first ``mean_heads`` heads only (q padded with zero heads).
    ``query_start``: the query-side tensors (q, q_idx, indices, lse; the student lse and dq_idx) hold the N queries
    from that position on, k / k_idx the query_start + N keys up to the last; the loss is the mean over those N.
    ``config``: :data:`KL_DEFAULTS` knobs of the fused pass.
    """
    B, N, G, _ = q_idx.shape
    indices, config, schedule, lse = _prepare(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse,
                                              mean_heads, query_start, config)
    lse_student = _student_lse(q_idx, k_idx, indices, config, schedule, query_start)
    weight = torch.full((1,), 1.0 / (B * N * G), device=q.device, dtype=torch.float32)
    rows, dq_idx, dk_idx = _fused(q, k, q_idx, k_idx, indices, config, schedule, lse, lse_student, weight,
                                  query_start)
    loss = rows.mean()
    return (loss, lse_student, dq_idx, dk_idx.view(k_idx.shape)) if with_grads else (loss, lse_student)


def kl_alignment_loss_backward(dloss, q, k, q_idx, k_idx, indices, block_size: int, scale: float,
                               index_scale: float, lse=None, lse_student=None, *, mean_heads=None,
                               query_start: int = 0, config=None):
    """Gradients of the KL loss for q_idx and k_idx (their dtypes), scaled by ``dloss``. ``lse`` (teacher) and
    ``lse_student`` (from :func:`kl_alignment_loss_forward`) are recomputed when not given. ``query_start`` and
    ``config`` as there."""
    B, N, G, _ = q_idx.shape
    indices, config, schedule, lse = _prepare(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse,
                                              mean_heads, query_start, config)
    if lse_student is None:
        lse_student = _student_lse(q_idx, k_idx, indices, config, schedule, query_start)
    weight = (torch.as_tensor(dloss, device=q.device, dtype=torch.float32) / (B * N * G)).reshape(1)
    _, dq_idx, dk_idx = _fused(q, k, q_idx, k_idx, indices, config, schedule, lse, lse_student.contiguous(), weight,
                               query_start)
    return dq_idx.to(q_idx.dtype), dk_idx.view(k_idx.shape).to(k_idx.dtype)
