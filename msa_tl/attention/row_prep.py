"""The forward's bookkeeping of the index rows before the schedule: which query tiles share their selection, the
KV-outer path's copy of the indices, and the local combine's RowFlags, in one pass (TileLang).

:func:`prepare_rows` is what :func:`msa_tl.attention.kv_outer.sparse_attention_forward` runs. By torch ops
(``fused=False``) it is :func:`msa_tl.attention.shared_tiles.sharing_tiles`, ``shared_rows``,
``without_shared_tiles``, :func:`msa_tl.attention.accumulate.split_own_block` and
:func:`msa_tl.attention.local_combine.row_flags`: ~12 launches, ~0.35 ms of GPU time at 128K (paper shape, H100)
and the host's Python between them (NOTES.md, session 29). :func:`row_prep_program` does the same in one launch: a
thread per (batch, tile, KV head) compares the tile's index rows with its first (the tile is shared where all are
equal and it is whole), then writes each row's KV-outer copy (-1 for a shared tile's rows and, for the local
combine, for the query's own block) and its flags. It reads the indices twice (the second time from the L2) and
writes them once: ~64 MB at 128K, ~0.03 ms at the copy rate; measured 0.117 ms on the H100 (a warp's loads are 32
rows 2 KB apart, NOTES.md session 30). :func:`row_prep_warps_program` gives a warp to each tile instead.
"""

import tilelang.language as T
import torch

from msa_tl.attention.accumulate import split_own_block
from msa_tl.attention.local_combine import FLAG_OWN, FLAG_PARTIALS, FLAG_SKIP, FLAG_SLOTS, MAX_TOPK, row_flags
from msa_tl.attention.shared_tiles import shared_rows, sharing_tiles, tile_queries, without_shared_tiles
from msa_tl.tl_compile import compiled_kernel

ROW_PREP_THREADS = 128
ROW_PREP_WARPS = 4  # (b, tile, g) units a CTA of row_prep_warps_program
FUSED_CHOICES = (False, True, "warps")  # prepare_rows' fused: torch ops, a thread a tile, a warp a tile


def row_prep_builder(fused: bool | str):
    """The program of ``prepare_rows(..., fused=fused)`` (``fused`` True or "warps")."""
    return row_prep_warps_program if fused == "warps" else row_prep_program


def _tile_queries_checked(topk: int, heads_per_group: int, block_size: int, local: bool) -> int:
    """The tile's query count, once the local combine's flags are known to hold topk slot bits."""
    if local and topk > MAX_TOPK:
        raise ValueError(f"row prep: topk <= {MAX_TOPK} with the local combine's flags, got {topk}")
    return tile_queries(heads_per_group, block_size)


def _kept_block(local: bool):
    """(block, same, own) -> the block a row keeps for the KV-outer path (-1: none): not a shared tile's, and with the
    local combine not the query's own block."""
    def kept_block(block, same, own):
        kept = T.if_then_else(same != 0, -1, block)
        return T.if_then_else(own, -1, kept) if local else kept
    return kept_block


def row_prep_program(groups: int, topk: int, heads_per_group: int, block_size: int, tiles: bool, local: bool,
                     threads: int = ROW_PREP_THREADS):
    """Indices [B, N, G, topk] int32 (canonical) -> Shared [B, ceil(N / TQ), G] int32 (1 where the whole tile's
    TQ = ``tile_queries(R, Bk)`` queries have equal rows; the ragged tail tile 0; untouched without ``tiles``),
    KvIndices [B, N, G, topk] int32 (a shared tile's rows all -1; with ``local`` each query's own block t // Bk too) and
    RowFlags [B, N, G] int32 (:func:`msa_tl.attention.local_combine.row_flags`; written only with ``local``).
    Grid: a thread per (b, tile, g), g fastest, the ragged tail tile included (never shared)."""
    TQ = _tile_queries_checked(topk, heads_per_group, block_size, local)
    batch, seq, n_tiles = T.dynamic("batch, seq, n_tiles")
    kept_block = _kept_block(local)

    @T.prim_func
    def row_prep(
        Indices: T.Tensor((batch, seq, groups, topk), "int32"),
        Shared: T.Tensor((batch, n_tiles, groups), "int32"),
        KvIndices: T.Tensor((batch, seq, groups, topk), "int32"),
        RowFlags: T.Tensor((batch, seq, groups), "int32"),
    ):
        with T.Kernel(T.ceildiv(batch * T.ceildiv(seq, TQ) * groups, threads), threads=threads) as bx:
            same = T.alloc_local((1,), "int32")  # the tile's rows all equal its first
            own_chosen = T.alloc_local((1,), "int32")
            slots = T.alloc_local((1,), "int32")  # a bit a slot that keeps a block
            tx = T.get_thread_binding()
            u = bx * threads + tx
            g = u % groups
            t = (u // groups) % T.ceildiv(seq, TQ)
            b = u // (groups * T.ceildiv(seq, TQ))
            if b < batch:
                same[0] = 0
                if tiles:
                    if (t + 1) * TQ <= seq:
                        same[0] = 1
                        for qi in T.serial(1, TQ):
                            for s in T.unroll(topk):
                                if Indices[b, t * TQ + qi, g, s] != Indices[b, t * TQ, g, s]:
                                    same[0] = 0
                    Shared[b, t, g] = same[0]
                for qi in T.serial(TQ):
                    if t * TQ + qi < seq:
                        own_chosen[0] = 0
                        slots[0] = 0
                        for s in T.unroll(topk):
                            block = Indices[b, t * TQ + qi, g, s]
                            own = block == (t * TQ + qi) // block_size
                            kept = kept_block(block, same[0], own)
                            KvIndices[b, t * TQ + qi, g, s] = kept
                            if local:
                                if same[0] == 0 and own:
                                    own_chosen[0] = 1
                                if kept >= 0:
                                    slots[0] = slots[0] | (1 << (FLAG_SLOTS + s))
                        if local:
                            RowFlags[b, t * TQ + qi, g] = T.if_then_else(
                                same[0] != 0, FLAG_SKIP,
                                own_chosen[0] * FLAG_OWN | T.if_then_else(slots[0] != 0, FLAG_PARTIALS, 0) | slots[0])

    return row_prep


def row_prep_warps_program(groups: int, topk: int, heads_per_group: int, block_size: int, tiles: bool, local: bool,
                           warps: int = ROW_PREP_WARPS):
    """:func:`row_prep_program`'s tensors and results, a warp per (b, tile, g): its lanes take the tile's TQ x topk
    ids in order (a warp's loads are the tile's rows, 64 contiguous bytes each at the paper's shape, where a thread
    per tile reads 32 rows 2 KB apart), compare each with the tile's first row, and vote in shared memory; each
    query's own-block flag and slot bits are gathered there (a bit a slot: an atomic add is an or). Grid: ``warps``
    (b, tile, g) a CTA, g fastest."""
    TQ = _tile_queries_checked(topk, heads_per_group, block_size, local)
    batch, seq, n_tiles = T.dynamic("batch, seq, n_tiles")
    per_lane = T.ceildiv(TQ * topk, 32)  # ids a lane takes
    qs_lane = T.ceildiv(TQ, 32)  # queries a lane writes the flags of
    kept_block = _kept_block(local)

    @T.prim_func
    def row_prep_warps(
        Indices: T.Tensor((batch, seq, groups, topk), "int32"),
        Shared: T.Tensor((batch, n_tiles, groups), "int32"),
        KvIndices: T.Tensor((batch, seq, groups, topk), "int32"),
        RowFlags: T.Tensor((batch, seq, groups), "int32"),
    ):
        with T.Kernel(T.ceildiv(batch * T.ceildiv(seq, TQ) * groups, warps), threads=32 * warps) as bx:
            differs = T.alloc_shared((warps,), "int32")  # [warps] a row of the warp's tile differs from its first
            own_s = T.alloc_shared((warps, TQ), "int32")  # [warps, TQ] the query chose its own block
            slots_s = T.alloc_shared((warps, TQ), "int32")  # [warps, TQ] a bit a slot that keeps a block
            same = T.alloc_local((1,), "int32")
            tx = T.get_thread_binding()
            w, lane = tx // 32, tx % 32
            u = bx * warps + w
            g = u % groups
            t = (u // groups) % T.ceildiv(seq, TQ)
            b = u // (groups * T.ceildiv(seq, TQ))
            differs[w] = 0
            for j in T.serial(qs_lane):
                if j * 32 + lane < TQ:
                    own_s[w, j * 32 + lane] = 0
                    slots_s[w, j * 32 + lane] = 0
            T.sync_threads()
            if tiles:
                for i in T.serial(per_lane):
                    e = i * 32 + lane
                    if b < batch and (t + 1) * TQ <= seq and e < TQ * topk:
                        if Indices[b, t * TQ + e // topk, g, e % topk] != Indices[b, t * TQ, g, e % topk]:
                            differs[w] = 1
                T.sync_threads()
            same[0] = 0
            if tiles:
                same[0] = T.if_then_else((t + 1) * TQ <= seq and differs[w] == 0, 1, 0)
                if b < batch and lane == 0:
                    Shared[b, t, g] = same[0]
            for i in T.serial(per_lane):
                e = i * 32 + lane
                if b < batch and e < TQ * topk and t * TQ + e // topk < seq:
                    block = Indices[b, t * TQ + e // topk, g, e % topk]
                    own = block == (t * TQ + e // topk) // block_size
                    kept = kept_block(block, same[0], own)
                    KvIndices[b, t * TQ + e // topk, g, e % topk] = kept
                    if local:
                        if same[0] == 0 and own:
                            own_s[w, e // topk] = 1
                        if kept >= 0:
                            T.atomic_add(slots_s[w, e // topk], 1 << (FLAG_SLOTS + e % topk))
            if local:
                T.sync_threads()
                for j in T.serial(qs_lane):
                    if b < batch and j * 32 + lane < TQ and t * TQ + j * 32 + lane < seq:
                        RowFlags[b, t * TQ + j * 32 + lane, g] = T.if_then_else(
                            same[0] != 0, FLAG_SKIP,
                            own_s[w, j * 32 + lane] * FLAG_OWN
                            | T.if_then_else(slots_s[w, j * 32 + lane] != 0, FLAG_PARTIALS, 0)
                            | slots_s[w, j * 32 + lane])

    return row_prep_warps


# the syncs are written by hand: the vote's and the flags' shared words race benignly (every writer writes the same
# value, or adds its own bit), so the loops over a tile's ids need none
row_prep_warps_program.pass_configs = {"tl.disable_thread_storage_sync": True}


def prepare_rows(indices: torch.Tensor, heads_per_group: int, block_size: int, tiles: bool, local: bool,
                 fused: bool | str = False) -> tuple:
    """indices [B, N, G, topk] int32 (canonical: :func:`msa_tl.ops.validation.canonical_indices`) -> (shared
    [B, N // TQ, G] int32 or None without ``tiles``, the KV-outer indices [B, N, G, topk] (a shared tile's rows -1;
    with ``local`` each query's own block -1 too), RowFlags [B, N, G] int32 or None without ``local``), by torch
    ops or in one launch: ``fused=True`` by :func:`row_prep_program` (a thread a tile), ``fused="warps"`` by
    :func:`row_prep_warps_program` (a warp a tile)."""
    if fused not in FUSED_CHOICES:
        raise ValueError(f"prepare_rows: fused is one of {FUSED_CHOICES}, got {fused!r}")
    if not (tiles or local):
        return None, indices, None
    B, N, G, topk = indices.shape
    if fused:
        TQ = tile_queries(heads_per_group, block_size)
        shared = torch.empty((B, -(-N // TQ), G), device=indices.device, dtype=torch.int32)
        kv_indices = torch.empty_like(indices)
        flags = torch.empty((B, N, G), device=indices.device, dtype=torch.int32)
        kernel = compiled_kernel(row_prep_builder(fused), groups=G, topk=topk, heads_per_group=heads_per_group,
                                 block_size=block_size, tiles=bool(tiles), local=bool(local))
        kernel(indices, shared, kv_indices, flags)
        return (shared[:, : N // TQ].contiguous() if tiles else None), kv_indices, (flags if local else None)
    shared, rows, kv_indices, flags = None, None, indices, None
    if tiles:
        shared = sharing_tiles(indices, heads_per_group, block_size)
        rows = shared_rows(shared, N, heads_per_group, block_size)  # [B, N, G]
        kv_indices = without_shared_tiles(indices, rows)
    if local:
        kv_indices, own_chosen = split_own_block(kv_indices, block_size)
        flags = row_flags(kv_indices, own_chosen, rows)
    return shared, kv_indices, flags
