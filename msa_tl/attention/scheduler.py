"""The KV-outer scheduler (TileLang): reverse index from blocks to the queries that chose them.

For the queries ``t0 <= t < t0 + C`` of one chunk and every (batch, group)
``bg = b * G + g``, three programs build, with no host synchronisation (one
launch each also builds several consecutive chunks, chunk c in rows
``c * B * G + bg``):

1. ``histogram``: ``counts[bg, blk]`` = number of (query, slot) pairs choosing blk.
2. ``plan`` (one CTA per bg): ``offsets[bg, blk]``, the exclusive prefix sum of
   counts, and the work items. Block blk's list is cut into
   ``ceil(counts / item_queries)`` items of at most ``item_queries`` entries
   (hot blocks such as block 0 get several): ``items[bg, i] = (blk, start, length)``
   and ``item_count[bg]``.
3. ``scatter``: entry ``(t - t0) * topk + slot`` goes to
   ``entries[bg, offsets[bg, blk] + atomic_add(cursor[bg, blk], 1)]``.

Every attention partial has a fixed home: query t, head h, slot s. Slot s is
where t's index row holds the block, so partial outputs need no atomics.
Order inside a block's list depends on atomics, but each row is computed
independently, so results do not.

The attention grid is bounded without reading anything back:
``max_items = nblk + ceil(C * topk / item_queries)`` items per bg.
"""

import math

import tilelang.language as T
import torch

from msa_tl.tl_compile import SMEM_LIMIT, compiled_kernel

DEFAULTS = dict(item_queries=256)  # H100 sweep at 128K: 256 beats 1024 and 4096 (NOTES.md)
_THREADS = 256
# The tiled histogram and scatter: a CTA counts TILE_QUERIES queries' choices of one (batch, group) in shared
# memory, then makes one global atomic per block it saw instead of one per (query, slot). Their counters are
# compiled for a power-of-two bucket of key blocks; past MAX_TILED_BLOCKS (the scatter's two counter arrays
# would outgrow shared memory) the per-entry kernels run.
TILE_QUERIES = 1024
MAX_TILED_BLOCKS = 16384
# ids a thread of the tiled kernels loads before it counts or places them: the loads are in flight together, where a
# load then its shared atomic, one id after another, left each thread one global load's latency an id (~0.2 ms of
# the 128K schedule, NOTES.md session 30)
ENTRY_BATCH = 8
# The tiled scatter places a tile's entries in shared memory, sorted by block, then writes each block's run of them
# with consecutive threads (a sector per run, not a 4-byte store per entry, which left the scatter at ~9x its bytes:
# 0.193 ms at 128K, NOTES.md session 31), where the staging and three block arrays fit (staged_scatter_fits).
STAGED_SCATTER = True


def max_items(n_blocks: int, chunk: int, topk: int, item_queries: int) -> int:
    """Upper bound on work items per (batch, group): every block may end with one partial item."""
    return n_blocks + math.ceil(chunk * topk / item_queries)


def _entry_row(e, b, batch, chunk, groups: int, topk: int):
    """Inside a kernel: the schedule row of entry ``e`` (query-major, from the build's first query) of batch b:
    ``(c * B + b) * G + g`` for its chunk c = query // chunk and group g."""
    return (e // (groups * topk) // chunk * batch + b) * groups + (e // topk) % groups


def histogram_program(groups: int, topk: int):
    """Indices [B, N, G, topk] int32, t0, count, chunk -> counts [C*B*G, nblk] += per-block choices (zeroed by
    the caller) of queries t0 .. t0+count-1; query t0 + i belongs to chunk c = i // chunk, row (c*B + b)*G + g."""
    batch, seq, nblk, n_rows = T.dynamic("batch"), T.dynamic("seq"), T.dynamic("nblk"), T.dynamic("n_rows")
    per_token = groups * topk

    @T.prim_func
    def schedule_histogram(
        Indices: T.Tensor((batch, seq * per_token), "int32"),
        Counts: T.Tensor((n_rows, nblk), "int32"),
        t0: T.int32,
        count: T.int32,
        chunk: T.int32,
    ):
        with T.Kernel(T.ceildiv(count * per_token, _THREADS), batch, threads=_THREADS) as (bx, b):
            tx = T.get_thread_binding()
            e = bx * _THREADS + tx
            if e < count * per_token:
                blk = Indices[b, t0 * per_token + e]
                if blk >= 0:
                    T.atomic_add(Counts[_entry_row(e, b, batch, chunk, groups, topk), blk], 1)

    return schedule_histogram


def blocks_bucket(n_blocks: int) -> int:
    """The tiled kernels' counter length for ``n_blocks`` key blocks: the next power of two, at least 256."""
    return max(_THREADS, 1 << (n_blocks - 1).bit_length())


def _tile_counts_macro(groups: int, topk: int, max_blocks: int, tile_queries: int, batch):
    """Macros ``tile_counts(hist, tile, blk, Indices, t0, count, chunk, tiles, bx, bg, tx)``, the tiled kernels'
    prologue: tile [4] int32 (a local) = CTA bx's chunk c, its queries [lo, hi) (relative to the build's first
    query; never across a chunk, which has ``tiles`` tiles) and its schedule row; hist [max_blocks] (shared) =
    how many of the tile's (query, slot) entries chose each block (blk [ENTRY_BATCH], a local, its scratch); and
    ``load_entry_blocks``, which loads a batch of a thread's entries' blocks."""

    @T.macro
    def load_entry_blocks(blk, Indices, tile, t0, bg, i, tx):
        """blk [ENTRY_BATCH] = the blocks of the thread's entries (i ENTRY_BATCH + u) _THREADS + tx of the tile, -1
        past its end."""
        for u in T.unroll(ENTRY_BATCH):
            blk[u] = -1
            if tile[1] + ((i * ENTRY_BATCH + u) * _THREADS + tx) // topk < tile[2]:
                blk[u] = _tile_entry_block(Indices, tile, t0, bg, (i * ENTRY_BATCH + u) * _THREADS + tx, groups, topk)

    @T.macro
    def tile_counts(hist, tile, blk, Indices, t0, count, chunk, tiles, bx, bg, tx):
        tile[0] = T.truncdiv(bx, tiles)
        tile[1] = tile[0] * chunk + T.truncmod(bx, tiles) * tile_queries
        tile[2] = T.min(T.min(tile[1] + tile_queries, tile[0] * chunk + chunk), count)
        tile[3] = (tile[0] * batch + bg // groups) * groups + bg % groups
        for i in T.serial(max_blocks // _THREADS):
            hist[i * _THREADS + tx] = 0
        T.sync_threads()
        for i in T.serial(T.ceildiv(tile_queries * topk, _THREADS * ENTRY_BATCH)):
            load_entry_blocks(blk, Indices, tile, t0, bg, i, tx)
            for u in T.unroll(ENTRY_BATCH):
                if blk[u] >= 0:
                    T.atomic_add(hist[blk[u]], 1)
        T.sync_threads()

    return tile_counts, load_entry_blocks


@T.macro
def _reserve_ranges(hist, base, Offsets, Cursor, tile, nblk, tx, reset: bool):
    """base [max_blocks] = where the tile's range of each chosen block's list starts: one global atomic a block
    (hist [max_blocks], the tile's counts), in the tile's schedule row tile[3]; with ``reset`` each such count is
    zeroed after."""
    for i in T.serial(T.ceildiv(nblk, _THREADS)):
        if i * _THREADS + tx < nblk:
            if hist[i * _THREADS + tx] > 0:
                base[i * _THREADS + tx] = Offsets[tile[3], i * _THREADS + tx] + T.atomic_add(
                    Cursor[tile[3], i * _THREADS + tx], hist[i * _THREADS + tx], return_prev=True)
                if reset:
                    hist[i * _THREADS + tx] = 0


def _tile_entry_block(Indices, tile, t0, bg, e, groups: int, topk: int):
    """Inside a kernel: the block chosen by the tile's entry e (query tile[1] + e // topk, slot e % topk)."""
    return Indices[bg // groups, ((t0 + tile[1] + e // topk) * groups + bg % groups) * topk + e % topk]


def tiled_histogram_program(groups: int, topk: int, max_blocks: int, tile_queries: int = TILE_QUERIES):
    """:func:`histogram_program` counted a tile of queries at a time in shared memory (key blocks < max_blocks):
    grid (chunks x ``tiles`` a chunk, B * G), tiles = ceil(min(chunk, count) / tile_queries)."""
    batch, seq, nblk, n_rows = T.dynamic("batch, seq, nblk, n_rows")
    per_token = groups * topk
    tile_counts, _ = _tile_counts_macro(groups, topk, max_blocks, tile_queries, batch)

    @T.prim_func
    def schedule_histogram_tiled(
        Indices: T.Tensor((batch, seq * per_token), "int32"),
        Counts: T.Tensor((n_rows, nblk), "int32"),
        t0: T.int32,
        count: T.int32,
        chunk: T.int32,
        tiles: T.int32,
    ):
        with T.Kernel(T.ceildiv(count, chunk) * tiles, batch * groups, threads=_THREADS) as (bx, bg):
            hist = T.alloc_shared((max_blocks,), "int32")  # [max_blocks] the tile's choices of each block
            tile = T.alloc_local((4,), "int32")  # chunk, first query, end query, schedule row
            blk = T.alloc_local((ENTRY_BATCH,), "int32")  # [ENTRY_BATCH] a batch of the thread's entries' blocks
            tx = T.get_thread_binding()
            tile_counts(hist, tile, blk, Indices, t0, count, chunk, tiles, bx, bg, tx)
            for i in T.serial(T.ceildiv(nblk, _THREADS)):
                if i * _THREADS + tx < nblk:
                    if hist[i * _THREADS + tx] > 0:
                        T.atomic_add(Counts[tile[3], i * _THREADS + tx], hist[i * _THREADS + tx])

    return schedule_histogram_tiled


def staged_scatter_bytes(topk: int, max_blocks: int, tile_queries: int = TILE_QUERIES) -> int:
    """Shared memory of the staged tiled scatter: a tile's entries, three block arrays and the scan's partials."""
    return (tile_queries * topk + 3 * max_blocks + _THREADS) * 4


def staged_scatter_fits(topk: int, max_blocks: int, tile_queries: int = TILE_QUERIES) -> bool:
    return staged_scatter_bytes(topk, max_blocks, tile_queries) <= SMEM_LIMIT


def tiled_scatter_program(groups: int, topk: int, max_blocks: int, tile_queries: int = TILE_QUERIES):
    """:func:`scatter_program` a tile of queries at a time: the tile's count of each block reserves its range of
    the block's list with one global atomic, and its entries take places in that range by shared atomics."""
    batch, seq, nblk, n_rows, cap = T.dynamic("batch, seq, nblk, n_rows, cap")
    per_token = groups * topk
    tile_counts, load_entry_blocks = _tile_counts_macro(groups, topk, max_blocks, tile_queries, batch)

    @T.prim_func
    def schedule_scatter_tiled(
        Indices: T.Tensor((batch, seq * per_token), "int32"),
        Offsets: T.Tensor((n_rows, nblk), "int32"),
        Cursor: T.Tensor((n_rows, nblk), "int32"),
        Entries: T.Tensor((n_rows, cap), "int32"),
        t0: T.int32,
        count: T.int32,
        chunk: T.int32,
        tiles: T.int32,
    ):
        with T.Kernel(T.ceildiv(count, chunk) * tiles, batch * groups, threads=_THREADS) as (bx, bg):
            hist = T.alloc_shared((max_blocks,), "int32")  # [max_blocks] counts, then the tile's next place
            base = T.alloc_shared((max_blocks,), "int32")  # [max_blocks] where the tile's range of a list starts
            tile = T.alloc_local((4,), "int32")  # chunk, first query, end query, schedule row
            blk = T.alloc_local((ENTRY_BATCH,), "int32")  # [ENTRY_BATCH] a batch of the thread's entries' blocks
            pos = T.alloc_local((1,), "int32")
            tx = T.get_thread_binding()
            tile_counts(hist, tile, blk, Indices, t0, count, chunk, tiles, bx, bg, tx)
            _reserve_ranges(hist, base, Offsets, Cursor, tile, nblk, tx, True)
            T.sync_threads()
            for i in T.serial(T.ceildiv(tile_queries * topk, _THREADS * ENTRY_BATCH)):
                load_entry_blocks(blk, Indices, tile, t0, bg, i, tx)
                for u in T.unroll(ENTRY_BATCH):
                    e = (i * ENTRY_BATCH + u) * _THREADS + tx
                    if blk[u] >= 0:  # the place in a local: the atomic must run once, whatever checks its index
                        pos[0] = base[blk[u]] + T.atomic_add(hist[blk[u]], 1, return_prev=True)
                        Entries[tile[3], pos[0]] = (tile[1] + e // topk - tile[0] * chunk) * topk + e % topk

    return schedule_scatter_tiled


def staged_scatter_program(groups: int, topk: int, max_blocks: int, tile_queries: int = TILE_QUERIES):
    """:func:`tiled_scatter_program` with the places taken in shared memory: the tile's entries sorted by block
    there (an exclusive scan of the tile's counts gives each block's run), then each run copied to the tile's range
    of its block's list by consecutive threads, the block of place p found by a binary search of the runs' starts
    (:func:`staged_scatter_bytes` of shared memory). Syncs by hand."""
    batch, seq, nblk, n_rows, cap = T.dynamic("batch, seq, nblk, n_rows, cap")
    per_token = groups * topk
    tile_counts, load_entry_blocks = _tile_counts_macro(groups, topk, max_blocks, tile_queries, batch)
    if not staged_scatter_fits(topk, max_blocks, tile_queries):
        raise ValueError(f"staged scatter: {staged_scatter_bytes(topk, max_blocks, tile_queries)} B of shared memory "
                         f"> {SMEM_LIMIT} B (topk={topk}, max_blocks={max_blocks}, tile_queries={tile_queries})")
    per_thread = max_blocks // _THREADS  # a thread's blocks in the scan: max_blocks is a power of two >= _THREADS
    tile_entries = tile_queries * topk

    @T.macro
    def exclusive_scan(hist, start, part, acc, tx):
        """start [max_blocks] = the exclusive prefix sums of hist: each thread sums its per_thread blocks, the 256
        sums are scanned in shared memory (Hillis-Steele), then each thread writes its blocks' starts."""
        acc[0] = 0
        for j in T.serial(per_thread):
            acc[0] += hist[tx * per_thread + j]
        part[tx] = acc[0]
        T.sync_threads()
        for d in T.unroll(_THREADS.bit_length() - 1):
            acc[1] = part[tx] + T.if_then_else(tx >= (1 << d), part[tx - (1 << d)], 0)
            T.sync_threads()
            part[tx] = acc[1]
            T.sync_threads()
        acc[1] = part[tx] - acc[0]  # the blocks before this thread's
        T.sync_threads()  # start may share part's shared memory (TileLang reuses it once part is dead)
        for j in T.serial(per_thread):
            start[tx * per_thread + j] = acc[1]
            acc[1] += hist[tx * per_thread + j]
        T.sync_threads()

    @T.prim_func
    def schedule_scatter_staged(
        Indices: T.Tensor((batch, seq * per_token), "int32"),
        Offsets: T.Tensor((n_rows, nblk), "int32"),
        Cursor: T.Tensor((n_rows, nblk), "int32"),
        Entries: T.Tensor((n_rows, cap), "int32"),
        t0: T.int32,
        count: T.int32,
        chunk: T.int32,
        tiles: T.int32,
    ):
        with T.Kernel(T.ceildiv(count, chunk) * tiles, batch * groups, threads=_THREADS) as (bx, bg):
            hist = T.alloc_shared((max_blocks,), "int32")  # [max_blocks] counts, then each run's next place
            base = T.alloc_shared((max_blocks,), "int32")  # [max_blocks] where the tile's range of a list starts
            start = T.alloc_shared((max_blocks,), "int32")  # [max_blocks] where a block's run starts in staged
            part = T.alloc_shared((_THREADS,), "int32")  # [_THREADS] the scan's per-thread sums
            staged_s = T.alloc_shared((tile_entries,), "int32")  # [tile_queries * topk] the entries by block
            tile = T.alloc_local((4,), "int32")  # chunk, first query, end query, schedule row
            blk = T.alloc_local((ENTRY_BATCH,), "int32")  # [ENTRY_BATCH] a batch of the thread's entries' blocks
            acc = T.alloc_local((2,), "int32")
            pos = T.alloc_local((1,), "int32")
            tx = T.get_thread_binding()
            tile_counts(hist, tile, blk, Indices, t0, count, chunk, tiles, bx, bg, tx)
            exclusive_scan(hist, start, part, acc, tx)
            _reserve_ranges(hist, base, Offsets, Cursor, tile, nblk, tx, False)  # the counts stay for the scan
            for i in T.serial(max_blocks // _THREADS):
                hist[i * _THREADS + tx] = 0
            T.sync_threads()
            for i in T.serial(T.ceildiv(tile_entries, _THREADS * ENTRY_BATCH)):
                load_entry_blocks(blk, Indices, tile, t0, bg, i, tx)
                for u in T.unroll(ENTRY_BATCH):
                    e = (i * ENTRY_BATCH + u) * _THREADS + tx
                    if blk[u] >= 0:  # the place in a local: the atomic must run once, whatever checks its index
                        pos[0] = start[blk[u]] + T.atomic_add(hist[blk[u]], 1, return_prev=True)
                        staged_s[pos[0]] = (tile[1] + e // topk - tile[0] * chunk) * topk + e % topk
            T.sync_threads()
            for i in T.serial(T.ceildiv(tile_entries, _THREADS)):
                # place p's block: the last whose run starts at or before p (empty runs start where the next
                # does, so the last such run holds p; the unused blocks' runs start at the tile's count)
                if i * _THREADS + tx < start[max_blocks - 1] + hist[max_blocks - 1]:
                    acc[0] = 0
                    for step in T.unroll(max_blocks.bit_length() - 1):
                        if start[acc[0] + (max_blocks >> (step + 1))] <= i * _THREADS + tx:
                            acc[0] += max_blocks >> (step + 1)
                    Entries[tile[3], base[acc[0]] + i * _THREADS + tx - start[acc[0]]] = staged_s[i * _THREADS + tx]

    return schedule_scatter_staged


staged_scatter_program.pass_configs = {"tl.disable_thread_storage_sync": True}


def plan_program(item_queries: int):
    """Counts [B*G, nblk] -> Offsets [B*G, nblk], Items [B*G, max_items, 3], ItemCount [B*G]."""
    nblk, n_bg, n_items = T.dynamic("nblk"), T.dynamic("n_bg"), T.dynamic("n_items")

    @T.prim_func
    def schedule_plan(
        Counts: T.Tensor((n_bg, nblk), "int32"),
        Offsets: T.Tensor((n_bg, nblk), "int32"),
        Items: T.Tensor((n_bg, n_items, 3), "int32"),
        ItemCount: T.Tensor((n_bg,), "int32"),
    ):
        with T.Kernel(n_bg, threads=_THREADS) as bg:
            entry_base = T.alloc_shared((_THREADS,), "int32")  # per-thread segment sums, then their prefixes
            item_base = T.alloc_shared((_THREADS,), "int32")
            run = T.alloc_local((2,), "int32")
            tx = T.get_thread_binding()
            seg = T.ceildiv(nblk, _THREADS)
            run[0] = 0
            run[1] = 0
            for s in T.serial(seg):
                blk = tx * seg + s
                if blk < nblk:
                    run[0] += Counts[bg, blk]
                    run[1] += T.ceildiv(Counts[bg, blk], item_queries)
            entry_base[tx] = run[0]
            item_base[tx] = run[1]
            T.sync_threads()
            if tx == 0:  # exclusive scan of 256 segment sums: too small to parallelise
                run[0] = 0
                run[1] = 0
                for i in T.serial(_THREADS):
                    c, n = entry_base[i], item_base[i]
                    entry_base[i] = run[0]
                    item_base[i] = run[1]
                    run[0] += c
                    run[1] += n
                ItemCount[bg] = run[1]
            T.sync_threads()
            run[0] = entry_base[tx]
            run[1] = item_base[tx]
            for s in T.serial(seg):
                blk = tx * seg + s
                if blk < nblk:
                    count = Counts[bg, blk]
                    Offsets[bg, blk] = run[0]
                    for i in T.serial(T.ceildiv(count, item_queries)):
                        Items[bg, run[1] + i, 0] = blk
                        Items[bg, run[1] + i, 1] = run[0] + i * item_queries
                        Items[bg, run[1] + i, 2] = T.min(item_queries, count - i * item_queries)
                    run[0] += count
                    run[1] += T.ceildiv(count, item_queries)

    return schedule_plan


def scatter_program(groups: int, topk: int):
    """Place every (query, slot) entry in its block's list: Entries [C*B*G, chunk*topk], entry
    (query - chunk start) * topk + slot, rows as :func:`histogram_program`."""
    batch, seq, nblk, n_rows, cap = T.dynamic("batch, seq, nblk, n_rows, cap")
    per_token = groups * topk

    @T.prim_func
    def schedule_scatter(
        Indices: T.Tensor((batch, seq * per_token), "int32"),
        Offsets: T.Tensor((n_rows, nblk), "int32"),
        Cursor: T.Tensor((n_rows, nblk), "int32"),
        Entries: T.Tensor((n_rows, cap), "int32"),
        t0: T.int32,
        count: T.int32,
        chunk: T.int32,
    ):
        with T.Kernel(T.ceildiv(count * per_token, _THREADS), batch, threads=_THREADS) as (bx, b):
            tx = T.get_thread_binding()
            e = bx * _THREADS + tx
            if e < count * per_token:
                blk = Indices[b, t0 * per_token + e]
                if blk >= 0:
                    row = _entry_row(e, b, batch, chunk, groups, topk)
                    pos = Offsets[row, blk] + T.atomic_add(Cursor[row, blk], 1, return_prev=True)
                    Entries[row, pos] = (e // per_token % chunk) * topk + e % topk

    return schedule_scatter


def first_query_macro(tile_queries: int, topk: int):
    """Macro ``first_query(first, ent_s, tile, t0, seq)``: first[0] = the earliest query position among tile
    ``tile``'s entries of ``ent_s`` (``seq`` if none). Only a tile whose first query lies inside its key
    block needs the causal mask."""

    @T.macro
    def first_query(first, ent_s, tile, t0, seq):
        first[0] = seq
        for qi in T.unroll(tile_queries):
            if ent_s[tile * tile_queries + qi] >= 0:
                first[0] = T.min(first[0], t0 + ent_s[tile * tile_queries + qi] // topk)

    return first_query


def tma_loads_macros(heads_per_group: int, head_dim: int, block_size: int, tile_queries: int, topk: int):
    """Macros of the one producer warp that loads by TMA (each copy elects one lane; a copy per 64 columns: one
    128-byte swizzle span):

    - ``load_block(K, V, b, blk, g, K_s, V_s, buf, bars, bar)``: key block ``blk``'s K and V [Bk, D] of KV head g into
      K_s / V_s ([Bk, D], or buffer ``buf`` of [2, Bk, D] where ``buf`` is not None), completing on bars[bar];
    - ``gather_tile(ring, slot, full, ent_s, e0, Q, b, g, q_first, src)``: the queries of entries ent_s[e0:e0 +
      tile_queries] (entry (t - t0) * topk + slot; a query's R x D box of Q from row q_first + t - t0) into
      ring[slot], completing on full[slot] (the warp arrives); padding rows are left as they were (their results are
      never stored). ``src`` is a 1-element local."""
    R, D, Bk, TQ = heads_per_group, head_dim, block_size, tile_queries

    @T.macro
    def load_block(K, V, b, blk, g, K_s, V_s, buf, bars, bar):
        for h in T.unroll(D // 64):  # [Bk, 64] a copy
            if buf is None:
                T.tma_copy(K[b, blk * Bk:(blk + 1) * Bk, g, h * 64:(h + 1) * 64], K_s[:, h * 64:(h + 1) * 64],
                           barrier=bars[bar], leader_scope_threads=32)
                T.tma_copy(V[b, blk * Bk:(blk + 1) * Bk, g, h * 64:(h + 1) * 64], V_s[:, h * 64:(h + 1) * 64],
                           barrier=bars[bar], leader_scope_threads=32)
            else:
                T.tma_copy(K[b, blk * Bk:(blk + 1) * Bk, g, h * 64:(h + 1) * 64], K_s[buf, :, h * 64:(h + 1) * 64],
                           barrier=bars[bar], leader_scope_threads=32)
                T.tma_copy(V[b, blk * Bk:(blk + 1) * Bk, g, h * 64:(h + 1) * 64], V_s[buf, :, h * 64:(h + 1) * 64],
                           barrier=bars[bar], leader_scope_threads=32)

    @T.macro
    def gather_tile(ring, slot, full, ent_s, e0, Q, b, g, q_first, src):
        for qi in T.unroll(TQ):
            src[0] = ent_s[e0 + qi]
            if src[0] >= 0:  # [R, 64] a copy
                for h in T.unroll(D // 64):
                    T.tma_copy(Q[b, q_first + src[0] // topk, g * R:(g + 1) * R, h * 64:(h + 1) * 64],
                               ring[slot, qi * R:(qi + 1) * R, h * 64:(h + 1) * 64], barrier=full[slot],
                               leader_scope_threads=32)
        T.barrier_arrive(full[slot])

    return load_block, gather_tile


def tile_rows_macro(heads_per_group: int, head_dim: int, tile_queries: int, topk: int):
    """Macro ``gather_tile_rows(ent_s, tile, t0, b, g, p, src, slot, dst, X, dst2=None, X2=None)``: producer
    thread ``p`` (0..127) issues its 16-byte ``cp.async`` pieces of tile ``tile``'s rows (``tile_queries``
    entries of ``ent_s`` x R heads; each query's rows are one contiguous R x D box of X [B, N, Hq, D]) into
    dst[slot] [rows, D], and the same rows of X2 into dst2[slot] when given. Rows of padding entries (-1) are
    zero-filled; ``src`` is a 1-element local."""
    R, D = heads_per_group, head_dim

    @T.macro
    def gather_tile_rows(ent_s, tile, t0, b, g, p, src, slot, dst, X, dst2=None, X2=None):
        for j in T.unroll(tile_queries * R * D // 8 // 128):
            src[0] = ent_s[tile * tile_queries + (j * 128 + p) // (D // 8) // R]
            T.ptx_cp_async(
                T.access_ptr(dst[slot, (j * 128 + p) // (D // 8), p % (D // 8) * 8], "w", 8),
                T.access_ptr(X[b, t0 + T.max(src[0], 0) // topk, g * R + (j * 128 + p) // (D // 8) % R,
                               p % (D // 8) * 8], "r", 8),
                8, src[0] >= 0)
            if dst2 is not None:
                T.ptx_cp_async(
                    T.access_ptr(dst2[slot, (j * 128 + p) // (D // 8), p % (D // 8) * 8], "w", 8),
                    T.access_ptr(X2[b, t0 + T.max(src[0], 0) // topk, g * R + (j * 128 + p) // (D // 8) % R,
                                    p % (D // 8) * 8], "r", 8),
                    8, src[0] >= 0)

    return gather_tile_rows


def work_item(Items, ItemCount, bg, item):
    """Inside a kernel: (key block, first entry, entry count) of CTA ``item`` of ``bg``; all 0 past the item count."""
    live = item < ItemCount[bg]
    return tuple(T.if_then_else(live, Items[bg, item, c], 0) for c in range(3))


class Schedule:
    """Device buffers of the schedules of ``chunks`` query chunks of ``chunk`` queries (reused across builds).

    One build fills them all in three launches (histogram, plan, scatter; ``tiled``: the tiled histogram and scatter
    where the key blocks fit their shared counters); :meth:`part` gives chunk c's (items, item_count, entries), the
    attention kernels' arguments. With ``chunks`` = 1 the buffers are
    rebuilt per chunk and take ~``B * G * chunk * topk`` int32; a whole-sequence build holds N's.
    """

    def __init__(self, batch, groups, n_blocks, chunk, topk, item_queries, device, chunks: int = 1,
                 tiled: bool = True, tile_queries: int = TILE_QUERIES):
        n_rows = chunks * batch * groups
        self.tiled, self.tile_queries = tiled, tile_queries
        self.n_bg, self.chunk, self.chunks = batch * groups, chunk, chunks
        self.item_queries = item_queries
        self.max_items = max_items(n_blocks, chunk, topk, item_queries)
        self.counts = torch.empty((n_rows, n_blocks), device=device, dtype=torch.int32)
        self.cursor = torch.empty((n_rows, n_blocks), device=device, dtype=torch.int32)
        self.offsets = torch.empty((n_rows, n_blocks), device=device, dtype=torch.int32)
        self.items = torch.empty((n_rows, self.max_items, 3), device=device, dtype=torch.int32)
        self.item_count = torch.empty((n_rows,), device=device, dtype=torch.int32)
        self.entries = torch.empty((n_rows, chunk * topk), device=device, dtype=torch.int32)

    def build(self, indices, t0: int, count: int) -> "Schedule":
        """Fill the buffers for queries t0 .. t0+count-1 of ``indices`` [B, N, G, topk] (int32, contiguous):
        chunk c holds queries t0 + c * chunk onwards, at most ``chunks * chunk`` queries in all."""
        if count > self.chunks * self.chunk:
            raise ValueError(f"{count} queries exceed {self.chunks} chunk(s) of {self.chunk}")
        B, N, G, topk = indices.shape
        flat = indices.view(B, N * G * topk)
        self.counts.zero_()
        self.cursor.zero_()
        n_blocks = self.counts.shape[1]
        if self.tiled and n_blocks <= MAX_TILED_BLOCKS:
            knobs = dict(groups=G, topk=topk, max_blocks=blocks_bucket(n_blocks), tile_queries=self.tile_queries)
            staged = STAGED_SCATTER and staged_scatter_fits(topk, knobs["max_blocks"], self.tile_queries)
            histogram, scatter = (compiled_kernel(tiled_histogram_program, **knobs),
                                  compiled_kernel(staged_scatter_program if staged else tiled_scatter_program, **knobs))
            tiles = [math.ceil(min(self.chunk, count) / self.tile_queries)]  # the tiled kernels' last argument
        else:
            histogram, scatter = (compiled_kernel(histogram_program, groups=G, topk=topk),
                                  compiled_kernel(scatter_program, groups=G, topk=topk))
            tiles = []
        histogram(flat, self.counts, t0, count, self.chunk, *tiles)
        compiled_kernel(plan_program, item_queries=self.item_queries)(self.counts, self.offsets, self.items, self.item_count)
        scatter(flat, self.offsets, self.cursor, self.entries, t0, count, self.chunk, *tiles)
        return self

    def part(self, c: int) -> tuple:
        """(items, item_count, entries) of chunk c of the last build."""
        rows = slice(c * self.n_bg, (c + 1) * self.n_bg)
        return self.items[rows], self.item_count[rows], self.entries[rows]
