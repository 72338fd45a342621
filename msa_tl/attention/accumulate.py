"""KV-outer sparse attention that adds each block's share into per-query accumulators (TileLang), with no partials.

The partials path (:mod:`msa_tl.attention.kv_outer` + :mod:`msa_tl.attention.combine`) writes a normalised R x D
partial per (query, KV head, chosen block) and reads it back in the combine: at 128K (paper shape) 69 of the
~108 GB it moves, which on the H100 puts its floor (35.8 ms) above issue 12's goal. Here each block's
*unnormalised* P V box is added into one fp32 accumulator per (query, KV head) by TMA bulk reductions
(``cp.reduce.async.bulk ... .add.f32``). A query chunk's accumulators (``chunk * Hq * D * 4`` bytes: 16 MB a KV
head at 2048 queries) stay in the L2 while the chunk's items add into them, so the partial round trip to DRAM is
gone; what is left is Q, K/V and O, and the kernel's own FLOP rate.

Adding blocks needs a reference every block's exponent is taken against, known before the first addition: the
row max over the query's *own* block (the local block every selection forces). Per query chunk, three launches:

1. :func:`accumulate_program` with ``init=True``, a CTA per (query block, KV head): S over the block's own keys
   (causal), the row max m, and for queries that chose their own block l = sum P and P V; Acc, Lacc and Mref
   are *stored* (zeros where the own block was not chosen), so no memset is needed;
2. :func:`accumulate_program` with ``init=False``, a CTA per work item of :mod:`msa_tl.attention.scheduler`
   (a key block and up to ``item_queries`` entries that chose it; own blocks excluded): P = exp2((S - m) scale
   log2 e) with the row's m from Mref, then P V and l *added* into Acc and Lacc;
3. :func:`finalize_program`: O = Acc / Lacc in the input dtype, LSE = m + log Lacc.

A block whose scores exceed the own block's max by more than ``MAX_EXP2 / log2 e`` (44 nats) could overflow the
fp32 sums; its row's block sum then exceeds ``2 ** MAX_EXP2`` and the kernel flags the (query, KV head), which
:func:`accumulate_forward` recomputes exactly on the partials path. A row whose only blocks lie far *below* its
own block's max (possible only with user indices that leave the own block out) loses them to underflow; the
finalize flags a row whose chosen blocks left ``Lacc < 2 ** -MAX_EXP2`` for the same recompute.

Off by default (``sparse_attention_forward(..., accumulate=True)``): on the H100 the L2 adds fp32 at ~3 TB/s but
not alongside the kernel's own L2 reads (Q gathers, K/V), so at 128K the reductions cost ~25 ms on top of the
pipeline's ~19 and the path is slower than the partials (NOTES.md, session 23).
"""

import math

import tilelang.language as T
import torch

from msa_tl.attention.scheduler import Schedule, tma_loads_macros, work_item
from msa_tl.tl_compile import compiled_kernel, tl_dtype

# 4096-query chunks measured fastest on the H100 (NOTES.md, session 23); their accumulators take 32 MB a KV head
ACCUMULATE_DEFAULTS = dict(query_chunk=4096, item_queries=256, stages=2)
CONSUMER_ROWS = 64  # one wgmma M tile per consumer warpgroup
MAX_EXP2 = 64  # a row's block sum above 2 ** MAX_EXP2 is recomputed exactly (fp32 sums stay far from overflow)
O_PAD = 4  # fp32 columns of padding per O row in shared memory: rows 16 bytes apart in the banks
TMA_MIN_HEADS = 8  # a query's R x 64 box of Q is one TMA gather: fewer rows than a swizzle atom do not fit
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def accumulate_shared_bytes(head_dim: int, block_size: int, item_queries: int, stages: int) -> int:
    """Shared memory of :func:`accumulate_program` (16-bit inputs): K/V, two consumers' Q rings, their fp32 O
    tiles and row sums, the item's entries, barriers."""
    rows = CONSUMER_ROWS
    return ((2 * block_size + 2 * stages * rows) * head_dim * 2 + 2 * rows * (head_dim + O_PAD) * 4 + 2 * rows * 4
            + 4 * max(item_queries, block_size) + 1024)


def accumulate_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float,
                       item_queries: int = 256, stages: int = 2, init: bool = False, dtype: str = "bfloat16",
                       send: str = "reduce"):
    """One launch of a query chunk's forward into its accumulators (R = Hq / G, a chunk of C queries).

    Q [B, N, Hq, D], K/V [B, N, G, D]; Acc [B, C*G, R, D] fp32, Lacc and Mref [B, C*G, R] fp32, accumulator row
    ``(t - t0) * G + g`` for query t, KV head g.

    ``init=True``: OwnChosen [B, N, G] int32 (1 where the query chose its own block), t0, t1 (the chunk's queries
    t0 <= t < t1); a CTA per (query block, batch x KV head) stores each query's own-block max
    (raw scores) into Mref and its l and unnormalised P V into Lacc / Acc (zeros where the own block was not chosen).

    ``init=False``: Items [B*G, n_items, 3], ItemCount [B*G], Entries [B*G, cap] (the schedule of the chunk's
    other blocks), Flags [B, N, G] int32, t0; a CTA per work item adds each entry's l and P V, taken against Mref,
    into Lacc / Acc, and sets Flags where a row's block sum exceeds ``2 ** MAX_EXP2``.

    Roles (384 threads): producer warp 0 loads K/V and gathers each query's R x D box of Q into the consumers'
    rings by TMA; producer warp 1 sends each finished O row and each query's row sums with one bulk copy
    (``init``) or bulk reduction (``cp.reduce.async.bulk``) apiece, waiting only once a tile, so the consumers
    never wait for them; two consumer warpgroups take
    alternate 64-row tiles and turns issuing their MMAs (one's softmax under the other's GEMMs). There is no
    row max to reduce and no normalisation on the consumers' path: only the exponent, the row sum and P V.

    ``send`` (ablations for timing only, wrong outputs): "store" sends the blocks launch's rows as bulk stores
    instead of reductions, "none" sends nothing (the sender only releases the O tiles).
    """
    batch, seq, n_bg, n_items, cap, n_acc = T.dynamic("batch, seq, n_bg, n_items, cap, n_acc")
    R = heads // groups
    why = _layout_unsupported(R, head_dim)
    if why:
        raise ValueError(f"accumulate: {why}")
    if stages not in (1, 2):
        raise ValueError(f"accumulate: stages must be 1 or 2, got {stages}")
    rows, D, Bk = CONSUMER_ROWS, head_dim, block_size
    TQ = rows // R  # queries per consumer tile
    load_block, gather_tile = tma_loads_macros(R, D, Bk, TQ, topk)
    n_entries = Bk if init else math.ceil(item_queries / TQ) * TQ
    threads = 384
    neg_inf = -T.infinity("float32")
    scale_log2 = scale * _LOG2E
    overflow = float(2.0 ** MAX_EXP2)
    producer_regs, consumer_regs = 56, 224

    @T.macro
    def issue_scores(j, c, ring, full, K_s, ent_s, t0, acc_s, qpos, mrow, Mref, b, g):
        """Wait for the consumer's tile j of the item and start S = Q_tile K^T; with init off, load its rows' m."""
        T.barrier_wait(full[2 * (j // 2 % stages) + c], (j // 2 // stages) & 1)
        for r in T.Parallel(rows):  # the row's query position (-1: padding)
            qpos[r] = T.if_then_else(ent_s[j * TQ + r // R] >= 0, t0 + ent_s[j * TQ + r // R] // topk, -1)
        T.wgmma_gemm(ring[2 * (j // 2 % stages) + c, :, :], K_s, acc_s, transpose_B=True, clear_accum=True)
        if not init:
            for r in T.Parallel(rows):  # loaded while S runs
                mrow[r] = T.if_then_else(qpos[r] >= 0, Mref[b, (T.max(qpos[r], t0) - t0) * groups + g, r % R], 0.0)

    @T.macro
    def consumer(c, n_tiles, ring, full, empty, K_s, V_s, ent_s, blk, t0, b, g, acc_s, p, acc_o, mrow, l, qpos,
                 keep, dst, O_s, l_s, dst_s, o_full, o_free, OwnChosen, Mref, Lacc, Flags):
        """Consumer c's tiles c, c + 2, ... of the item; the scores of its next tile run during this one's sends."""
        n_mine = (n_tiles + 1 - c) // 2
        n_other = (n_tiles + c) // 2
        if c == 1:
            if n_other > 0:
                T.named_barrier_arrive(3, 256)  # consumer 0 goes first
        if n_mine > 0:
            issue_scores(c, c, ring, full, K_s, ent_s, t0, acc_s, qpos, mrow, Mref, b, g)
        for i in T.serial(n_mine):
            j = 2 * i + c  # the tile's number in the item
            T.wait_wgmma(0)  # S of tile j  [rows, Bk]
            T.barrier_arrive(empty[2 * (j // 2 % stages) + c])  # the producer may refill its ring slot
            if init:
                for r, col in T.Parallel(rows, Bk):  # every tile lies in its queries' own block
                    acc_s[r, col] = T.if_then_else(blk * Bk + col <= qpos[r], acc_s[r, col], neg_inf)
                T.reduce_max(acc_s, mrow, dim=1)
                for r in T.Parallel(rows):  # 1 where the query chose its own block
                    keep[r] = T.if_then_else(qpos[r] >= 0, OwnChosen[b, T.max(qpos[r], 0), g], 0)
                for r, col in T.Parallel(rows, Bk):  # one FFMA and one exp2 per score (0, not 0 x NaN, if unchosen)
                    acc_s[r, col] = T.if_then_else(keep[r] > 0, T.exp2(acc_s[r, col] * scale_log2 - mrow[r] * scale_log2),
                                                   0.0)
            else:
                for r, col in T.Parallel(rows, Bk):
                    acc_s[r, col] = T.exp2(acc_s[r, col] * scale_log2 - mrow[r] * scale_log2)
            T.reduce_sum(acc_s, l, dim=1)
            T.copy(acc_s, p)
            for r in T.Parallel(rows):  # the row's accumulator row (-1: padding), before qpos moves on to tile j + 2
                dst[r] = T.if_then_else(qpos[r] >= 0, (T.max(qpos[r], t0) - t0) * groups + g, -1)
            T.sync_threads(3 + c, 256)  # this consumer's turn: the other has issued its GEMMs
            T.wgmma_gemm(p, V_s, acc_o, clear_accum=True)  # [rows, D]
            if i + 1 < n_mine:
                issue_scores(j + 2, c, ring, full, K_s, ent_s, t0, acc_s, qpos, mrow, Mref, b, g)
                if i + c < n_other:
                    T.named_barrier_arrive(4 - c, 256)
                T.wait_wgmma(1)  # P V of tile j done; S of tile j + 2 still running
            else:
                if i + c < n_other:
                    T.named_barrier_arrive(4 - c, 256)
                T.wait_wgmma(0)
            T.barrier_wait(o_free[c], (i & 1) ^ 1)  # the sender has read this consumer's previous tile
            for r, d in T.Parallel(rows, D):  # [rows, D + 4]: padded rows, so a warp's stores hit distinct banks
                O_s[c, r, d] = acc_o[r, d]
            for r in T.Parallel(rows):
                l_s[c, r] = l[r]
                dst_s[c, r // R] = dst[r]
                if init:
                    if dst[r] >= 0:
                        Mref[b, dst[r], r % R] = mrow[r]
                else:
                    if dst[r] >= 0:
                        if l[r] > overflow:  # exponents too far above the own block's max: recompute the row
                            Flags[b, t0 + dst[r] // groups, g] = 1
            T.fence_proxy_async()  # the generic-proxy writes of O_s / l_s, before the TMA unit reads them
            T.barrier_arrive(o_full[c])

    @T.macro
    def sender(lane0, n_tiles, O_s, l_s, dst_s, o_full, o_free, Acc, Lacc, b):
        """Producer warp 1: each finished tile's rows into the accumulators (stores with init, else reductions), in
        the consumers' order, a bulk group a tile; a tile's O is released once the TMA unit has read it, checked
        after the next tile's group is issued, so the TMA unit always has a tile's sends queued."""
        for j in T.serial(n_tiles):
            c = j % 2
            T.barrier_wait(o_full[c], (j // 2) & 1)
            if send != "none":
                if lane0:  # a bulk copy (init) or reduction per row of O and per query's row sums: one bulk group
                    for q in T.serial(TQ):
                        row = dst_s[c, q]
                        if row >= 0:
                            for h in T.unroll(R):
                                if init or send == "store":
                                    T.call_extern("handle", "tl::tma_store", T.address_of(Acc[b, row, h, 0]),
                                                  T.address_of(O_s[c, q * R + h, 0]), D * 4)
                                else:
                                    T.call_extern("handle", "tl::tma_store_add", T.address_of(O_s[c, q * R + h, 0]),
                                                  T.address_of(Acc[b, row, h, 0]), D * 4)
                            if init or send == "store":
                                T.call_extern("handle", "tl::tma_store", T.address_of(Lacc[b, row, 0]),
                                              T.address_of(l_s[c, q * R]), R * 4)
                            else:
                                T.call_extern("handle", "tl::tma_store_add", T.address_of(l_s[c, q * R]),
                                              T.address_of(Lacc[b, row, 0]), R * 4)
                    T.tma_store_arrive()
                    T.tma_store_wait(1)  # tile j - 1's rows have been read (tile j's may still be in flight)
            if j > 0:
                T.barrier_arrive(o_free[1 - c])  # the other consumer may write its next tile
        if send != "none":
            if lane0:
                T.tma_store_wait(0)
        if n_tiles > 0:
            T.barrier_arrive(o_free[(n_tiles - 1) % 2])

    @T.macro
    def body(Q, K, V, ent_s, blk, b, g, n_tiles, t0, Acc, Lacc, Mref, Flags, OwnChosen, ring, K_s, V_s, O_s, l_s,
             dst_s, kv_ready, full, empty, o_full, o_free, src):
        acc_s0, acc_s1 = T.alloc_fragment((rows, Bk), "float32"), T.alloc_fragment((rows, Bk), "float32")
        p0, p1 = T.alloc_fragment((rows, Bk), dtype), T.alloc_fragment((rows, Bk), dtype)
        acc_o0, acc_o1 = T.alloc_fragment((rows, D), "float32"), T.alloc_fragment((rows, D), "float32")
        m0, m1 = T.alloc_fragment((rows,), "float32"), T.alloc_fragment((rows,), "float32")
        l0, l1 = T.alloc_fragment((rows,), "float32"), T.alloc_fragment((rows,), "float32")
        qpos0, qpos1 = T.alloc_fragment((rows,), "int32"), T.alloc_fragment((rows,), "int32")
        keep0, keep1 = T.alloc_fragment((rows,), "int32"), T.alloc_fragment((rows,), "int32")
        dst0, dst1 = T.alloc_fragment((rows,), "int32"), T.alloc_fragment((rows,), "int32")
        n_rounds = T.ceildiv(n_tiles, 2 * stages)
        tx = T.get_thread_binding()
        if tx >= 256:  # producer warpgroup
            T.set_max_nreg(producer_regs, 0)
            if tx < 256 + 32:  # warp 0: K/V, then the ring (each TMA copy elects one lane)
                if n_tiles > 0:  # CTAs past the item count load nothing
                    load_block(K, V, b, blk, g, K_s, V_s, None, kv_ready, 0)
                    T.barrier_arrive(kv_ready[0])
                for rnd in T.serial(n_rounds):
                    for u in T.serial(2 * stages):
                        if rnd * 2 * stages + u < n_tiles:
                            T.barrier_wait(empty[u], (rnd & 1) ^ 1)
                            gather_tile(ring, u, full, ent_s, (rnd * 2 * stages + u) * TQ, Q, b, g, t0, src)
            elif tx < 256 + 64:  # warp 1: the sends
                sender(tx == 256 + 32, n_tiles, O_s, l_s, dst_s, o_full, o_free, Acc, Lacc, b)
        elif tx < 128:
            T.set_max_nreg(consumer_regs, 1)
            if n_tiles > 0:
                T.barrier_wait(kv_ready[0], 0)
            consumer(0, n_tiles, ring, full, empty, K_s, V_s, ent_s, blk, t0, b, g, acc_s0, p0, acc_o0, m0, l0,
                     qpos0, keep0, dst0, O_s, l_s, dst_s, o_full, o_free, OwnChosen, Mref, Lacc, Flags)
        else:
            T.set_max_nreg(consumer_regs, 1)
            if n_tiles > 0:
                T.barrier_wait(kv_ready[0], 0)
            consumer(1, n_tiles, ring, full, empty, K_s, V_s, ent_s, blk, t0, b, g, acc_s1, p1, acc_o1, m1, l1,
                     qpos1, keep1, dst1, O_s, l_s, dst_s, o_full, o_free, OwnChosen, Mref, Lacc, Flags)

    def cta_buffers():
        """A CTA's shared memory and barriers: K/V, the consumers' Q rings (slot 2 s + c: consumer c's), their O
        tiles [rows, D + O_PAD] fp32 (padded rows: a warp's stores from the wgmma fragment hit distinct banks),
        row sums and each query's accumulator row (-1: padding), the item's entries; the producer's entry."""
        return (T.alloc_shared((Bk, D), dtype), T.alloc_shared((Bk, D), dtype),
                T.alloc_shared((2 * stages, rows, D), dtype), T.alloc_shared((2, rows, D + O_PAD), "float32"),
                T.alloc_shared((2, rows), "float32"), T.alloc_shared((2, TQ), "int32"),
                T.alloc_shared((n_entries,), "int32"), T.alloc_barrier(32), T.alloc_barrier([32] * (2 * stages)),
                T.alloc_barrier([128] * (2 * stages)), T.alloc_barrier([128, 128]), T.alloc_barrier([32, 32]),
                T.alloc_local((1,), "int32"))

    if init:
        @T.prim_func
        def accumulate_local(
            Q: T.Tensor((batch, seq, heads, head_dim), dtype),
            K: T.Tensor((batch, seq, groups, head_dim), dtype),
            V: T.Tensor((batch, seq, groups, head_dim), dtype),
            OwnChosen: T.Tensor((batch, seq, groups), "int32"),
            Acc: T.Tensor((batch, n_acc, R, head_dim), "float32"),
            Lacc: T.Tensor((batch, n_acc, R), "float32"),
            Mref: T.Tensor((batch, n_acc, R), "float32"),
            t0: T.int32,
            t1: T.int32,
        ):
            # the chunk's query blocks: n_acc / G queries from t0, which need not start a block
            with T.Kernel(T.ceildiv(n_acc // groups, Bk) + 1, batch * groups, threads=threads) as (item, bg):
                K_s, V_s, ring, O_s, l_s, dst_s, ent_s, kv_ready, full, empty, o_full, o_free, src = cta_buffers()
                b = bg // groups
                g = bg % groups
                blk = t0 // Bk + item
                first = T.max(blk * Bk, t0)
                n_q = T.max(T.min(blk * Bk + Bk, t1) - first, 0)
                for i in T.Parallel(n_entries):  # entry (t - t0) * topk: the producer's and consumers' form
                    ent_s[i] = T.if_then_else(i < n_q, (first + i - t0) * topk, -1)
                T.sync_threads()
                body(Q, K, V, ent_s, blk, b, g, T.ceildiv(n_q, TQ), t0, Acc, Lacc, Mref, None, OwnChosen, ring,
                     K_s, V_s, O_s, l_s, dst_s, kv_ready, full, empty, o_full, o_free, src)

        return accumulate_local

    @T.prim_func
    def accumulate_blocks(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        V: T.Tensor((batch, seq, groups, head_dim), dtype),
        Items: T.Tensor((n_bg, n_items, 3), "int32"),
        ItemCount: T.Tensor((n_bg,), "int32"),
        Entries: T.Tensor((n_bg, cap), "int32"),
        Acc: T.Tensor((batch, n_acc, R, head_dim), "float32"),
        Lacc: T.Tensor((batch, n_acc, R), "float32"),
        Mref: T.Tensor((batch, n_acc, R), "float32"),
        Flags: T.Tensor((batch, seq, groups), "int32"),
        t0: T.int32,
    ):
        with T.Kernel(n_items, n_bg, threads=threads) as (item, bg):
            K_s, V_s, ring, O_s, l_s, dst_s, ent_s, kv_ready, full, empty, o_full, o_free, src = cta_buffers()
            b = bg // groups
            g = bg % groups
            blk, start, length = work_item(Items, ItemCount, bg, item)
            for i in T.Parallel(n_entries):
                ent_s[i] = T.if_then_else(i < length, Entries[bg, start + i], -1)
            T.sync_threads()
            body(Q, K, V, ent_s, blk, b, g, T.ceildiv(length, TQ), t0, Acc, Lacc, Mref, Flags, None, ring, K_s,
                 V_s, O_s, l_s, dst_s, kv_ready, full, empty, o_full, o_free, src)

    return accumulate_blocks


# Roles and barriers are written by hand: TileLang's warp specialisation and its automatic shared-memory syncs
# (which would put barriers between the producer's gathers, on ids the consumers' turns use) stay off; fast math
# makes each exp2 one ex2.approx.
accumulate_program.pass_configs = {"tl.disable_warp_specialized": True, "tl.disable_thread_storage_sync": True,
                                   "tl.enable_fast_math": True}


def finalize_program(heads: int, head_dim: int, groups: int, pairs: int = 4, dtype: str = "bfloat16",
                     scale: float = 1.0):
    """Acc [B, C*G, R, D], Lacc, Mref [B, C*G, R] -> O [B, N, Hq, D] (``dtype``), LSE [B, N, Hq] fp32 for the
    chunk's queries t0 <= t < t1; Flags [B, N, G] set where a row's chosen blocks left Lacc below
    ``2 ** -MAX_EXP2`` (underflow against its own block's max). A row with no chosen block (Lacc = 0 and none
    chosen) gets o = 0, lse = -inf; a NaN sum makes o and lse NaN. ``pairs`` (query, KV head) pairs a CTA."""
    batch, seq, n_acc = T.dynamic("batch, seq, n_acc")
    R = heads // groups
    scale_log2 = scale * _LOG2E
    underflow = float(2.0 ** -MAX_EXP2)

    @T.prim_func
    def accumulate_finalize(
        Acc: T.Tensor((batch, n_acc, R, head_dim), "float32"),
        Lacc: T.Tensor((batch, n_acc, R), "float32"),
        Mref: T.Tensor((batch, n_acc, R), "float32"),
        Chosen: T.Tensor((batch, seq, groups), "int32"),
        O: T.Tensor((batch, seq, heads, head_dim), dtype),
        LSE: T.Tensor((batch, seq, heads), "float32"),
        Flags: T.Tensor((batch, seq, groups), "int32"),
        t0: T.int32,
        t1: T.int32,
    ):
        with T.Kernel(T.ceildiv(n_acc, pairs), batch, threads=128) as (bx, b):
            for pr, r in T.Parallel(pairs, R):  # [pairs, R]
                row = bx * pairs + pr
                t = t0 + row // groups
                if t < t1:
                    lv = Lacc[b, row, r]
                    LSE[b, t, row % groups * R + r] = T.if_then_else(
                        lv == 0.0, -T.infinity("float32"), (Mref[b, row, r] * scale_log2 + T.log2(lv)) * _LN2)
                    if Chosen[b, t, row % groups] > 0:
                        if lv < underflow:
                            Flags[b, t, row % groups] = 1
            for pr, r, d in T.Parallel(pairs, R, head_dim):  # [pairs, R, D]
                row = bx * pairs + pr
                t = t0 + row // groups
                if t < t1:
                    lv = Lacc[b, row, r]
                    O[b, t, row % groups * R + r, d] = T.if_then_else(lv == 0.0, 0.0, Acc[b, row, r, d] / lv)

    return accumulate_finalize


def _layout_unsupported(heads_per_group: int, head_dim: int) -> "str | None":
    """Why :func:`accumulate_program` cannot be built for this GQA ratio and head dim (None where it can)."""
    if heads_per_group < TMA_MIN_HEADS or CONSUMER_ROWS % heads_per_group:
        return f"{TMA_MIN_HEADS}-64 query heads per KV head dividing 64, got {heads_per_group}"
    if head_dim not in (64, 128):
        return f"head dims 64 or 128, got {head_dim}"
    return None


def accumulate_unsupported(heads_per_group: int, head_dim: int, dtype, query_start: int = 0) -> "str | None":
    """Why :func:`accumulate_forward` cannot run this layout (None where it can)."""
    why = _layout_unsupported(heads_per_group, head_dim)
    if why:
        return why
    if dtype not in (torch.bfloat16, torch.float16):
        return f"bf16 / fp16 inputs, got {dtype}"
    if query_start:
        return "queries from position 0 (no query offset)"
    return None


def split_own_block(indices: torch.Tensor, block_size: int) -> tuple:
    """indices [B, N, G, topk] -> (the same with each query's own block t // block_size replaced by -1: what the
    accumulate launch schedules; own_chosen [B, N, G] int32, 1 where the query chose its own block: what the local
    launch attends)."""
    N = indices.shape[1]
    own = torch.div(torch.arange(N, device=indices.device, dtype=torch.int32), block_size,
                    rounding_mode="floor").view(1, N, 1, 1)
    is_own = indices == own
    return torch.where(is_own, -1, indices).contiguous(), is_own.any(dim=3).int()


def accumulate_forward(q, k, v, indices, block_size: int, scale: float, o, lse, *, query_chunk: int,
                       item_queries: int, stages: int = ACCUMULATE_DEFAULTS["stages"]) -> torch.Tensor:
    """The main-branch forward by accumulation (module docstring) into o [B, N, Hq, D] and lse [B, N, Hq].

    q [B, N, Hq, D], k/v [B, N, G, D] (bf16/fp16), indices [B, N, G, topk] int32 (no id twice in a row, none in
    a query's future: :func:`msa_tl.ops.validation.canonical_indices` gives that form). Returns
    Flags [B, N, G] int32: 1 where the (query, KV head)'s exponents left the fp32 range this path keeps exact
    (:data:`MAX_EXP2`); those rows of o / lse must be recomputed (the caller does, on the partials path).
    Workspace: ``B * chunk * Hq * (D + 2) * 4`` bytes of accumulators (16 MB a KV head at 2048 queries, paper
    shape) plus the schedule of every chunk (~``4 * B * N * G * topk`` bytes), built in one go.
    """
    B, N, Hq, D = q.shape
    G, topk = k.shape[2], indices.shape[3]
    R = Hq // G
    chunk = min(N, query_chunk)
    chunks = math.ceil(N / chunk)
    dt = tl_dtype(q.dtype)
    args = dict(groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk, scale=scale, stages=stages,
                dtype=dt)
    local = compiled_kernel(accumulate_program, **args, init=True)
    blocks = compiled_kernel(accumulate_program, **args, item_queries=item_queries)
    finalize = compiled_kernel(finalize_program, heads=Hq, head_dim=D, groups=G, dtype=dt, scale=scale)
    schedule = Schedule(B, G, math.ceil(N / block_size), chunk, topk, item_queries, q.device, chunks=chunks)
    others, own_chosen = split_own_block(indices, block_size)
    schedule.build(others, 0, N)
    acc = torch.empty(B, chunk * G, R, D, device=q.device, dtype=torch.float32)
    lacc = torch.empty(B, chunk * G, R, device=q.device, dtype=torch.float32)
    mref = torch.empty(B, chunk * G, R, device=q.device, dtype=torch.float32)
    flags = torch.zeros(B, N, G, device=q.device, dtype=torch.int32)
    chosen = (indices >= 0).any(dim=3).int()  # [B, N, G]: rows with a block, whose sums may not vanish
    for c, t0 in enumerate(range(0, N, chunk)):
        t1 = min(N, t0 + chunk)
        local(q, k, v, own_chosen, acc, lacc, mref, t0, t1)
        items, item_count, entries = schedule.part(c)
        blocks(q, k, v, items, item_count, entries, acc, lacc, mref, flags, t0)
        finalize(acc, lacc, mref, chosen, o, lse, flags, t0, t1)
    return flags
