"""Query tiles that share their selection (TileLang): attended Q-outer, with no partials.

A tile is ``128 / R`` consecutive queries (R = Hq / G heads each: 128 rows, two warpgroups' wgmma M tiles;
64 rows where a key block holds fewer) of one key block and one KV group. Where all its queries chose the
same blocks in the same slot order (a torch compare of their index rows, no host sync),
:func:`tile_attention_program` attends them as a flash-attention tile: Q [rows, D] against each chosen
block's K/V [Bk, D] (software-pipelined loads, mostly L2 hits since neighbouring tiles choose alike),
online softmax, causal inside the tile's own block, and writes O and LSE final;
:func:`tile_attention_roles_program` (the default for 128-row tiles) does the same as FlashAttention-3 orders a
forward: a producer warpgroup and two consumers taking turns, each block's softmax under the MMAs. The KV-outer
path never sees those rows (their index rows are -1 in the copy it schedules), so the tile's (query, slot) pairs
cost no partial writes and reads: Q once and O once instead of k partials.
"""

import tilelang.language as T
import torch

from msa_tl.tl_compile import SMEM_LIMIT, compiled_kernel, sm_count, tl_dtype
from msa_tl.tuning.cache import tuned_config

TILE_DEFAULTS = dict(num_stages=2)
# The hand-pipelined tile kernel's knobs: the K and V rings' depth (3 stages fit with Q: 224 KB), whether the
# consumers take turns issuing their MMAs, and persistent CTAs (the next tile's Q and K/V loaded during this one;
# 2 stages with two Q buffers: 192 KB; off: slower than one CTA a tile, NOTES.md).
ROLES_DEFAULTS = dict(stages=2, pingpong=True, persistent=False)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def tile_rows(heads_per_group: int, block_size: int) -> int:
    """Rows of a tile: 128 (two warpgroups), or 64 where 128 rows would span two key blocks."""
    return 128 if heads_per_group * block_size >= 128 else 64


def tile_queries(heads_per_group: int, block_size: int) -> int:
    """Queries in one tile."""
    return tile_rows(heads_per_group, block_size) // heads_per_group


def sharing_tiles(indices: torch.Tensor, heads_per_group: int, block_size: int) -> torch.Tensor:
    """indices [B, N, G, topk] -> shared [B, N // TQ, G] int32: 1 where the tile's TQ queries have equal index
    rows (the ragged tail tile never counts)."""
    B, N, G, topk = indices.shape
    TQ = tile_queries(heads_per_group, block_size)
    rows = indices[:, : N // TQ * TQ].view(B, N // TQ, TQ, G, topk)
    return (rows == rows[:, :, :1]).all(dim=4).all(dim=2).int().contiguous()


def shared_rows(shared: torch.Tensor, seq: int, heads_per_group: int, block_size: int) -> torch.Tensor:
    """shared [B, N // TQ, G] (:func:`sharing_tiles`) -> [B, seq, G] bool: the (query, KV head) rows a shared tile
    owns."""
    B, _, G = shared.shape
    TQ = tile_queries(heads_per_group, block_size)
    mask = torch.zeros((B, seq, G), dtype=torch.bool, device=shared.device)
    mask[:, : shared.shape[1] * TQ] = shared.bool().repeat_interleave(TQ, dim=1)
    return mask


def without_shared_tiles(indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of indices [B, N, G, topk] with the rows ``rows`` [B, N, G] (:func:`shared_rows`) marks set to -1:
    what the KV-outer path is left with."""
    return torch.where(rows[..., None], -1, indices).contiguous()


def position(row, q0):
    """Inside a kernel: the query position of a query-side row (q0: the position of the tensors' first row, None
    where they start at the sequence's first query)."""
    return row if q0 is None else row + q0


def _online_softmax(rows: int, cols: int, head_dim: int):
    """Macro ``step(acc_s, acc_o, row_max, prev_max, rescale, block_sum, row_sum)``: fold one block's masked,
    log2-scaled scores [rows, cols] into the running max and sum, rescale O [rows, D], leave P in acc_s."""
    neg_inf = -T.infinity("float32")

    @T.macro
    def step(acc_s, acc_o, row_max, prev_max, rescale, block_sum, row_sum):
        T.copy(row_max, prev_max)
        T.reduce_max(acc_s, row_max, dim=1, clear=False)
        for i in T.Parallel(rows):  # no key yet (-inf): keep the rescale finite
            rescale[i] = T.if_then_else(row_max[i] == neg_inf, 1.0, T.exp2(prev_max[i] - row_max[i]))
        for i, c in T.Parallel(rows, cols):  # a row with no finite score yet: exp2 of the score itself, so a masked
            # key (-inf) gives 0 and a NaN (a NaN query's whole row) passes
            acc_s[i, c] = T.exp2(acc_s[i, c] - T.if_then_else(row_max[i] == neg_inf, 0.0, row_max[i]))
        T.reduce_sum(acc_s, block_sum, dim=1)
        for i in T.Parallel(rows):
            row_sum[i] = row_sum[i] * rescale[i] + block_sum[i]
        for i, d in T.Parallel(rows, head_dim):
            acc_o[i, d] *= rescale[i]

    return step


def tile_attention_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float,
                           num_stages: int = 2, dtype: str = "bfloat16", query_offset: bool = False):
    """Q [B, N, Hq, D], K/V [B, N, G, D], Indices [B, N, G, topk], Shared [B, N // TQ, G] -> O, LSE of the shared
    tiles' rows (other rows untouched). Each tile attends the blocks of its first query's row. ``query_offset``: Q,
    Indices, O and LSE hold the queries from position q0 (a runtime scalar after LSE, a multiple of Bk) on."""
    batch, seq, n_tiles = T.dynamic("batch, seq, n_tiles")
    queries = T.dynamic("queries") if query_offset else seq  # the query-side tensors' rows
    R, D, Bk = heads // groups, head_dim, block_size
    rows = tile_rows(R, Bk)
    assert rows % R == 0 and Bk % (rows // R) == 0, "a tile's queries lie in one key block"
    TQ = rows // R
    neg_inf = -T.infinity("float32")
    scale_log2 = scale * _LOG2E
    softmax_step = _online_softmax(rows, Bk, D)

    @T.macro
    def tile_body(Q, K, V, Indices, Shared, O, LSE, q0):
        with T.Kernel(n_tiles, groups, batch, threads=2 * rows) as (tile, g, b):
            Q_s = T.alloc_shared((rows, D), dtype)  # [TQ * R, D]
            K_s = T.alloc_shared((Bk, D), dtype)  # [Bk, D]
            V_s = T.alloc_shared((Bk, D), dtype)
            O_s = T.alloc_shared((rows, D), dtype)
            acc_s = T.alloc_fragment((rows, Bk), "float32")  # [TQ * R, Bk]
            acc_p = T.alloc_fragment((rows, Bk), dtype)
            acc_o = T.alloc_fragment((rows, D), "float32")  # [TQ * R, D]
            row_max = T.alloc_fragment((rows,), "float32")
            prev_max = T.alloc_fragment((rows,), "float32")
            rescale = T.alloc_fragment((rows,), "float32")
            block_sum = T.alloc_fragment((rows,), "float32")
            row_sum = T.alloc_fragment((rows,), "float32")
            first = tile * TQ
            if Shared[b, tile, g] != 0:
                for i, d in T.Parallel(rows, D):
                    Q_s[i, d] = Q[b, first + i // R, g * R + i % R, d]
                T.clear(acc_o)
                T.clear(row_sum)
                T.fill(row_max, neg_inf)
                for s in T.Pipelined(topk, num_stages=num_stages):
                    blk = Indices[b, first, g, s]
                    if blk >= 0:
                        T.copy(K[b, blk * Bk:(blk + 1) * Bk, g, :], K_s)
                        T.copy(V[b, blk * Bk:(blk + 1) * Bk, g, :], V_s)
                        T.gemm(Q_s, K_s, acc_s, transpose_B=True, clear_accum=True,
                               policy=T.GemmWarpPolicy.FullRow)
                        for i, c in T.Parallel(rows, Bk):  # causal: only the tile's own block has later keys
                            acc_s[i, c] = T.if_then_else(blk * Bk + c <= position(first, q0) + i // R,
                                                         acc_s[i, c] * scale_log2, neg_inf)
                        softmax_step(acc_s, acc_o, row_max, prev_max, rescale, block_sum, row_sum)
                        T.copy(acc_s, acc_p)
                        T.gemm(acc_p, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
                for i, d in T.Parallel(rows, D):  # nothing chosen: o = 0, lse = -inf
                    O_s[i, d] = T.if_then_else(row_sum[i] == 0.0, 0.0, acc_o[i, d] / row_sum[i])
                for i, d in T.Parallel(rows, D):
                    O[b, first + i // R, g * R + i % R, d] = O_s[i, d]
                for i in T.Parallel(rows):
                    LSE[b, first + i // R, g * R + i % R] = T.if_then_else(
                        row_sum[i] == 0.0, neg_inf, (row_max[i] + T.log2(row_sum[i])) * _LN2)

    if query_offset:
        @T.prim_func
        def tile_attention_offset(
            Q: T.Tensor((batch, queries, heads, head_dim), dtype),
            K: T.Tensor((batch, seq, groups, head_dim), dtype),
            V: T.Tensor((batch, seq, groups, head_dim), dtype),
            Indices: T.Tensor((batch, queries, groups, topk), "int32"),
            Shared: T.Tensor((batch, n_tiles, groups), "int32"),
            O: T.Tensor((batch, queries, heads, head_dim), dtype),
            LSE: T.Tensor((batch, queries, heads), "float32"),
            q0: T.int32,
        ):
            tile_body(Q, K, V, Indices, Shared, O, LSE, q0)

        return tile_attention_offset

    @T.prim_func
    def tile_attention(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        V: T.Tensor((batch, seq, groups, head_dim), dtype),
        Indices: T.Tensor((batch, seq, groups, topk), "int32"),
        Shared: T.Tensor((batch, n_tiles, groups), "int32"),
        O: T.Tensor((batch, seq, heads, head_dim), dtype),
        LSE: T.Tensor((batch, seq, heads), "float32"),
    ):
        tile_body(Q, K, V, Indices, Shared, O, LSE, None)

    return tile_attention


# TileLang 0.1.15's warp-specialised lowering gave wrong rows for the Q-outer kernel's loop at Bk = 64
# (NOTES.md); this loop is the same, so it is compiled without it.
tile_attention_program.pass_configs = {"tl.disable_warp_specialized": True}


def roles_shared_bytes(head_dim: int, block_size: int, stages: int, persistent: bool) -> int:
    """Shared memory of the hand-pipelined tile kernel (16-bit inputs): 128 Q rows (two buffers when
    persistent), ``stages`` K blocks and as many V blocks, 1 KB for the block lists and the barriers."""
    return (2 if persistent else 1) * 128 * head_dim * 2 + 2 * stages * block_size * head_dim * 2 + 1024


def tile_attention_roles_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float,
                                 stages: int = 2, pingpong: bool = True, persistent: bool = False, ctas: int = 132,
                                 listed: bool = False, dtype: str = "bfloat16", query_offset: bool = False):
    """:func:`tile_attention_program` as FlashAttention-3 runs a forward, roles by hand.

    A producer warpgroup gathers the tile's Q rows and each chosen block's K and V with 16-byte ``cp.async``
    into rings of ``stages`` K and ``stages`` V blocks (separate mbarriers: a K block is free once both
    consumers' S has run, a V block once their P V has). It lists the blocks with the tile's own block first,
    so only the first needs the causal mask. Two consumer warpgroups own 64 rows each and read every block;
    each issues block j's S together with block j - 1's P V and runs j's softmax while that P V is on the
    tensor cores; with ``pingpong`` the two take turns issuing (named barriers 3 and 4), so one's softmax also
    runs under the other's MMAs. ``persistent``: ``ctas`` CTAs take the (tile, group, batch) triples in turn
    (CTA c the c-th, (c + ctas)-th, ...: tiles cost alike), Q and the block list double-buffered and the rings
    running on across tiles, so the producer loads the next tile while the consumers finish this one.
    ``listed`` (not with ``persistent``): a CTA an entry of ``Listed [n_listed]`` int32, the triple
    tile + n_tiles * (group + groups * batch) (:func:`list_shared_tiles`), instead of a CTA every triple: where few
    tiles are shared (random selections) the grid holds only them, not 65536 CTAs at 128K that each take an SM's
    shared memory to start and leave.
    Indices must be canonical (``msa_tl.ops.validation.canonical_indices``: no id twice); ids past the tile's
    own block are skipped. 128-row tiles only. ``query_offset`` as in :func:`tile_attention_program`."""
    batch, seq, n_tiles, n_listed = T.dynamic("batch, seq, n_tiles, n_listed")
    queries = T.dynamic("queries") if query_offset else seq  # the query-side tensors' rows
    R, D, Bk, M = heads // groups, head_dim, block_size, 64  # M rows a consumer
    if tile_rows(R, Bk) != 2 * M:
        raise ValueError(f"the hand-pipelined tile needs 128 rows in a key block (R = {R}, Bk = {Bk})")
    smem = roles_shared_bytes(D, Bk, stages, persistent)
    if smem > SMEM_LIMIT:
        raise ValueError(f"tile kernel: {smem} B of shared memory > {SMEM_LIMIT} B (stages={stages}, "
                         f"persistent={persistent}, head_dim={D}, block_size={Bk})")
    if listed and persistent:
        raise ValueError("listed: a CTA a listed tile, not the persistent CTAs")
    TQ = 2 * M // R
    n_qbuf = 2 if persistent else 1
    neg_inf = -T.infinity("float32")
    scale_log2 = scale * _LOG2E
    pieces = M * D // 8 // 128  # 16-byte cp.async pieces of a consumer's Q rows, per producer thread

    def consumer_fragments():
        """Both consumers' register tiles, pairwise: S [M, Bk] fp32, P [M, Bk], O [M, D] fp32, then the row max,
        previous max, rescale, running sum [M] fp32."""
        shapes = [((M, Bk), "float32"), ((M, Bk), dtype), ((M, D), "float32")] + [((M,), "float32")] * 4
        return [T.alloc_fragment(shape, kind) for shape, kind in shapes for _ in range(2)]

    @T.macro
    def load_tile(Q, K, V, Indices, Q_s0, Q_s1, raw_s, blocks_s, ring_k, ring_v, q_ready, full_k, full_v, empty_k, empty_v,
                  qb, b, g, first, p, n, cnt, q0):
        """Producer thread p: the tile's Q rows into Q buffer qb, its block list (own block first) into
        blocks_s[qb] (count in its last slot; thread 0 writes it, then arrives on q_ready[qb]), then each listed
        block's K and V into the rings, from block n[0] on."""
        for j in T.unroll(pieces):
            row = (j * 128 + p) // (D // 8)  # [M] rows of each consumer: query first + row // R, head row % R
            T.ptx_cp_async(T.access_ptr(Q_s0[qb, row, p % (D // 8) * 8], "w", 8),
                           T.access_ptr(Q[b, first + row // R, g * R + row % R, p % (D // 8) * 8], "r", 8), 8)
            T.ptx_cp_async(T.access_ptr(Q_s1[qb, row, p % (D // 8) * 8], "w", 8),
                           T.access_ptr(Q[b, first + (M + row) // R, g * R + (M + row) % R, p % (D // 8) * 8], "r", 8),
                           8)
        T.cp_async_barrier_noinc(q_ready[qb])
        if p < topk:
            raw_s[p] = Indices[b, first, g, p]
        T.sync_threads(5, 128)
        if p == 0:
            cnt[0] = 0
            for s in T.serial(topk):
                if raw_s[s] == position(first, q0) // Bk:
                    cnt[0] = 1
            if cnt[0] == 1:
                blocks_s[qb, 0] = position(first, q0) // Bk
            for s in T.serial(topk):
                if raw_s[s] >= 0 and raw_s[s] < position(first, q0) // Bk:
                    blocks_s[qb, cnt[0]] = raw_s[s]
                    cnt[0] += 1
            blocks_s[qb, topk] = cnt[0]
            T.barrier_arrive(q_ready[qb])  # release: the block list
        T.sync_threads(5, 128)
        for j in T.serial(blocks_s[qb, topk]):
            blk = blocks_s[qb, j]
            st = n[0] % stages
            T.barrier_wait(empty_k[st], ((n[0] // stages) & 1) ^ 1)
            T.async_copy(K[b, blk * Bk:(blk + 1) * Bk, g, :], ring_k[st, :, :])
            T.cp_async_barrier_noinc(full_k[st])
            T.barrier_wait(empty_v[st], ((n[0] // stages) & 1) ^ 1)
            T.async_copy(V[b, blk * Bk:(blk + 1) * Bk, g, :], ring_v[st, :, :])
            T.cp_async_barrier_noinc(full_v[st])
            n[0] += 1

    @T.macro
    def turn_begins(c):
        """Ping-pong: wait until the other consumer has issued its MMAs of the turn before."""
        if pingpong:
            T.sync_threads(3 + c, 256)

    @T.macro
    def turn_ends(c, last):
        """Ping-pong: the other consumer's turn (consumer 1's last turn of a tile passes none on: consumer 0
        starts the next tile on the arrival consumer 1 makes when it starts that tile)."""
        if pingpong:
            if c == 0 or not last:
                T.named_barrier_arrive(4 - c, 256)

    @T.macro
    def consume(c, Q_c, ring_k, ring_v, full_k, full_v, empty_k, empty_v, nb, own_first, O, LSE, b, g, first,
                acc_s, acc_p, acc_o, m, m_prev, rescale, l, n, q0):
        """Consumer c: the tile's nb blocks from ring position n[0] on (the first masked where it is the tile's
        own block), then O and LSE of its 64 rows."""
        T.clear(acc_o)
        T.clear(l)
        if nb > 0:
            if pingpong and c == 1:
                T.named_barrier_arrive(3, 256)  # consumer 0 goes first
            # turn 0: S of block 0
            turn_begins(c)
            T.barrier_wait(full_k[n[0] % stages], (n[0] // stages) & 1)
            T.wgmma_gemm(Q_c, ring_k[n[0] % stages, :, :], acc_s, transpose_B=True, clear_accum=True)
            turn_ends(c, False)
            T.wait_wgmma(0)
            T.barrier_arrive(empty_k[n[0] % stages])
            if own_first:  # causal: keys after the row's query
                for i, col in T.Parallel(M, Bk):
                    acc_s[i, col] = T.if_then_else((position(first, q0) // Bk) * Bk + col
                                                   <= position(first, q0) + (c * M + i) // R,
                                                   acc_s[i, col], neg_inf)
            T.reduce_max(acc_s, m, dim=1)
            for i, col in T.Parallel(M, Bk):  # one FFMA and one exp2 a score
                acc_s[i, col] = T.exp2(acc_s[i, col] * scale_log2 - m[i] * scale_log2)
            T.reduce_sum(acc_s, l, dim=1)
            T.fill(rescale, 1.0)
            T.copy(acc_s, acc_p)
            # turn j: S of block j with P V of block j - 1; j's softmax while that P V runs
            for j in T.serial(nb - 1):
                turn_begins(c)
                T.barrier_wait(full_k[(n[0] + 1) % stages], ((n[0] + 1) // stages) & 1)
                T.wgmma_gemm(Q_c, ring_k[(n[0] + 1) % stages, :, :], acc_s, transpose_B=True, clear_accum=True)
                for i, d in T.Parallel(M, D):
                    acc_o[i, d] *= rescale[i]
                T.barrier_wait(full_v[n[0] % stages], (n[0] // stages) & 1)
                T.wgmma_gemm(acc_p, ring_v[n[0] % stages, :, :], acc_o)
                turn_ends(c, False)
                T.wait_wgmma(1)  # S [M, Bk]
                T.barrier_arrive(empty_k[(n[0] + 1) % stages])
                T.copy(m, m_prev)
                T.reduce_max(acc_s, m, dim=1, clear=False)
                for i in T.Parallel(M):
                    rescale[i] = T.exp2(m_prev[i] * scale_log2 - m[i] * scale_log2)
                for i, col in T.Parallel(M, Bk):
                    acc_s[i, col] = T.exp2(acc_s[i, col] * scale_log2 - m[i] * scale_log2)
                for i in T.Parallel(M):
                    l[i] *= rescale[i]
                T.reduce_sum(acc_s, l, dim=1, clear=False)
                T.wait_wgmma(0)  # P V of block j - 1 [M, D]
                T.barrier_arrive(empty_v[n[0] % stages])
                T.copy(acc_s, acc_p)
                n[0] += 1
            # last turn: P V of the last block
            turn_begins(c)
            for i, d in T.Parallel(M, D):
                acc_o[i, d] *= rescale[i]
            T.barrier_wait(full_v[n[0] % stages], (n[0] // stages) & 1)
            T.wgmma_gemm(acc_p, ring_v[n[0] % stages, :, :], acc_o)
            turn_ends(c, True)
            T.wait_wgmma(0)
            T.barrier_arrive(empty_v[n[0] % stages])
            n[0] += 1
        for i in T.Parallel(M):  # nothing chosen: o = 0, lse = -inf
            LSE[b, first + (c * M + i) // R, g * R + (c * M + i) % R] = T.if_then_else(
                l[i] == 0.0, neg_inf, (m[i] * scale_log2 + T.log2(l[i])) * _LN2)
            l[i] = T.if_then_else(l[i] == 0.0, 0.0, 1.0 / l[i])
        for i, d in T.Parallel(M, D):
            O[b, first + (c * M + i) // R, g * R + (c * M + i) % R, d] = acc_o[i, d] * l[i]

    @T.macro
    def roles_tile(Q, K, V, Indices, Shared, O, LSE, q0, tile, g, b):
        """The CTA body: the (tile, g, b) triple's tile, where Shared marks it."""
        Q_s0 = T.alloc_shared((1, M, D), dtype)  # [1, M, D] consumer 0's rows
        Q_s1 = T.alloc_shared((1, M, D), dtype)
        ring_k = T.alloc_shared((stages, Bk, D), dtype)  # [stages, Bk, D]
        ring_v = T.alloc_shared((stages, Bk, D), dtype)
        raw_s = T.alloc_shared((topk,), "int32")  # the tile's index row
        blocks_s = T.alloc_shared((1, topk + 1), "int32")  # its blocks, own first; the count last
        (acc_s0, acc_s1, acc_p0, acc_p1, acc_o0, acc_o1, m0, m1, m_prev0, m_prev1, rescale0, rescale1, l0,
         l1) = consumer_fragments()
        n = T.alloc_local((1,), "int32")  # blocks through the rings so far: the stage and its phase
        cnt = T.alloc_local((1,), "int32")  # the producer's count of listed blocks
        q_ready = T.alloc_barrier([129])  # 128 cp.async completions + the block list's writer
        full_k = T.alloc_barrier([128] * stages)
        full_v = T.alloc_barrier([128] * stages)
        empty_k = T.alloc_barrier([256] * stages)  # both consumers release a block
        empty_v = T.alloc_barrier([256] * stages)
        tx = T.get_thread_binding()
        first = tile * TQ
        n[0] = 0
        if Shared[b, tile, g] != 0:
            if tx >= 256:  # producer
                T.set_max_nreg(56, 0)
                load_tile(Q, K, V, Indices, Q_s0, Q_s1, raw_s, blocks_s, ring_k, ring_v, q_ready, full_k, full_v,
                          empty_k, empty_v, 0, b, g, first, tx - 256, n, cnt, q0)
            elif tx < 128:
                T.set_max_nreg(224, 1)
                T.barrier_wait(q_ready[0], 0)
                consume(0, Q_s0[0, :, :], ring_k, ring_v, full_k, full_v, empty_k, empty_v, blocks_s[0, topk],
                        blocks_s[0, 0] == position(first, q0) // Bk, O, LSE, b, g, first, acc_s0, acc_p0,
                        acc_o0, m0, m_prev0, rescale0, l0, n, q0)
            else:
                T.set_max_nreg(224, 1)
                T.barrier_wait(q_ready[0], 0)
                consume(1, Q_s1[0, :, :], ring_k, ring_v, full_k, full_v, empty_k, empty_v, blocks_s[0, topk],
                        blocks_s[0, 0] == position(first, q0) // Bk, O, LSE, b, g, first, acc_s1, acc_p1,
                        acc_o1, m1, m_prev1, rescale1, l1, n, q0)

    @T.macro
    def roles_body(Q, K, V, Indices, Shared, O, LSE, q0):
        with T.Kernel(n_tiles, groups, batch, threads=384) as (tile, g, b):
            roles_tile(Q, K, V, Indices, Shared, O, LSE, q0, tile, g, b)

    @T.macro
    def roles_listed_body(Q, K, V, Indices, Shared, Listed, O, LSE, q0):
        with T.Kernel(n_listed, threads=384) as e:
            triple = T.alloc_local((1,), "int32")  # tile + n_tiles * (g + groups * b)
            triple[0] = Listed[e]
            roles_tile(Q, K, V, Indices, Shared, O, LSE, q0, triple[0] % n_tiles, triple[0] // n_tiles % groups,
                       triple[0] // (n_tiles * groups))

    if query_offset:
        @T.prim_func
        def tile_attention_roles_offset(
            Q: T.Tensor((batch, queries, heads, head_dim), dtype),
            K: T.Tensor((batch, seq, groups, head_dim), dtype),
            V: T.Tensor((batch, seq, groups, head_dim), dtype),
            Indices: T.Tensor((batch, queries, groups, topk), "int32"),
            Shared: T.Tensor((batch, n_tiles, groups), "int32"),
            O: T.Tensor((batch, queries, heads, head_dim), dtype),
            LSE: T.Tensor((batch, queries, heads), "float32"),
            q0: T.int32,
        ):
            roles_body(Q, K, V, Indices, Shared, O, LSE, q0)

    @T.prim_func
    def tile_attention_roles(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        V: T.Tensor((batch, seq, groups, head_dim), dtype),
        Indices: T.Tensor((batch, seq, groups, topk), "int32"),
        Shared: T.Tensor((batch, n_tiles, groups), "int32"),
        O: T.Tensor((batch, seq, heads, head_dim), dtype),
        LSE: T.Tensor((batch, seq, heads), "float32"),
    ):
        roles_body(Q, K, V, Indices, Shared, O, LSE, None)

    def take_tile(w):
        """(tile, group, batch) of the persistent kernel's w-th triple, tile fastest."""
        return w % n_tiles, w // n_tiles % groups, w // (n_tiles * groups)


    @T.macro
    def consume_tiles(c, n_turns, cta, Q_s, ring_k, ring_v, full_k, full_v, empty_k, empty_v, q_ready, q_free,
                      blocks_s, Shared, O, LSE, acc_s, acc_p, acc_o, m, m_prev, rescale, l, n, done, q0):
        """Persistent consumer c: every shared tile the CTA takes, from Q buffer done[0] % 2 and its block list,
        which it frees (both consumers) once it has stored the tile's rows."""
        for turn in T.serial(n_turns):
            tile, g, b = take_tile(cta + turn * ctas)
            if Shared[b, tile, g] != 0:
                qb = done[0] % 2
                T.barrier_wait(q_ready[qb], (done[0] // 2) & 1)
                consume(c, Q_s[qb, :, :], ring_k, ring_v, full_k, full_v, empty_k, empty_v, blocks_s[qb, topk],
                        blocks_s[qb, 0] == position(tile * TQ, q0) // Bk, O, LSE, b, g, tile * TQ, acc_s, acc_p,
                        acc_o, m, m_prev, rescale, l, n, q0)
                T.barrier_arrive(q_free[qb])
                done[0] += 1

    @T.macro
    def roles_persistent_body(Q, K, V, Indices, Shared, O, LSE, q0):
        total = batch * groups * n_tiles  # (tile, group, batch) triples
        with T.Kernel(ctas, threads=384) as cta:
            Q_s0 = T.alloc_shared((n_qbuf, M, D), dtype)  # [2, M, D] consumer 0's rows of this tile and the next
            Q_s1 = T.alloc_shared((n_qbuf, M, D), dtype)
            ring_k = T.alloc_shared((stages, Bk, D), dtype)  # [stages, Bk, D], across tiles
            ring_v = T.alloc_shared((stages, Bk, D), dtype)
            raw_s = T.alloc_shared((topk,), "int32")
            blocks_s = T.alloc_shared((n_qbuf, topk + 1), "int32")  # per Q buffer: its tile's blocks, the count
            (acc_s0, acc_s1, acc_p0, acc_p1, acc_o0, acc_o1, m0, m1, m_prev0, m_prev1, rescale0, rescale1, l0,
             l1) = consumer_fragments()
            n = T.alloc_local((1,), "int32")  # blocks through the rings so far, over all the CTA's tiles
            cnt = T.alloc_local((1,), "int32")  # the producer's count of listed blocks
            done = T.alloc_local((1,), "int32")  # shared tiles this CTA has taken: Q buffer done % 2, its phase
            q_ready = T.alloc_barrier([129, 129])  # per Q buffer: 128 cp.async completions + the list's writer
            q_free = T.alloc_barrier([256, 256])  # per Q buffer: both consumers are done with its tile
            full_k = T.alloc_barrier([128] * stages)
            full_v = T.alloc_barrier([128] * stages)
            empty_k = T.alloc_barrier([256] * stages)
            empty_v = T.alloc_barrier([256] * stages)
            tx = T.get_thread_binding()
            n[0] = 0
            done[0] = 0
            n_turns = T.ceildiv(total - cta, ctas)
            if tx >= 256:  # producer
                T.set_max_nreg(56, 0)
                for turn in T.serial(n_turns):
                    tile, g, b = take_tile(cta + turn * ctas)
                    if Shared[b, tile, g] != 0:
                        qb = done[0] % 2
                        T.barrier_wait(q_free[qb], ((done[0] // 2) & 1) ^ 1)
                        load_tile(Q, K, V, Indices, Q_s0, Q_s1, raw_s, blocks_s, ring_k, ring_v, q_ready, full_k, full_v,
                                  empty_k, empty_v, qb, b, g, tile * TQ, tx - 256, n, cnt, q0)
                        done[0] += 1
            elif tx < 128:
                T.set_max_nreg(224, 1)
                consume_tiles(0, n_turns, cta, Q_s0, ring_k, ring_v, full_k, full_v, empty_k, empty_v, q_ready,
                              q_free, blocks_s, Shared, O, LSE, acc_s0, acc_p0, acc_o0, m0, m_prev0, rescale0, l0, n,
                              done, q0)
            else:
                T.set_max_nreg(224, 1)
                consume_tiles(1, n_turns, cta, Q_s1, ring_k, ring_v, full_k, full_v, empty_k, empty_v, q_ready,
                              q_free, blocks_s, Shared, O, LSE, acc_s1, acc_p1, acc_o1, m1, m_prev1, rescale1, l1, n,
                              done, q0)

    if query_offset:
        @T.prim_func
        def tile_attention_roles_persistent_offset(
            Q: T.Tensor((batch, queries, heads, head_dim), dtype),
            K: T.Tensor((batch, seq, groups, head_dim), dtype),
            V: T.Tensor((batch, seq, groups, head_dim), dtype),
            Indices: T.Tensor((batch, queries, groups, topk), "int32"),
            Shared: T.Tensor((batch, n_tiles, groups), "int32"),
            O: T.Tensor((batch, queries, heads, head_dim), dtype),
            LSE: T.Tensor((batch, queries, heads), "float32"),
            q0: T.int32,
        ):
            roles_persistent_body(Q, K, V, Indices, Shared, O, LSE, q0)

    @T.prim_func
    def tile_attention_roles_persistent(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        V: T.Tensor((batch, seq, groups, head_dim), dtype),
        Indices: T.Tensor((batch, seq, groups, topk), "int32"),
        Shared: T.Tensor((batch, n_tiles, groups), "int32"),
        O: T.Tensor((batch, seq, heads, head_dim), dtype),
        LSE: T.Tensor((batch, seq, heads), "float32"),
    ):
        roles_persistent_body(Q, K, V, Indices, Shared, O, LSE, None)

    if query_offset and listed:
        @T.prim_func
        def tile_attention_roles_listed_offset(
            Q: T.Tensor((batch, queries, heads, head_dim), dtype),
            K: T.Tensor((batch, seq, groups, head_dim), dtype),
            V: T.Tensor((batch, seq, groups, head_dim), dtype),
            Indices: T.Tensor((batch, queries, groups, topk), "int32"),
            Shared: T.Tensor((batch, n_tiles, groups), "int32"),
            Listed: T.Tensor((n_listed,), "int32"),
            O: T.Tensor((batch, queries, heads, head_dim), dtype),
            LSE: T.Tensor((batch, queries, heads), "float32"),
            q0: T.int32,
        ):
            roles_listed_body(Q, K, V, Indices, Shared, Listed, O, LSE, q0)

    @T.prim_func
    def tile_attention_roles_listed(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        V: T.Tensor((batch, seq, groups, head_dim), dtype),
        Indices: T.Tensor((batch, seq, groups, topk), "int32"),
        Shared: T.Tensor((batch, n_tiles, groups), "int32"),
        Listed: T.Tensor((n_listed,), "int32"),
        O: T.Tensor((batch, seq, heads, head_dim), dtype),
        LSE: T.Tensor((batch, seq, heads), "float32"),
    ):
        roles_listed_body(Q, K, V, Indices, Shared, Listed, O, LSE, None)

    if listed:
        return tile_attention_roles_listed_offset if query_offset else tile_attention_roles_listed
    if query_offset:
        return tile_attention_roles_persistent_offset if persistent else tile_attention_roles_offset
    return tile_attention_roles_persistent if persistent else tile_attention_roles


# Fast math makes exp2 one ex2.approx (as in the KV-outer kernel; NOTES.md).
tile_attention_roles_program.pass_configs = {"tl.disable_warp_specialized": True,
                                             "tl.disable_thread_storage_sync": True,
                                             "tl.enable_fast_math": True}


def list_shared_tiles(shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """shared [B, n_tiles, G] (:func:`sharing_tiles`) -> (listed [B * G * n_tiles + 1] int32: the shared triples
    tile + n_tiles * (g + G * b) in that order first, then unused entries; their count [1] int32 or [0] where there
    are no triples). Queued on the current stream, no host sync: a prefix sum places each shared triple."""
    B, n_tiles, G = shared.shape
    total = B * G * n_tiles
    live = shared.transpose(1, 2).reshape(total) != 0  # [B * G * n_tiles], tile fastest
    place = torch.cumsum(live, 0, dtype=torch.int32)  # [total] shared triples up to each, inclusive
    listed = torch.empty(total + 1, dtype=torch.int32, device=shared.device)
    slot = torch.where(live, place - 1, total).long()  # the triples not shared all write the spare last entry
    listed.scatter_(0, slot, torch.arange(total, dtype=torch.int32, device=shared.device))
    return listed, place[-1:]


def shared_tile_attention(q, k, v, indices, shared, block_size: int, scale: float, o, lse, config=None, roles=None,
                          query_start: int = 0, listed=None):
    """Attend the tiles ``shared`` marks (:func:`sharing_tiles`) into o [B, N, Hq, D] and lse [B, N, Hq].

    ``roles`` (default: where a tile has 128 rows) runs :func:`tile_attention_roles_program` with ``config``
    (its ``ROLES_DEFAULTS`` knobs), else :func:`tile_attention_program` (its ``TILE_DEFAULTS`` knobs).
    ``query_start`` (a multiple of ``block_size``): q, indices, o and lse hold the queries from that position on.
    ``listed`` [n] int32 (the first n entries of :func:`list_shared_tiles`' list, n its count): the roles kernel
    runs a CTA a listed triple instead of a CTA every triple (not with its persistent CTAs); a ``listed`` key in
    ``config`` (the forward's ``tile_config``) yields to this argument."""
    if query_start % block_size:
        raise ValueError(f"shared tiles take queries from a block boundary, got query_start {query_start}")
    B, N, Hq, D = q.shape
    G, topk = k.shape[2], indices.shape[3]
    roles = tile_rows(Hq // G, block_size) == 128 if roles is None else roles
    shape = dict(groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk, seq=N)
    dims = dict(groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk, scale=scale, dtype=tl_dtype(q.dtype),
                **(dict(query_offset=True) if query_start else {}))
    if listed is not None and not roles:
        raise ValueError("listed: the roles kernel's (128-row tiles)")
    if roles:
        config = {**ROLES_DEFAULTS, **(config or {}), "listed": listed is not None}
        if listed is not None and config["persistent"]:
            raise ValueError("listed: a CTA a listed tile, not the persistent CTAs")
        if config["persistent"]:
            config.setdefault("ctas", sm_count(q.device))
        kernel = compiled_kernel(tile_attention_roles_program, **dims, **config)
    else:
        config = {**tuned_config("tile_attention", shape, TILE_DEFAULTS, q.device),
                  **{key: value for key, value in (config or {}).items() if key != "listed"}}  # the forward's
        kernel = compiled_kernel(tile_attention_program, **dims, **config)
    offset = (query_start,) if query_start else ()
    if listed is not None:
        if listed.numel():
            kernel(q, k, v, indices, shared, listed, o, lse, *offset)
    elif shared.shape[1]:
        kernel(q, k, v, indices, shared, o, lse, *offset)
    return o, lse
