"""Exp-free top-k for decode (TileLang): the blocks each of a row's newest tokens attends to, from its block scores.

For query row ``s * G + g`` of batch row b (token position p = seqlens[b] - S + s, local block p // Bk) slot 0 takes
the local block and slots 1 .. k-1 the k-1 highest-scoring earlier blocks in descending score order (-1 where fewer
exist; NaN and -inf scores are never chosen; of equal scores the lower block id first), as the prefill selection.

Decode has few query rows (S * G: 4 at S = 1) and long rows of scores (8192 blocks at 1M), so a row gets a CTA of
``warps`` warps: each thread keeps its own sorted k-1 best of the blocks ``tid, tid + 32 * warps, ...`` (loads
``unroll`` at a time, so their latencies overlap); k-1 rounds of a five-step shuffle argmax over a warp's list heads
merge each warp's lists (the winning lane pops its head each round), and one more such merge in the first warp, a
lane a warp's list, gives the row's. :func:`topk_warps` sizes the CTA to about ``per_thread`` scores a thread.
The merges take k - 1 rounds twice (11-17 us at k = 16 on the H200, about twice that at 31 slots), so
:func:`decode_topk_radix_program` gives the same output by a radix select whose passes do not depend on k.
"""

import tilelang.language as T
import torch

from msa_tl.index.select import _LOWEST, _check_local_blocks, _list_insert
from msa_tl.tl_compile import compiled_kernel
from msa_tl.tunable import DECODE_DIMS, TunableProgram

# radix: decode_topk_radix_program (built, lowered and compiled for sm_90a; off until its GPU test has run)
DECODE_TOPK_DEFAULTS = dict(unroll=4, radix=False)
DECODE_TOPK_KNOBS = dict(unroll=(2, 4, 8, 16), warps=(4, 8, 16), radix=(False, True))  # tuner choices (32 warps spill at unroll 16)


def topk_warps(max_pages: int, per_thread: int = 8) -> int:
    """Warps a row's CTA takes: a power of two from 1 to 16, about ``per_thread`` scores a thread."""
    warps = 1
    while warps < 16 and warps * 32 * per_thread < max_pages:
        warps *= 2
    return warps


def ranks_before(val, blk, other_val, other_blk):
    """Whether block ``blk`` of score ``val`` comes before ``other_blk`` in a selection: the higher score, then the
    lower block (the order of the slots and of ties, in every decode selection kernel)."""
    return (val > other_val) | ((val == other_val) & (blk < other_blk))


def _lane_argmax_macros(top_val, top_blk, best_val, best_blk, slots: int):
    """(argmax, pop): the warp's best list head (higher score, then lower block) into best_val / best_blk on every
    lane by a five-step shuffle; the winning lane drops its head."""

    @T.macro
    def argmax():
        best_val[0] = top_val[0]
        best_blk[0] = top_blk[0]
        for m in T.unroll(5):
            other_val = T.shfl_xor(best_val[0], 1 << m)
            other_blk = T.shfl_xor(best_blk[0], 1 << m)
            if ranks_before(other_val, other_blk, best_val[0], best_blk[0]):
                best_val[0] = other_val
                best_blk[0] = other_blk

    @T.macro
    def pop():
        if best_val[0] > _LOWEST and top_blk[0] == best_blk[0]:
            for j in T.unroll(slots - 1):
                top_val[j] = top_val[j + 1]
                top_blk[j] = top_blk[j + 1]
            top_val[slots - 1] = _LOWEST
            top_blk[slots - 1] = -1

    return argmax, pop


def _ranked_blocks(local, local_blocks: int):
    """Inside a kernel: how many blocks a row whose newest visible block is ``local`` ranks, 0 .. local -
    local_blocks (the newer ones are forced)."""
    return local if local_blocks == 1 else T.max(local - local_blocks + 1, 0)


def decode_topk_program(groups: int, block_size: int, topk: int, warps: int = 4, unroll: int = 4,
                        local_blocks: int = 1, pdl: bool = False):
    """Scores [B, S*G, max_pages] fp32 (:mod:`msa_tl.decode.scores`), SeqLens [B] int32 -> Idx [B, S*G, topk] int32.

    With ``local_blocks`` = L the L newest blocks take slots 0 .. L-1 and the list ranks the blocks before them.
    ``pdl``: programmatic dependent launch (:mod:`msa_tl.decode.plan`)."""
    batch, n_rows, max_pages = T.dynamic("batch, n_rows, max_pages")
    slots = _check_local_blocks(topk, local_blocks)
    stride = 32 * warps

    @T.prim_func
    def decode_topk(
        Scores: T.Tensor((batch, n_rows, max_pages), "float32"),
        SeqLens: T.Tensor((batch,), "int32"),
        Idx: T.Tensor((batch, n_rows, topk), "int32"),
    ):
        with T.Kernel(n_rows, batch, threads=stride) as (row, b):
            top_val = T.alloc_local((slots,), "float32")  # the thread's best scores, descending
            top_blk = T.alloc_local((slots,), "int32")
            vals = T.alloc_local((unroll,), "float32")
            best_val = T.alloc_local((1,), "float32")
            best_blk = T.alloc_local((1,), "int32")
            warp_val = T.alloc_shared((warps, slots), "float32")  # [warps, k-1] each warp's merged list
            warp_blk = T.alloc_shared((warps, slots), "int32")
            insert = _list_insert(top_val, top_blk, slots)
            argmax, pop = _lane_argmax_macros(top_val, top_blk, best_val, best_blk, slots)
            tx = T.get_thread_binding()
            lane, warp = tx % 32, tx // 32
            if pdl:
                T.pdl_sync()  # the scan has finished
            local = (SeqLens[b] - n_rows // groups + row // groups) // block_size
            for j in T.unroll(slots):
                top_val[j] = _LOWEST
                top_blk[j] = -1
            for c in T.serial(T.ceildiv(_ranked_blocks(local, local_blocks), stride * unroll)):
                for u in T.unroll(unroll):
                    vals[u] = T.if_then_else((c * unroll + u) * stride + tx < _ranked_blocks(local, local_blocks),
                                             Scores[b, row, (c * unroll + u) * stride + tx], _LOWEST)
                for u in T.unroll(unroll):
                    insert(vals[u], (c * unroll + u) * stride + tx)
            for r in T.serial(slots):
                argmax()
                if lane == 0:
                    warp_val[warp, r] = best_val[0]
                    warp_blk[warp, r] = best_blk[0]
                pop()
            T.sync_threads()
            if warp == 0:  # a lane a warp's list, merged once more
                for j in T.unroll(slots):
                    top_val[j] = T.if_then_else(lane < warps, warp_val[T.min(lane, warps - 1), j], _LOWEST)
                    top_blk[j] = T.if_then_else(lane < warps, warp_blk[T.min(lane, warps - 1), j], -1)
                for r in T.serial(topk - local_blocks):
                    argmax()
                    if lane == 0:
                        Idx[b, row, r + local_blocks] = T.if_then_else(best_val[0] > _LOWEST, best_blk[0], -1)
                    pop()
                if lane == 0:
                    if local_blocks == 1:
                        Idx[b, row, 0] = local
                    else:
                        for j in T.serial(local_blocks):
                            Idx[b, row, j] = T.if_then_else(local >= j, local - j, -1)
            if pdl:
                T.pdl_trigger()

    return decode_topk


_RADIX = 256  # bins of a pass: one byte of the 32-bit key


def radix_capacity(max_pages: int) -> tuple[int, int]:
    """(capacity, threads) of :func:`decode_topk_radix_program` for rows of ``max_pages`` scores: the row padded to a
    power of two, held 4-16 keys a thread by 256-1024 threads (past 1024 threads x 16 keys, more keys a thread)."""
    capacity = 256
    while capacity < max_pages:
        capacity *= 2
    threads = min(1024, max(256, capacity // 16))
    return capacity, threads


def decode_topk_radix_program(groups: int, block_size: int, topk: int, capacity: int, threads: int = 256,
                              local_blocks: int = 1, pdl: bool = False):
    """:func:`decode_topk_program`'s contract (the same Idx, bit for bit) by a radix select: rows of at most
    ``capacity`` scores, ``capacity / threads`` a thread (contiguous, in registers).

    Each score becomes an order-preserving unsigned key (0 for NaN, -inf and anything at or below the lists'
    ``_LOWEST``: never chosen). Four passes, one a byte from the top, find the key of the row's (k - L)-th best
    block: a pass counts the keys that share the bytes found so far into 256 bins (a warp's equal bins add once,
    ``__match_any_sync``), and a suffix sum over the bins finds the bin that holds the rank still wanted. Then the
    keys above it and the lowest-numbered keys equal to it (a block-wide scan orders them) fill the slots, ranked by
    counting: higher score first, then the lower block. Its cost does not grow with k, where the lists' merges take
    k - 1 rounds twice. The barriers are placed by hand (TileLang's sync planner put two in every key's iteration).
    """
    batch, n_rows, max_pages = T.dynamic("batch, n_rows, max_pages")
    _check_local_blocks(topk, local_blocks)
    ranked = topk - local_blocks  # the slots the select fills
    E, warps = capacity // threads, threads // 32
    if capacity % threads or threads % 32 or not _RADIX <= threads <= 1024:
        raise ValueError(f"decode radix top-k: {threads} threads (a multiple of 32 in [256, 1024]) must divide the "
                         f"capacity {capacity}")
    u32 = "uint32"

    @T.prim_func
    def decode_topk_radix(
        Scores: T.Tensor((batch, n_rows, max_pages), "float32"),
        SeqLens: T.Tensor((batch,), "int32"),
        Idx: T.Tensor((batch, n_rows, topk), "int32"),
    ):
        with T.Kernel(n_rows, batch, threads=threads) as (row, b):
            key = T.alloc_local((E,), u32)  # this thread's keys: blocks tx * E .. tx * E + E - 1
            hist = T.alloc_shared((_RADIX,), "int32")  # [256] keys by the pass's byte
            suffix = T.alloc_shared((_RADIX + 1,), "int32")  # [257] keys in the bins from j up
            prefix = T.alloc_shared((1,), u32)  # the bytes of the wanted key found so far
            state = T.alloc_shared((2,), "int32")  # [the rank still wanted within the prefix, slots filled]
            warp_eq = T.alloc_shared((warps,), "int32")  # [warps] keys equal to the wanted one, then before each warp
            sel_key = T.alloc_shared((max(ranked, 1),), u32)  # [k - L] the chosen keys, unordered
            sel_blk = T.alloc_shared((max(ranked, 1),), "int32")  # [k - L]
            out = T.alloc_shared((topk,), "int32")  # [topk] the row's slots
            count = T.alloc_local((1,), "int32")
            carry = T.alloc_local((1,), "int32")
            seen = T.alloc_local((1,), "int32")
            slot = T.alloc_local((1,), "int32")
            take = T.alloc_local((1,), "int32")
            want = T.alloc_local((1,), "int32")  # the rank wanted: k - L, or every valid key where there are fewer
            rem = T.alloc_local((1,), "int32")
            pre = T.alloc_local((1,), u32)
            tx = T.get_thread_binding()
            lane, warp = tx % 32, tx // 32
            if pdl:
                T.pdl_sync()
            local = (SeqLens[b] - n_rows // groups + row // groups) // block_size
            n = _ranked_blocks(local, local_blocks)
            count[0] = 0
            for e in T.unroll(E):
                x = T.if_then_else(tx * E + e < n, Scores[b, row, T.min(tx * E + e, max_pages - 1)], _LOWEST)
                bits = T.reinterpret(T.if_then_else(x == 0.0, T.float32(0.0), x), u32)  # -0 ranks as +0
                key[e] = T.if_then_else(x > _LOWEST, T.if_then_else(bits >= T.uint32(0x80000000),
                                                                    bits ^ T.uint32(0xFFFFFFFF),
                                                                    bits | T.uint32(0x80000000)), T.uint32(0))
                count[0] += T.if_then_else(key[e] > T.uint32(0), 1, 0)
            if tx == 0:
                prefix[0] = T.uint32(0)
                state[0] = 0
                state[1] = 0
            if tx < topk:
                out[tx] = T.if_then_else(tx < local_blocks, T.if_then_else(local >= tx, local - tx, -1), -1)
            T.sync_threads()
            for m in T.unroll(5):  # the valid keys: a warp's sum, added once a warp
                count[0] += T.shfl_xor(count[0], 1 << m)
            if lane == 0:
                T.atomic_add(state[0], count[0])
            T.sync_threads()
            want[0] = T.min(state[0], ranked)
            rem[0] = want[0]
            for p in T.unroll(4):
                shift = 24 - 8 * p
                pre[0] = prefix[0]
                hist[tx % _RADIX] = 0
                T.sync_threads()
                for e in T.unroll(E):
                    # the keys that share the bytes found so far (two shifts: the first pass never shifts by 32)
                    live = (key[e] > T.uint32(0)) & ((((key[e] ^ pre[0]) >> T.Cast(u32, shift)) >> T.uint32(8))
                                                     == T.uint32(0))
                    bin_ = T.if_then_else(live, T.Cast("int32", (key[e] >> T.Cast(u32, shift)) & T.uint32(255)),
                                          _RADIX)
                    peers = T.match_any_sync(bin_)
                    # the lowest lane of each group of equal bins adds the group's count
                    if live & ((peers & ((T.uint32(1) << T.Cast(u32, lane)) - T.uint32(1))) == T.uint32(0)):
                        T.atomic_add(hist[bin_], T.Cast("int32", T.popcount(peers)))
                T.sync_threads()
                if tx < _RADIX:
                    suffix[tx] = hist[tx]
                if tx == 0:
                    suffix[_RADIX] = 0
                T.sync_threads()
                for step in T.unroll(8):  # suffix sums, Hillis-Steele
                    carry[0] = 0
                    if tx + (1 << step) < _RADIX:
                        carry[0] = suffix[tx + (1 << step)]
                    T.sync_threads()
                    if tx < _RADIX:
                        suffix[tx] += carry[0]
                    T.sync_threads()
                # the bin holding the wanted rank: at least that many keys from it up, fewer from the next one up
                if tx < _RADIX and rem[0] > 0:
                    if suffix[tx] >= rem[0] and suffix[tx + 1] < rem[0]:
                        prefix[0] = pre[0] | (T.Cast(u32, tx) << T.Cast(u32, shift))
                        state[0] = rem[0] - suffix[tx + 1]
                T.sync_threads()
                rem[0] = state[0]
            # prefix holds the wanted key: every key above it is taken, and rem of the keys equal to it, the
            # lowest-numbered blocks first (ordered by a block-wide scan of each thread's count of them)
            pre[0] = prefix[0]
            count[0] = 0
            for e in T.unroll(E):
                count[0] += T.if_then_else((key[e] > T.uint32(0)) & (key[e] == pre[0]), 1, 0)
            seen[0] = count[0]
            for m in T.unroll(5):  # inclusive scan over the warp's lanes
                carry[0] = T.shfl_up(seen[0], 1 << m)
                if lane >= (1 << m):
                    seen[0] += carry[0]
            if lane == 31:
                warp_eq[warp] = seen[0]
            T.sync_threads()
            if tx == 0:
                carry[0] = 0
                for w in T.serial(warps):  # exclusive over the warps
                    slot[0] = warp_eq[w]
                    warp_eq[w] = carry[0]
                    carry[0] += slot[0]
            T.sync_threads()
            seen[0] = warp_eq[warp] + seen[0] - count[0]  # equal keys in the blocks before this thread's
            for e in T.unroll(E):
                take[0] = T.if_then_else((want[0] > 0) & (key[e] > pre[0]), 1, 0)
                if (want[0] > 0) & (key[e] > T.uint32(0)) & (key[e] == pre[0]):
                    take[0] = T.if_then_else(seen[0] < rem[0], 1, 0)
                    seen[0] += 1
                if take[0] == 1:
                    slot[0] = T.atomic_add(state[1], 1, return_prev=True)
                    sel_key[slot[0]] = key[e]
                    sel_blk[slot[0]] = tx * E + e
            T.sync_threads()
            if tx < want[0]:  # rank by counting: the higher key, then the lower block, goes first
                count[0] = 0
                for i in T.serial(want[0]):
                    count[0] += T.if_then_else(ranks_before(sel_key[i], sel_blk[i], sel_key[tx], sel_blk[tx]), 1, 0)
                out[local_blocks + count[0]] = sel_blk[tx]
            T.sync_threads()
            if tx < topk:
                Idx[b, row, tx] = out[tx]
            if pdl:
                T.pdl_trigger()

    return decode_topk_radix


# barriers by hand; no shared buffer shares memory with another (their phases meet at hand-placed barriers only)
decode_topk_radix_program.pass_configs = {"tl.disable_thread_storage_sync": True, "tl.disable_shared_memory_reuse": True}


def topk_build(*, groups: int, block_size: int, topk: int, max_pages: int, **config) -> tuple:
    """(program, kwargs) of the top-k for rows of ``max_pages`` block scores: :data:`DECODE_TOPK_DEFAULTS` and
    ``warps`` (:func:`topk_warps` of the row length) under ``config``; ``radix=True``:
    :func:`decode_topk_radix_program` (same output) sized by :func:`radix_capacity` (``unroll`` / ``warps`` do not
    apply)."""
    config = {**DECODE_TOPK_DEFAULTS, **config}
    shape = dict(groups=groups, block_size=block_size, topk=topk)
    if config.pop("radix"):
        capacity, threads = radix_capacity(max_pages)
        local = {k: v for k, v in config.items() if k in ("local_blocks", "pdl")}
        return decode_topk_radix_program, dict(shape, capacity=capacity, threads=threads, **local)
    return decode_topk_program, dict(shape, **{"warps": topk_warps(max_pages), **config})


def topk_kernel(**args):
    """The compiled :func:`topk_build`."""
    program, kwargs = topk_build(**args)
    return compiled_kernel(program, **kwargs)


def decode_select(scores: torch.Tensor, seqlens: torch.Tensor, block_size: int, topk: int, **config) -> torch.Tensor:
    """scores [B, S, G, max_pages] float32 (:func:`msa_tl.decode.scores.decode_block_scores`), seqlens [B] int32 ->
    indices [B, S, G, topk] int32 (slot 0 the local block). ``config``: :data:`DECODE_TOPK_DEFAULTS` knobs and
    ``warps`` (default :func:`topk_warps` of the row length)."""
    B, S, G, max_pages = scores.shape
    indices = torch.empty((B, S, G, topk), device=scores.device, dtype=torch.int32)
    kernel = topk_kernel(groups=G, block_size=block_size, topk=topk, max_pages=max_pages, **config)
    kernel(scores.view(B, S * G, max_pages), seqlens, indices.view(B, S * G, topk))
    return indices


def _topk_defaults(shape: dict) -> dict:
    max_pages = -(-shape["seq"] // shape["block_size"])
    return dict(DECODE_TOPK_DEFAULTS, warps=topk_warps(max_pages))


def _reject_topk(config: dict, shape: dict):
    if config["radix"] and {k: config[k] for k in ("warps", "unroll")} != {
            k: _topk_defaults(shape)[k] for k in ("warps", "unroll")}:
        return "the radix select ignores warps and unroll: one point"
    return None


def _topk_units(shape: dict, config: dict) -> list:
    return [topk_build(groups=shape["groups"], block_size=shape["block_size"], topk=shape["topk"],
                       max_pages=-(-shape["seq"] // shape["block_size"]), **config)]


def _topk_trial(shape: dict, check_seq: int) -> tuple:
    from msa_tl.decode.plan import decode_trial

    return decode_trial("topk", shape, check_seq)


DECODE_TOPK_TUNING = TunableProgram(
    name="decode_topk", dims=DECODE_DIMS["topk"], defaults=_topk_defaults, knobs=DECODE_TOPK_KNOBS,
    reject=_reject_topk, compile_units=_topk_units, gpu_trial=_topk_trial)
