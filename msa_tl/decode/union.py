"""Decode attention of a row's newest tokens over the union of their chosen blocks (TileLang).

With S > 1 newest tokens a row (draft tokens, chunked prefill) the per-pair kernel
(:mod:`msa_tl.decode.attention`) loads every chosen block once per (token, group) and attends it with MMAs of
R = Hq / G rows. Here a CTA takes ``tokens`` (TC) tokens of one (row, group) at once: their TC * R rows (padded to a
multiple of 64) are one query tile, the CTA's prologue lists the union of their chosen blocks (each with a bit per
token that chose it), and each union block is loaded once and attended by the whole tile, a row masked to the keys
its token chose (and causally). Where neighbouring tokens choose alike, the block loads fall from TC * k to about k;
where they do not, the loads stay and the MMAs grow (their rows are the tile's, not R).

The union's entries are dealt to ``splits`` CTAs (entry e to split e mod splits), which leave fp32 partials in the
per-pair kernel's layout (Opart [B, S*G, splits, R, D], Lpart [B, S*G, splits, R]), so
:func:`msa_tl.decode.attention.decode_combine_program` merges them unchanged. In :func:`decode_union_roles_program`
a producer warpgroup streams the K / V pages through rings while consumer warpgroups attend: decode is bound by those
bytes.

Exactness: a token's rows see exactly its chosen keys (ids past the row's last block or its own position are
ignored, an id chosen twice counts once). One thing the shared tile would get wrong is a non-finite V value in a
block some other token chose: the P V MMA multiplies it by that row's P = 0 (0 * NaN = NaN). So a token whose rows
end holding a NaN is attended again, alone, over its own blocks; NaN and inf then reach exactly the tokens whose
chosen keys hold them, and the second pass costs nothing where no output row is NaN.
"""

import tilelang.language as T

from msa_tl.tl_compile import SMEM_LIMIT

UNION_TOKENS = (4, 8, 16)  # tuner choices of ``tokens``, the tokens a CTA attends at once
_MAX_TOKENS = 16  # a token's bit in an int32 mask, with room: the row's bit index is clamped to 31
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _is_nan(x):
    """NaN by its bits: TileLang folds ``x != x`` to false, and fast math may fold ``isnan``."""
    return (T.reinterpret(x, "uint32") & T.uint32(0x7FFFFFFF)) > T.uint32(0x7F800000)


def union_tile_rows(tokens: int, heads_per_group: int) -> int:
    """Rows of a CTA's query tile: ``tokens`` x R, padded to a multiple of 64 (a warpgroup's wgmma M)."""
    return -(-tokens * heads_per_group // 64) * 64


def union_shared_bytes(tokens: int, head_dim: int, block_size: int, topk: int, stages: int, splits: int = 1) -> int:
    """Shared memory of :func:`decode_union_roles_program` (16-bit inputs): both consumers' Q rows, ``stages`` K and
    V blocks, the prologue's five lists of tokens x topk int32 and the split's two (kept apart from the rings: no
    reuse; TileLang starts the tiles on a 1 KB boundary after them), and 1 KB of barriers."""
    entries = tokens * topk
    lists = 4 * (5 * entries + tokens + 1 + 2 * (-(-entries // splits) + 1))
    return -(-lists // 1024) * 1024 + (128 + 2 * stages * block_size) * head_dim * 2 + 1024 + 1024


def union_limit(tokens: int, heads_per_group: int, head_dim: int, block_size: int, topk: int, stages: int,
                splits: int = 1) -> str | None:
    """None if :func:`decode_union_roles_program` takes this shape, else why not."""
    if not 1 <= tokens <= _MAX_TOKENS:
        return f"tokens={tokens}: 1 to {_MAX_TOKENS} tokens a CTA (a bit each in an int32)"
    if union_tile_rows(tokens, heads_per_group) > 128:
        return f"{tokens} tokens x {heads_per_group} heads a group exceed a 128-row tile (two warpgroups)"
    if head_dim > 128:
        return f"head dim {head_dim}: the tile's O and S accumulators fit in registers up to 128"
    smem = union_shared_bytes(tokens, head_dim, block_size, topk, stages, splits)
    if smem > SMEM_LIMIT:
        return f"{smem} bytes of shared memory at {stages} stages (at most {SMEM_LIMIT})"
    return None


def union_ctas_per_sm(tokens: int, head_dim: int, block_size: int, topk: int, stages: int) -> int:
    """CTAs of :func:`decode_union_roles_program` an SM's shared memory holds (228 KB, 1 KB of it reserved a CTA)."""
    smem = union_shared_bytes(tokens, head_dim, block_size, topk, stages)
    return max(1, 228 * 1024 // (smem + 1024))


def union_splits(units: int, tokens: int, topk: int, sms: int, ctas_per_sm: int = 1) -> int:
    """Splits of each (row, group, token chunk)'s union: as many whole waves of ``ctas_per_sm`` CTAs an SM as
    there are CTAs of ``units`` chunks (at least one; at most one entry a split). A wave's worth, not more: each
    CTA streams its share at an SM's bandwidth, so a second, partial wave would add its whole length."""
    return max(1, min(tokens * topk, ctas_per_sm * sms // units))


def union_prologue_macro(tokens: int, topk: int, block_size: int):
    """Macro ``prologue(Indices, SeqLens, Ids_s, First_s, Bits_s, UIdx_s, UBits_s, b, g, chunk, p, n_q, cur, bits,
    first, rank, total)`` run by the producer's 128 threads p (named barrier 5 between its steps): the union of chunk ``chunk``'s
    chosen blocks of row b, group g into UIdx_s [count] (first-occurrence order) with each block's tokens, a bit
    each, in UBits_s; every thread ends with the count in ``total[0]``. ``cur`` .. ``total``: [1] int32 locals. An
    id past the row's last block, or negative, is dropped; an id chosen twice counts once. Each entry looks at every
    other one (tokens x topk of them, 128 at the paper's draft-8 shape): ~2 x 128 shared loads a thread."""
    UM, threads = tokens * topk, 128
    per_thread = -(-UM // threads)

    @T.macro
    def prologue(Indices, SeqLens, Ids_s, First_s, Bits_s, UIdx_s, UBits_s, b, g, chunk, p, n_q, cur, bits, first,
                 rank, total):
        for j in T.serial(per_thread):  # [TC * topk] the chunk's ids, (token, slot) order
            if j * threads + p < UM:
                cur[0] = T.if_then_else(chunk * tokens + (j * threads + p) // topk < n_q,
                                        Indices[b, T.min(chunk * tokens + (j * threads + p) // topk, n_q - 1), g,
                                                (j * threads + p) % topk], -1)
                Ids_s[j * threads + p] = T.if_then_else(cur[0] <= (SeqLens[b] - 1) // block_size, cur[0], -1)
        T.sync_threads(5, threads)
        for j in T.serial(per_thread):  # first occurrences, and the tokens that chose each id
            if j * threads + p < UM:
                cur[0] = Ids_s[j * threads + p]
                bits[0] = 0
                first[0] = 1
                for o in T.serial(UM):
                    if Ids_s[o] == cur[0]:
                        bits[0] = bits[0] | (1 << (o // topk))
                        if o < j * threads + p:
                            first[0] = 0
                First_s[j * threads + p] = T.if_then_else(cur[0] >= 0, first[0], 0)
                Bits_s[j * threads + p] = bits[0]
        T.sync_threads(5, threads)
        for j in T.serial(per_thread):  # the union, in first-occurrence order
            if j * threads + p < UM:
                rank[0] = 0
                for o in T.serial(UM):
                    if o < j * threads + p:
                        rank[0] += First_s[o]
                if First_s[j * threads + p] != 0:
                    UIdx_s[rank[0]] = Ids_s[j * threads + p]
                    UBits_s[rank[0]] = Bits_s[j * threads + p]
        total[0] = 0
        for o in T.serial(UM):
            total[0] += First_s[o]

    return prologue


# consumers -> (producer, consumer) registers by setmaxnreg: the producer's prologue (loops over the chunk's ids,
# which nvcc unrolls) spills at 56; the consumers fit in 200
_CONSUMER_REGS = {1: (104, 240), 2: (104, 200)}


def decode_union_roles_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float,
                               tokens: int = 8, splits: int = 1, stages: int = 2, dtype: str = "bfloat16",
                               pdl: bool = False, skip_idle: bool = False):
    """Q [B, S, Hq, D], K / V pages [num_pages, Bk, G, D], BlockTable [B, max_pages], SeqLens [B], Indices
    [B, S, G, topk] -> Opart [B, S*G, splits, R, D], Lpart [B, S*G, splits, R] (fp32; natural-log LSE); a CTA per
    (chunk of ``tokens`` tokens, split) x (row, group), its roles by hand as the shared-tile kernel's
    (:func:`msa_tl.attention.shared_tiles.tile_attention_roles_program`).

    A producer warpgroup gathers the tile's Q rows by 16-byte ``cp.async``, lists the union and the split's share
    of it, and streams each listed block's K and V from its page into rings of ``stages`` blocks (mbarriers full /
    empty), so the loads run ahead of the MMAs: decode is bound by these bytes. One consumer warpgroup a 64 rows
    (one or two) attends each block in order. A token whose rows end holding a NaN goes again alone (the module
    docstring): the producer lists the split's blocks that token chose and streams them once more. ``pdl``:
    programmatic dependent launch (:mod:`msa_tl.decode.plan`). ``skip_idle``: a consumer none of whose tokens
    chose a block only waits for it and releases it (no MMAs, no softmax): with two consumers and drafts that
    share few blocks, each then attends about its own blocks and runs up to the rings' depth ahead of the other."""
    R, D, Bk, TC = heads // groups, head_dim, block_size, tokens
    unfit = union_limit(TC, R, D, Bk, topk, stages, splits)
    if unfit:
        raise ValueError(f"decode union attention: {unfit}")
    batch, n_q, num_pages, max_pages = T.dynamic("batch, n_q, num_pages, max_pages")
    M = 64  # rows a consumer warpgroup
    consumers = union_tile_rows(TC, R) // M
    threads = 128 * (consumers + 1)
    UM = TC * topk
    PS = -(-UM // splits)  # the split's list: at most this many blocks (its count in slot PS)
    pieces = M * D // 8 // 128  # 16-byte pieces of a consumer's Q rows, per producer thread
    neg_inf = -T.infinity("float32")
    scale_log2 = scale * _LOG2E
    all_tokens = (1 << TC) - 1
    producer_regs, consumer_regs = _CONSUMER_REGS[consumers]

    def consumer_tokens(c):
        """The tokens with a row in consumer c's M rows, a bit each (a token straddling two consumers is in both)."""
        lo, hi = c * M // R, min((c * M + M - 1) // R, TC - 1)
        return ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)

    prologue = union_prologue_macro(TC, topk, Bk)

    def member(bits, row):
        return (bits >> T.min(row // R, 31)) & 1

    def pass_mask(pass_, Poison_s):
        """The tokens a pass attends: all in pass 0, token t in pass t + 1 if its rows ended holding a NaN, else none."""
        return T.if_then_else(pass_ == 0, all_tokens,
                              T.if_then_else(Poison_s[T.max(pass_ - 1, 0)] != 0, 1 << T.max(pass_ - 1, 0), 0))

    def q_row(chunk, row, n_q):
        """The token of tile row ``row`` (a valid one for the padded rows, which no block lets through)."""
        return T.min(chunk * TC + row // R, n_q - 1)

    @T.macro
    def stream(Kc, Vc, BlockTable, list_s, ring_k, ring_v, full_k, full_v, empty_k, empty_v, b, g, n):
        """Producer: each listed block's K and V from its page into the rings."""
        for j in T.serial(list_s[PS]):
            st = n[0] % stages
            T.barrier_wait(empty_k[st], ((n[0] // stages) & 1) ^ 1)
            T.async_copy(Kc[BlockTable[b, list_s[j]], :, g, :], ring_k[st, :, :])
            T.cp_async_barrier_noinc(full_k[st])
            T.barrier_wait(empty_v[st], ((n[0] // stages) & 1) ^ 1)
            T.async_copy(Vc[BlockTable[b, list_s[j]], :, g, :], ring_v[st, :, :])
            T.cp_async_barrier_noinc(full_v[st])
            n[0] += 1

    @T.macro
    def produce(Q, Kc, Vc, BlockTable, SeqLens, Indices, Q_s0, Q_s1, ring_k, ring_v, Ids_s, First_s, Bits_s, UIdx_s,
                UBits_s, list_s, lbits_s, Poison_s, q_ready, full_k, full_v, empty_k, empty_v, b, g, chunk, sp, p, n,
                cur, bits, first, rank, total, n_q):
        """Producer thread p: Q rows, the union, the split's list (then q_ready), the blocks; then the NaN rounds."""
        for j in T.unroll(pieces):
            T.ptx_cp_async(T.access_ptr(Q_s0[0, (j * 128 + p) // (D // 8), p % (D // 8) * 8], "w", 8),
                           T.access_ptr(Q[b, q_row(chunk, (j * 128 + p) // (D // 8), n_q),
                                          g * R + (j * 128 + p) // (D // 8) % R, p % (D // 8) * 8], "r", 8), 8)
            if consumers == 2:
                T.ptx_cp_async(T.access_ptr(Q_s1[0, (j * 128 + p) // (D // 8), p % (D // 8) * 8], "w", 8),
                               T.access_ptr(Q[b, q_row(chunk, M + (j * 128 + p) // (D // 8), n_q),
                                              g * R + (M + (j * 128 + p) // (D // 8)) % R, p % (D // 8) * 8], "r", 8),
                               8)
        T.cp_async_barrier_noinc(q_ready[0])
        if p < TC:
            Poison_s[p] = 0
        prologue(Indices, SeqLens, Ids_s, First_s, Bits_s, UIdx_s, UBits_s, b, g, chunk, p, n_q, cur, bits, first, rank,
                 total)
        T.sync_threads(5, 128)
        total[0] = T.if_then_else(total[0] > sp, (total[0] - sp + splits - 1) // splits, 0)  # the split's blocks
        for j in T.serial(-(-PS // 128)):  # its share: union entries sp, sp + splits, ...
            if j * 128 + p < total[0]:
                list_s[j * 128 + p] = UIdx_s[sp + (j * 128 + p) * splits]
                lbits_s[j * 128 + p] = UBits_s[sp + (j * 128 + p) * splits]
        if p == 0:
            list_s[PS] = total[0]
        T.sync_threads(5, 128)
        if p == 0:
            T.barrier_arrive(q_ready[0])  # release: the list
        for pass_ in T.serial(TC + 1):  # pass 0: every token; pass t + 1: token t again alone if its rows held a NaN
            mask = pass_mask(pass_, Poison_s)
            if mask != 0:
                if pass_ > 0:
                    T.sync_threads(6, threads)  # the consumers have read the last list
                    if p == 0:
                        rank[0] = 0
                        for j in T.serial(total[0]):
                            if (UBits_s[sp + j * splits] & mask) != 0:
                                list_s[rank[0]] = UIdx_s[sp + j * splits]
                                lbits_s[rank[0]] = mask
                                rank[0] += 1
                        list_s[PS] = rank[0]
                    T.sync_threads(6, threads)
                stream(Kc, Vc, BlockTable, list_s, ring_k, ring_v, full_k, full_v, empty_k, empty_v, b, g, n)
            if pass_ == 0:
                T.sync_threads(6, threads)  # the consumers' NaN flags

    @T.macro
    def masked_max(c, acc_s, m, blk, bits, pos0, clear):
        """S of block ``blk`` masked to the rows whose token chose it (``bits``) and to keys no later than the row's
        token; the row max over it (kept from before unless ``clear``)."""
        for i, col in T.Parallel(M, Bk):  # [M, Bk]
            acc_s[i, col] = T.if_then_else(
                member(bits, c * M + i) == 1,
                T.if_then_else(blk * Bk + col <= pos0 + (c * M + i) // R, acc_s[i, col], neg_inf), neg_inf)
        T.reduce_max(acc_s, m, dim=1, clear=clear)

    @T.macro
    def exponentiate(acc_s, m):
        for i, col in T.Parallel(M, Bk):  # a masked key: P = 0 even where the row has no key yet (max -inf)
            acc_s[i, col] = T.if_then_else(acc_s[i, col] == neg_inf, 0.0,
                                           T.exp2(acc_s[i, col] * scale_log2 - m[i] * scale_log2))

    @T.macro
    def attend(c, Q_c, ring_k, ring_v, full_k, full_v, empty_k, empty_v, list_s, lbits_s, j, token_mask, pos0, acc_s,
               acc_p, acc_o, m, m_prev, rescale, l, n):
        """Consumer c: listed block j at ring position n[0], its rows masked to its tokens in ``token_mask``: S, the
        online softmax, P V."""
        T.barrier_wait(full_k[n[0] % stages], (n[0] // stages) & 1)
        T.wgmma_gemm(Q_c, ring_k[n[0] % stages, :, :], acc_s, transpose_B=True, clear_accum=True)
        T.wait_wgmma(0)  # S [M, Bk]
        T.barrier_arrive(empty_k[n[0] % stages])
        T.copy(m, m_prev)
        masked_max(c, acc_s, m, list_s[j], lbits_s[j] & token_mask, pos0, False)
        for i in T.Parallel(M):  # no key yet (max -inf): keep the rescale finite
            rescale[i] = T.if_then_else(m[i] == neg_inf, 1.0, T.exp2(m_prev[i] * scale_log2 - m[i] * scale_log2))
        exponentiate(acc_s, m)
        for i in T.Parallel(M):
            l[i] *= rescale[i]
        T.reduce_sum(acc_s, l, dim=1, clear=False)
        T.copy(acc_s, acc_p)
        for i, d in T.Parallel(M, D):
            acc_o[i, d] *= rescale[i]
        T.barrier_wait(full_v[n[0] % stages], (n[0] // stages) & 1)
        T.wgmma_gemm(acc_p, ring_v[n[0] % stages, :, :], acc_o)
        T.wait_wgmma(0)  # O [M, D]
        T.barrier_arrive(empty_v[n[0] % stages])

    @T.macro
    def attend_or_release(c, Q_c, ring_k, ring_v, full_k, full_v, empty_k, empty_v, list_s, lbits_s, j, token_mask,
                          pos0, acc_s, acc_p, acc_o, m, m_prev, rescale, l, n):
        """:func:`attend` where one of consumer c's tokens chose the block; else wait for it to land (the other
        consumer reads it; the producer may refill the stage only once both released it) and release it."""
        mine = lbits_s[j] & token_mask & consumer_tokens(c)  # a let binding: TileLang keeps the branch whole (a
        if mine != 0:  # wgmma in each piece of a split one serialises every wgmma of the kernel)
            attend(c, Q_c, ring_k, ring_v, full_k, full_v, empty_k, empty_v, list_s, lbits_s, j, token_mask, pos0,
                   acc_s, acc_p, acc_o, m, m_prev, rescale, l, n)
        else:
            T.barrier_wait(full_k[n[0] % stages], (n[0] // stages) & 1)
            T.barrier_arrive(empty_k[n[0] % stages])
            T.barrier_wait(full_v[n[0] % stages], (n[0] // stages) & 1)
            T.barrier_arrive(empty_v[n[0] % stages])

    @T.macro
    def consume(c, Q_c, ring_k, ring_v, full_k, full_v, empty_k, empty_v, nb, list_s, lbits_s, token_mask, pos0,
                acc_s, acc_p, acc_o, m, m_prev, rescale, l, n):
        """Consumer c: the nb listed blocks from ring position n[0] on, into O [M, D], the row max and sum. Each
        block's S, softmax and P V in order, each wgmma waited for where it was issued: the loads run ahead in the
        rings and the other consumer's MMAs fill this one's softmax. (Issuing block j + 1's S under block j's P V,
        as the prefill tile does, put wgmma across the branches TileLang splits a nested body into, and ptxas
        serialised every wgmma of the kernel.)"""
        T.clear(acc_o)
        T.clear(l)
        T.fill(m, neg_inf)
        for j in T.serial(nb):
            if skip_idle:
                attend_or_release(c, Q_c, ring_k, ring_v, full_k, full_v, empty_k, empty_v, list_s, lbits_s, j,
                                  token_mask, pos0, acc_s, acc_p, acc_o, m, m_prev, rescale, l, n)
            else:
                attend(c, Q_c, ring_k, ring_v, full_k, full_v, empty_k, empty_v, list_s, lbits_s, j, token_mask, pos0,
                       acc_s, acc_p, acc_o, m, m_prev, rescale, l, n)
            n[0] += 1

    @T.macro
    def store(c, Opart, Lpart, b, g, sp, chunk, n_q, token_mask, acc_o, m, l):
        """Consumer c's rows of the tokens in ``token_mask``: O = acc / sum (0 with no key; NaN passes), LSE."""
        for i in T.Parallel(M):
            if c * M + i < TC * R and chunk * TC + (c * M + i) // R < n_q and member(token_mask, c * M + i) == 1:
                Lpart[b, (chunk * TC + (c * M + i) // R) * groups + g, sp, (c * M + i) % R] = T.if_then_else(
                    l[i] == 0.0, neg_inf, (m[i] * scale_log2 + T.log2(l[i])) * _LN2)
        for i, d in T.Parallel(M, D):
            if c * M + i < TC * R and chunk * TC + (c * M + i) // R < n_q and member(token_mask, c * M + i) == 1:
                Opart[b, (chunk * TC + (c * M + i) // R) * groups + g, sp, (c * M + i) % R, d] = T.if_then_else(
                    l[i] == 0.0, 0.0, acc_o[i, d] / l[i])

    @T.macro
    def consumer(c, Q_c, Opart, Lpart, ring_k, ring_v, full_k, full_v, empty_k, empty_v, q_ready, list_s, lbits_s,
                 Poison_s, b, g, sp, chunk, n_q, pos0, acc_s, acc_p, acc_o, m, m_prev, rescale, l, row_check, n):
        T.barrier_wait(q_ready[0], 0)
        for pass_ in T.serial(TC + 1):  # as the producer's passes
            mask = pass_mask(pass_, Poison_s)
            if mask != 0:
                if pass_ > 0:
                    T.sync_threads(6, threads)
                    T.sync_threads(6, threads)  # the producer has listed the token's blocks
                consume(c, Q_c, ring_k, ring_v, full_k, full_v, empty_k, empty_v, list_s[PS], list_s, lbits_s, mask,
                        pos0, acc_s, acc_p, acc_o, m, m_prev, rescale, l, n)
                store(c, Opart, Lpart, b, g, sp, chunk, n_q, mask, acc_o, m, l)
            if pass_ == 0:
                T.reduce_sum(acc_o, row_check, dim=1)  # NaN where the row holds a NaN (or both infinities)
                for i in T.Parallel(M):
                    if c * M + i < TC * R and _is_nan(row_check[i]):
                        Poison_s[T.min((c * M + i) // R, TC - 1)] = 1
                T.sync_threads(6, threads)

    @T.prim_func
    def decode_union_roles(
        Q: T.Tensor((batch, n_q, heads, head_dim), dtype),
        Kc: T.Tensor((num_pages, block_size, groups, head_dim), dtype),
        Vc: T.Tensor((num_pages, block_size, groups, head_dim), dtype),
        BlockTable: T.Tensor((batch, max_pages), "int32"),
        SeqLens: T.Tensor((batch,), "int32"),
        Indices: T.Tensor((batch, n_q, groups, topk), "int32"),
        Opart: T.Tensor((batch, n_q * groups, splits, R, head_dim), "float32"),
        Lpart: T.Tensor((batch, n_q * groups, splits, R), "float32"),
    ):
        with T.Kernel(T.ceildiv(n_q, TC) * splits, batch * groups, threads=threads) as (cs, bg):
            Q_s0 = T.alloc_shared((1, M, D), dtype)  # [1, M, D] consumer 0's rows
            Q_s1 = T.alloc_shared((1, M, D), dtype)  # consumer 1's (unused with one consumer)
            ring_k = T.alloc_shared((stages, Bk, D), dtype)  # [stages, Bk, D]
            ring_v = T.alloc_shared((stages, Bk, D), dtype)
            Ids_s = T.alloc_shared((UM,), "int32")  # [TC * topk] the chunk's ids, (token, slot) order; -1 unused
            First_s = T.alloc_shared((UM,), "int32")  # 1 where an entry holds its id's first occurrence
            Bits_s = T.alloc_shared((UM,), "int32")  # the tokens that chose the entry's id, a bit each
            UIdx_s = T.alloc_shared((UM,), "int32")  # the union's blocks
            UBits_s = T.alloc_shared((UM,), "int32")  # their tokens
            list_s = T.alloc_shared((PS + 1,), "int32")  # [PS + 1] the blocks this pass streams; the count last
            lbits_s = T.alloc_shared((PS + 1,), "int32")  # their tokens
            Poison_s = T.alloc_shared((TC,), "int32")  # 1 where a token's rows ended holding a NaN
            # each consumer's own register tiles (TileLang lays a fragment out over the threads that use it):
            # S [M, Bk] fp32, P [M, Bk], O [M, D] fp32; the row max, previous max, rescale, sum and check [M] fp32
            tiles = [[T.alloc_fragment(shape, kind) for shape, kind in
                      [((M, Bk), "float32"), ((M, Bk), dtype), ((M, D), "float32")] + [((M,), "float32")] * 5]
                     for _ in range(consumers)]
            n = T.alloc_local((1,), "int32")  # blocks through the rings so far: the stage and its phase
            cur = T.alloc_local((1,), "int32")  # the producer's scalars
            bits = T.alloc_local((1,), "int32")
            first = T.alloc_local((1,), "int32")
            rank = T.alloc_local((1,), "int32")
            total = T.alloc_local((1,), "int32")
            q_ready = T.alloc_barrier([129])  # 128 cp.async completions + the list's writer
            full_k = T.alloc_barrier([128] * stages)
            full_v = T.alloc_barrier([128] * stages)
            empty_k = T.alloc_barrier([128 * consumers] * stages)  # every consumer releases a block
            empty_v = T.alloc_barrier([128 * consumers] * stages)
            tx = T.get_thread_binding()
            b, g = bg // groups, bg % groups
            chunk, sp = cs // splits, cs % splits
            if pdl:
                T.pdl_sync()  # the selection has finished
            pos0 = SeqLens[b] - n_q + chunk * TC  # the chunk's first token's position
            n[0] = 0
            if tx >= 128 * consumers:  # producer
                T.set_max_nreg(producer_regs, 0)
                produce(Q, Kc, Vc, BlockTable, SeqLens, Indices, Q_s0, Q_s1, ring_k, ring_v, Ids_s, First_s, Bits_s,
                        UIdx_s, UBits_s, list_s, lbits_s, Poison_s, q_ready, full_k, full_v, empty_k, empty_v, b, g,
                        chunk, sp, tx - 128 * consumers, n, cur, bits, first, rank, total, n_q)
            else:
                T.set_max_nreg(consumer_regs, 1)
                if consumers == 1 or tx < 128:
                    consumer(0, Q_s0[0, :, :], Opart, Lpart, ring_k, ring_v, full_k, full_v, empty_k, empty_v,
                             q_ready, list_s, lbits_s, Poison_s, b, g, sp, chunk, n_q, pos0, *tiles[0], n)
                if consumers == 2 and tx >= 128:
                    consumer(1, Q_s1[0, :, :], Opart, Lpart, ring_k, ring_v, full_k, full_v, empty_k, empty_v,
                             q_ready, list_s, lbits_s, Poison_s, b, g, sp, chunk, n_q, pos0, *tiles[-1], n)
            if pdl:
                T.pdl_trigger()

    return decode_union_roles


# Barriers placed by hand (the sync planner would put CTA-wide ones inside the roles' branches), no reuse of shared
# memory between the prologue's lists and the rings the producer fills while consumers read the lists, and exp2 as
# one ex2.approx (as the shared-tile kernel).
decode_union_roles_program.pass_configs = {"tl.disable_warp_specialized": True, "tl.disable_thread_storage_sync": True,
                                           "tl.disable_shared_memory_reuse": True, "tl.enable_fast_math": True}


def union_tokens(tokens: int, queries: int) -> int:
    """Tokens a CTA attends: the knob, but no more than the row's newest tokens."""
    return max(1, min(tokens, queries))
