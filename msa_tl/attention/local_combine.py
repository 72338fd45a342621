"""The combine with each query's own key block attended in it (TileLang): no partial for the local block.

Every selection holds each query's own (local) key block, so the KV-outer kernel writes one partial a (query, KV
head) for it and the combine reads it back: 1/16 of the partials' traffic at the paper's shape. Here the schedule
leaves the own blocks out of the KV-outer items and this kernel, one CTA per (key block, KV head) of the chunk,
attends each query of the block to its own block (causal) and merges that term with the query's other partials:

- a **producer** warp loads the block's K / V once, then, tile after tile (``64 / R`` consecutive queries x R
  heads, the block's queries in order), the tile's Q rows and its queries' partial LSEs into a 2-stage ring; a
  second producer warp loads the tiles' partial boxes, ``slots_per_piece`` slots of a tile's queries at a time,
  into a ``stages``-deep ring that runs on across tiles, so the partials stream while the consumer attends;
- one **consumer** warpgroup runs S = Q K^T (wgmma), the causal mask, the softmax and P V (P from registers): the
  own block's unnormalised term and its row max. Each row's weights come from the max over that term and the
  partial LSEs; the partial boxes are added piece by piece into the P V accumulators in the wgmma's own register
  layout, and O = acc / sum and the LSE are written.

Inputs as :func:`msa_tl.attention.combine.combine_program` takes them, plus Q, K, V and RowFlags [B, N, G]
(:func:`row_flags`: bit 0 where the query chose its own block, else the term is left out; bit 1 where it has
partials, else none of its slots is loaded: rows that chose only their own block; bit 2 where a shared tile owns
the row (:mod:`msa_tl.attention.shared_tiles`, which writes it): nothing is loaded, attended or stored for it, and
a tile of such rows is skipped; bit 3 + s where slot s holds a partial). The slots the KV-outer kernel did not write
(the own block's, -1 ids) are never read by their LSE, so their partial LSEs need no -inf fill.
NOTES.md (session 28, design 7) has the cost model: the same partial bytes less the local ones, Q read once, the
local attention's tensor work hidden under the partials' stream.
"""

import math

import tilelang.language as T
import torch
from tilelang.layout import make_swizzled_layout

from msa_tl.attention.scheduler import tma_loads_macros
from msa_tl.tl_compile import SMEM_LIMIT

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# 3 stages of 2 slots x 64 rows (32 KB each): ~96 KB of partials in flight an SM. L2 prefetches further ahead were
# slower (NOTES.md, session 29: the prefetched lines are evicted before their loads). bench_main --chunks sweeps it.
# tma_o: O leaves through shared memory by TMA stores, not from the accumulators' registers (the register stores
# write each 32-byte sector in pieces: twice the L2's write requests; 12.81 -> 12.49 ms at 128K, NOTES.md session 30).
# pdl: programmatic dependent launch (the kernel's launch and prologue overlap the chunk's attention ahead of it;
# measured no faster, session 30).
LOCAL_COMBINE_DEFAULTS = dict(stages=3, slots_per_piece=2, tma_o=True, pdl=False)
ABLATIONS = ("", "merge")
# RowFlags, a word a (query, KV head): its own block chosen, any partial left, a shared tile's row, then a bit a slot
FLAG_OWN, FLAG_PARTIALS, FLAG_SKIP = 1, 2, 4
FLAG_SLOTS = 3  # bit FLAG_SLOTS + s: slot s holds a partial
MAX_TOPK = 31 - FLAG_SLOTS  # the slot bits fit an int32 below its sign bit
ROWS = 64  # one wgmma M tile: 64 / R queries x R heads
TMA_SMEM_ALIGN = 128  # bytes: a TMA tensor copy's shared-memory address


def lse_slots(heads_per_group: int, topk: int) -> int:
    """Slots a query's row of partial LSEs [slots, R] fp32 takes in shared memory: topk, padded so that every query's
    row starts at a TMA-aligned address (R = 8, topk = 6 would put the second query's row 192 bytes in)."""
    per_slot = heads_per_group * 4
    step = TMA_SMEM_ALIGN // math.gcd(TMA_SMEM_ALIGN, per_slot)
    return -(-topk // step) * step


def local_combine_shared_bytes(heads_per_group: int, head_dim: int, block_size: int, topk: int, stages: int,
                               slots_per_piece: int, partial_bytes: int, tma_o: bool) -> int:
    """Shared memory of :func:`local_combine_program` (16-bit inputs): K / V of the block, the 2-stage Q and LSE
    ring, the ``stages``-deep ring of partial pieces, the O tile (``tma_o``), the barriers."""
    R, D = heads_per_group, head_dim
    tq = ROWS // R
    return (2 * block_size * D * 2 + 2 * ROWS * D * 2 + 2 * tq * lse_slots(R, topk) * R * 4
            + stages * tq * slots_per_piece * R * D * partial_bytes + (ROWS * D * 2 if tma_o else 0)
            + 8 * (5 + 2 * stages))


def local_combine_unsupported(heads_per_group: int, head_dim: int, block_size: int, topk: int, partial_bytes: int,
                              config: dict) -> str | None:
    """Why :func:`local_combine_program` cannot be built for this layout and config (None where it can)."""
    R = heads_per_group
    if R < 8 or ROWS % R:
        return f"8-64 query heads per KV head dividing 64 (one TMA box a query), got {R}"
    if head_dim not in (64, 128):
        return f"head dims 64 or 128, got {head_dim}"
    if partial_bytes != 2:
        return "16-bit partials"
    if topk > MAX_TOPK:
        return f"topk <= {MAX_TOPK} (a RowFlags bit a slot), got {topk}"
    if topk % config["slots_per_piece"]:
        return f"slots_per_piece ({config['slots_per_piece']}) must divide topk ({topk})"
    smem = local_combine_shared_bytes(R, head_dim, block_size, topk, config["stages"], config["slots_per_piece"],
                                      partial_bytes, config["tma_o"])
    if smem > SMEM_LIMIT:
        return f"{smem} B of shared memory (stages={config['stages']}, slots_per_piece={config['slots_per_piece']})"
    return None


def row_flags(kv_indices, own_chosen, shared_mask=None):
    """[B, N, G] int32 for :func:`local_combine_program`: bit 0 from ``own_chosen`` [B, N, G] (the query chose its
    own block), bit 1 where ``kv_indices`` [B, N, G, topk] (the own blocks already left out, topk <= MAX_TOPK) holds
    any block, i.e. where the query has partials to merge, bit ``FLAG_SLOTS + s`` where slot s holds one, and
    ``FLAG_SKIP`` where ``shared_mask`` [B, N, G] bool (:func:`msa_tl.attention.shared_tiles.shared_rows`) is set."""
    topk = kv_indices.shape[-1]
    if topk > MAX_TOPK:
        raise ValueError(f"row_flags: topk <= {MAX_TOPK}, got {topk}")
    bits = torch.bitwise_left_shift(1, torch.arange(FLAG_SLOTS, FLAG_SLOTS + topk, device=kv_indices.device,
                                                    dtype=torch.int32))
    slots = torch.where(kv_indices >= 0, bits, 0).sum(dim=-1, dtype=torch.int32)  # [B, N, G]
    flags = own_chosen * FLAG_OWN | (slots != 0).int() * FLAG_PARTIALS | slots
    if shared_mask is not None:
        flags = flags | (shared_mask.int() * FLAG_SKIP)
    return flags.contiguous()


def local_combine_program(heads: int, head_dim: int, topk: int, groups: int, block_size: int, scale: float,
                          stages: int = LOCAL_COMBINE_DEFAULTS["stages"],
                          slots_per_piece: int = LOCAL_COMBINE_DEFAULTS["slots_per_piece"],
                          tma_o: bool = LOCAL_COMBINE_DEFAULTS["tma_o"], pdl: bool = LOCAL_COMBINE_DEFAULTS["pdl"],
                          dtype: str = "bfloat16",
                          partial_dtype: str = "bfloat16", ablate: str = ""):
    """Q [B, N, Hq, D], K / V [B, N, G, D], RowFlags [B, N, G] int32, Opart [B, pairs * topk * R, D] and
    Lpart [B, pairs * topk, R] (pair (t - t0) * G + g of the chunk's queries t0 <= t < t1, as the KV-outer kernel
    writes them; the slots RowFlags leaves out may hold anything) -> O [B, N, Hq, D], LSE [B, N, Hq] for the chunk's
    queries. Grid: (the chunk's key blocks, B * G). Every role skips the tiles whose rows are all shared tiles' by
    the same rule, so the rings turn only for live tiles, and a block with none loads nothing. ``ablate`` (timing
    only, wrong outputs; :mod:`benchmarks.probe_local_combine`): "merge" skips the partials' merge (their loads, the
    rings and the own block's attention still run). ``pdl``: launched before the chunk's attention has finished,
    its CTAs stage the block's RowFlags, then wait for it (griddepcontrol.wait); the next launch may start at once."""
    R, D, Bk = heads // groups, head_dim, block_size
    unfit = local_combine_unsupported(R, D, Bk, topk, 2 if partial_dtype != "float32" else 4,
                                      dict(stages=stages, slots_per_piece=slots_per_piece, tma_o=tma_o))
    if unfit:
        raise ValueError(f"local combine: {unfit}")
    if ablate not in ABLATIONS:
        raise ValueError(f"local combine: ablate is one of {ABLATIONS}, got {ablate!r}")
    merge = ablate != "merge"
    TQ, SP = ROWS // R, slots_per_piece
    NP = topk // SP  # pieces a tile
    batch, seq, n_rows, n_lse = T.dynamic("batch, seq, n_rows, n_lse")
    neg_inf = -T.infinity("float32")
    scale_log2 = scale * _LOG2E
    load_block, _ = tma_loads_macros(R, D, Bk, TQ, topk)

    @T.macro
    def read_flags(flags_s, j, fl, live):
        """Tile j's RowFlags into fl [TQ] and live[0] = 1 where any row is not skipped: each role reads them alike,
        so all turn their rings on the same tiles."""
        live[0] = 0
        for qi in T.unroll(TQ):
            fl[qi] = flags_s[j * TQ + qi]
            if (fl[qi] & FLAG_SKIP) == 0:
                live[0] = 1

    @T.macro
    def load_tile(Q, Lpart, b, g, qa, t0, c, fl, ring, lse_s, q_full):
        """A live tile's Q rows [ROWS, D] and its queries' partial LSEs [TQ, topk, R] (where they have partials)
        into ring slot c % 2 (c: the live tiles before it)."""
        for qi in T.unroll(TQ):
            if (fl[qi] & FLAG_SKIP) == 0:
                for h in T.unroll(D // 64):
                    T.tma_copy(Q[b, qa + qi, g * R:(g + 1) * R, h * 64:(h + 1) * 64],
                               ring[c % 2, qi * R:(qi + 1) * R, h * 64:(h + 1) * 64], barrier=q_full[c % 2],
                               leader_scope_threads=32)
            if (fl[qi] & FLAG_PARTIALS) != 0:
                pair = (qa + qi - t0) * groups + g
                T.tma_copy(Lpart[b, pair * topk:(pair + 1) * topk, :], lse_s[c % 2, qi, 0:topk, :],
                           barrier=q_full[c % 2], leader_scope_threads=32, eviction_policy="evict_first")
        T.barrier_arrive(q_full[c % 2])

    @T.macro
    def load_piece(Opart, b, g, qa, t0, p, k, fl, pieces, p_full):
        """Piece p of a live tile (slots p SP .. p SP + SP - 1 of its queries) into ring slot k % stages: one R x D
        box a slot RowFlags marks, read once (evict first: the partials stream, the chunk's Q stays). A slot it
        leaves out (the own block's, -1 ids) is not read: its box in the ring keeps stale data, which the merge's
        select never takes (1/16 of the partials' bytes at the paper's shape)."""
        for qi in T.unroll(TQ):
            for s2 in T.unroll(SP):
                if ((fl[qi] >> (FLAG_SLOTS + p * SP + s2)) & 1) != 0:
                    row = (((qa + qi - t0) * groups + g) * topk + p * SP + s2) * R
                    for h in T.unroll(D // 64):  # [R, 64] a copy: one 128-byte swizzle span
                        T.tma_copy(Opart[b, row:row + R, h * 64:(h + 1) * 64],
                                   pieces[k % stages, (qi * SP + s2) * R:(qi * SP + s2 + 1) * R, h * 64:(h + 1) * 64],
                                   barrier=p_full[k % stages], leader_scope_threads=32, eviction_policy="evict_first")
        T.barrier_arrive(p_full[k % stages])

    @T.macro
    def store_tile_o(O, b, g, qa, q_hi, fl, acc_o, l, O_s):
        """The tile's O [ROWS, D] = acc_o / l through O_s, one TMA box [R, 64] a live query and half of D (full
        sectors: direct stores from the wgmma layout write each 32-byte sector in pieces, twice the L2's write
        requests). O_s is free once the previous tile's boxes have been read."""
        T.tma_store_wait(0)  # threads that issued no copies return at once
        T.sync_threads(1, 128)
        for r, d in T.Parallel(ROWS, D):
            O_s[r, d] = T.if_then_else(l[r] == 0.0, 0.0, acc_o[r, d] / l[r])
        T.fence_proxy_async()  # the generic-proxy writes of O_s, before the TMA unit reads it
        T.sync_threads(1, 128)
        for qi in T.unroll(TQ):
            if qa + qi < q_hi and (fl[qi] & FLAG_SKIP) == 0:
                for h in T.unroll(D // 64):
                    T.tma_copy(O_s[qi * R:(qi + 1) * R, h * 64:(h + 1) * 64],
                               O[b, qa + qi, g * R:(g + 1) * R, h * 64:(h + 1) * 64], leader_scope_threads=128)

    @T.prim_func
    def local_combine(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        V: T.Tensor((batch, seq, groups, head_dim), dtype),
        RowFlags: T.Tensor((batch, seq, groups), "int32"),
        Opart: T.Tensor((batch, n_rows, head_dim), partial_dtype),
        Lpart: T.Tensor((batch, n_lse, R), "float32"),
        O: T.Tensor((batch, seq, heads, head_dim), dtype),
        LSE: T.Tensor((batch, seq, heads), "float32"),
        t0: T.int32,
        t1: T.int32,
    ):
        with T.Kernel(T.ceildiv(t1, Bk) - t0 // Bk, batch * groups, threads=256) as (unit, bg):
            K_s = T.alloc_shared((Bk, D), dtype)
            V_s = T.alloc_shared((Bk, D), dtype)
            ring = T.alloc_shared((2, ROWS, D), dtype)  # [2, ROWS, D]: tile j's Q rows in slot j % 2
            # [2, TQ, slots, R]: its queries' partial LSEs (topk of the slots)
            lse_s = T.alloc_shared((2, TQ, lse_slots(R, topk), R), "float32")
            pieces = T.alloc_shared((stages, TQ * SP * R, D), partial_dtype)  # [stages, TQ SP R, D]
            O_s = T.alloc_shared((ROWS, D) if tma_o else (1,), dtype)  # [ROWS, D]: the tile's O, with tma_o
            acc_s = T.alloc_fragment((ROWS, Bk), "float32")  # [ROWS, Bk]
            p = T.alloc_fragment((ROWS, Bk), dtype)
            acc_o = T.alloc_fragment((ROWS, D), "float32")  # [ROWS, D]: the own block's term, then the sum
            m = T.alloc_fragment((ROWS,), "float32")  # [ROWS] row max of the raw scores
            l = T.alloc_fragment((ROWS,), "float32")  # [ROWS] row sum, then the weights' sum
            mx = T.alloc_fragment((ROWS,), "float32")  # [ROWS] the merge's max (natural log units)
            w = T.alloc_fragment((ROWS,), "float32")  # [ROWS] a slot's weight
            qpos = T.alloc_fragment((ROWS,), "int32")  # [ROWS] the row's query
            flags = T.alloc_fragment((ROWS,), "int32")  # [ROWS] its RowFlags
            # [Bk] the block's RowFlags (FLAG_SKIP past the chunk): read from global memory once, not a tile at a time
            # by each role (dependent loads: ~30 us a block of skipped tiles)
            flags_s = T.alloc_shared((Bk,), "int32")
            fl = T.alloc_local((TQ,), "int32")  # [TQ] the tile's RowFlags, read by every role
            live = T.alloc_local((1,), "int32")  # the tile has a row to attend
            n_live = T.alloc_local((1,), "int32")  # live tiles so far: the rings' turns
            # swizzled: the consumer reads a piece in the wgmma's layout, 8 rows 256 B apart at once (8-way bank
            # conflicts unswizzled)
            T.annotate_layout({pieces: make_swizzled_layout(pieces), **({O_s: make_swizzled_layout(O_s)} if tma_o else {})})
            kv_ready = T.alloc_barrier(32)
            q_full = T.alloc_barrier([32, 32])
            q_empty = T.alloc_barrier([128, 128])
            p_full = T.alloc_barrier([32] * stages)
            p_empty = T.alloc_barrier([128] * stages)

            b = bg // groups
            g = bg % groups
            blk = t0 // Bk + unit
            q_lo = T.max(t0, blk * Bk)
            q_hi = T.min(t1, blk * Bk + Bk)
            n_tiles = T.ceildiv(q_hi - q_lo, TQ)
            tx = T.get_thread_binding()
            if pdl:
                T.pdl_trigger()  # the next chunk's attention may launch: its CTAs take each SM this one leaves
            for i in T.Parallel(Bk):  # RowFlags, Q, K, V: written before the attention ahead of this kernel began
                flags_s[i] = T.if_then_else(q_lo + i < q_hi, RowFlags[b, T.min(q_lo + i, q_hi - 1), g], FLAG_SKIP)
            T.sync_threads()
            if pdl:
                T.pdl_sync()  # the chunk's partials: the attention ahead has finished
            n_live[0] = 0
            if tx >= 128:  # producer: two warps, so neither stream waits on the other's ring
                T.set_max_nreg(56, 0)
                if tx < 160:  # K / V with the first live tile, then each live tile's Q rows and LSEs
                    for j in T.serial(n_tiles):
                        read_flags(flags_s, j, fl, live)
                        if live[0] != 0:
                            if n_live[0] == 0:
                                load_block(K, V, b, blk, g, K_s, V_s, None, kv_ready, 0)
                                T.barrier_arrive(kv_ready[0])
                            T.barrier_wait(q_empty[n_live[0] % 2], ((n_live[0] // 2) & 1) ^ 1)
                            load_tile(Q, Lpart, b, g, q_lo + j * TQ, t0, n_live[0], fl, ring, lse_s, q_full)
                            n_live[0] += 1
                elif tx < 192:  # the partial pieces, live tile after live tile: the ring runs on across tiles
                    for j in T.serial(n_tiles):
                        read_flags(flags_s, j, fl, live)
                        if live[0] != 0:
                            for pp in T.serial(NP):
                                k = n_live[0] * NP + pp
                                T.barrier_wait(p_empty[k % stages], ((k // stages) & 1) ^ 1)
                                load_piece(Opart, b, g, q_lo + j * TQ, t0, pp, k, fl, pieces, p_full)
                            n_live[0] += 1
            else:  # consumer
                T.set_max_nreg(216, 1)
                for j in T.serial(n_tiles):
                    qa = q_lo + j * TQ
                    read_flags(flags_s, j, fl, live)
                    if live[0] != 0:
                        c = n_live[0]
                        if c == 0:
                            T.barrier_wait(kv_ready[0], 0)
                        T.barrier_wait(q_full[c % 2], (c // 2) & 1)
                        T.wgmma_gemm(ring[c % 2, :, :], K_s, acc_s, transpose_B=True, clear_accum=True)  # [ROWS, Bk]
                        for r in T.Parallel(ROWS):
                            qpos[r] = qa + r // R
                        T.wait_wgmma(0)
                        for r, col in T.Parallel(ROWS, Bk):  # causal inside the own block
                            acc_s[r, col] = T.if_then_else(blk * Bk + col <= qpos[r], acc_s[r, col], neg_inf)
                        T.reduce_max(acc_s, m, dim=1)
                        for r, col in T.Parallel(ROWS, Bk):  # a row whose only visible key is NaN has m = -inf (the
                            # max skips NaN): subtract 0 there, so the NaN reaches l and masked keys still give 0
                            acc_s[r, col] = T.exp2(acc_s[r, col] * scale_log2
                                                   - T.if_then_else(m[r] == neg_inf, 0.0, m[r] * scale_log2))
                        T.reduce_sum(acc_s, l, dim=1)
                        T.copy(acc_s, p)
                        T.wgmma_gemm(p, V_s, acc_o, clear_accum=True)  # [ROWS, D]
                        for r in T.Parallel(ROWS):  # the merge's max: the own term (if chosen) and the partial LSEs
                            flags[r] = flags_s[T.min(qpos[r], q_hi - 1) - q_lo]
                            chosen = (flags[r] & FLAG_OWN) != 0
                            mx[r] = T.if_then_else(chosen, m[r] * scale, neg_inf)
                            if (flags[r] & FLAG_PARTIALS) != 0:
                                for s in range(topk):
                                    mx[r] = T.max(mx[r], T.if_then_else(((flags[r] >> (FLAG_SLOTS + s)) & 1) != 0,
                                                                        lse_s[c % 2, r // R, s, r % R], neg_inf))
                            w[r] = T.if_then_else(chosen, T.if_then_else(
                                mx[r] != neg_inf, T.exp2((m[r] * scale - mx[r]) * _LOG2E), 0.0), 0.0)
                            l[r] = T.if_then_else(chosen, l[r] * w[r], 0.0)  # NaN * 0 stays NaN
                        T.wait_wgmma(0)
                        for r, d in T.Parallel(ROWS, D):  # a select: a left-out own term may hold NaN from its keys
                            acc_o[r, d] = T.if_then_else((flags[r] & FLAG_OWN) != 0, acc_o[r, d] * w[r], 0.0)
                        for pp in T.serial(NP):
                            k = c * NP + pp
                            T.barrier_wait(p_full[k % stages], (k // stages) & 1)
                            for s2 in T.unroll(SP if merge else 0):
                                for r in T.Parallel(ROWS):  # NaN passes: exp2(NaN) poisons the row's sum
                                    w[r] = T.if_then_else(
                                        ((flags[r] >> (FLAG_SLOTS + pp * SP + s2)) & 1) != 0,
                                        T.if_then_else(lse_s[c % 2, r // R, pp * SP + s2, r % R] != neg_inf,
                                                       T.exp2((lse_s[c % 2, r // R, pp * SP + s2, r % R] - mx[r])
                                                              * _LOG2E), 0.0), 0.0)
                                    l[r] += w[r]
                                for r, d in T.Parallel(ROWS, D):  # an unused slot's box holds garbage: a select
                                    acc_o[r, d] += T.if_then_else(
                                        w[r] > 0, w[r] * T.cast(pieces[k % stages, ((r // R) * SP + s2) * R + r % R, d],
                                                                "float32"), 0.0)
                            T.barrier_arrive(p_empty[k % stages])
                        for r in T.Parallel(ROWS):
                            if qpos[r] < q_hi and (flags[r] & FLAG_SKIP) == 0:
                                LSE[b, qpos[r], g * R + r % R] = mx[r] + T.log2(l[r]) * _LN2
                        T.barrier_arrive(q_empty[c % 2])  # the tile's Q rows and LSEs are read
                        if tma_o:
                            store_tile_o(O, b, g, qa, q_hi, fl, acc_o, l, O_s)
                        else:
                            for r, d in T.Parallel(ROWS, D):
                                if qpos[r] < q_hi and (flags[r] & FLAG_SKIP) == 0:
                                    O[b, qpos[r], g * R + r % R, d] = T.if_then_else(l[r] == 0.0, 0.0,
                                                                                     acc_o[r, d] / l[r])
                        n_live[0] += 1
                if tma_o:
                    T.tma_store_wait(0)  # the CTA's shared memory must outlive the copies

    return local_combine


# Roles and barriers are written by hand, as in the KV-outer kernel.
local_combine_program.pass_configs = {"tl.disable_warp_specialized": True, "tl.disable_thread_storage_sync": True,
                                      "tl.enable_fast_math": True}
