"""Exp-free top-k for decode (TileLang): the blocks each of a row's newest tokens attends to, from its block scores.

For query row ``s * G + g`` of batch row b (token position p = seqlens[b] - S + s, local block p // Bk) slot 0 takes
the local block and slots 1 .. k-1 the k-1 highest-scoring earlier blocks in descending score order (-1 where fewer
exist; NaN and -inf scores are never chosen; of equal scores the lower block id first), as the prefill selection.

Decode has few query rows (S * G: 4 at S = 1) and long rows of scores (8192 blocks at 1M), so a row gets a CTA of
``warps`` warps: each thread keeps its own sorted k-1 best of the blocks ``tid, tid + 32 * warps, ...`` (loads
``unroll`` at a time, so their latencies overlap); k-1 rounds of a five-step shuffle argmax over a warp's list heads
merge each warp's lists (the winning lane pops its head each round), and one more such merge in the first warp, a
lane a warp's list, gives the row's. :func:`topk_warps` sizes the CTA to about ``per_thread`` scores a thread.
"""

import tilelang.language as T
import torch

from msa_tl.index.select import _LOWEST, _check_local_blocks, _list_insert
from msa_tl.tl_compile import compiled_kernel

DECODE_TOPK_DEFAULTS = dict(unroll=4)
DECODE_TOPK_KNOBS = dict(unroll=(2, 4, 8, 16), warps=(4, 8, 16))  # tuner choices (32 warps spill at unroll 16)


def topk_warps(max_pages: int, per_thread: int = 8) -> int:
    """Warps a row's CTA takes: a power of two from 1 to 16, about ``per_thread`` scores a thread."""
    warps = 1
    while warps < 16 and warps * 32 * per_thread < max_pages:
        warps *= 2
    return warps


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
            if (other_val > best_val[0]) | ((other_val == best_val[0]) & (other_blk < best_blk[0])):
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


def decode_topk_program(groups: int, block_size: int, topk: int, warps: int = 4, unroll: int = 4,
                        local_blocks: int = 1):
    """Scores [B, S*G, max_pages] fp32 (:mod:`msa_tl.decode.scores`), SeqLens [B] int32 -> Idx [B, S*G, topk] int32.

    With ``local_blocks`` = L the L newest blocks take slots 0 .. L-1 and the list ranks the blocks before them."""
    batch, n_rows, max_pages = T.dynamic("batch, n_rows, max_pages")
    slots = _check_local_blocks(topk, local_blocks)
    stride = 32 * warps

    def candidates(local):  # the blocks a row ranks, 0 .. local - local_blocks (the newer ones are forced)
        return local if local_blocks == 1 else T.max(local - local_blocks + 1, 0)

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
            local = (SeqLens[b] - n_rows // groups + row // groups) // block_size
            for j in T.unroll(slots):
                top_val[j] = _LOWEST
                top_blk[j] = -1
            for c in T.serial(T.ceildiv(candidates(local), stride * unroll)):
                for u in T.unroll(unroll):
                    vals[u] = T.if_then_else((c * unroll + u) * stride + tx < candidates(local),
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

    return decode_topk


def topk_kernel(*, groups: int, block_size: int, topk: int, max_pages: int, **config):
    """The compiled top-k for rows of ``max_pages`` block scores: :data:`DECODE_TOPK_DEFAULTS` and ``warps``
    (:func:`topk_warps` of the row length) under ``config``."""
    return compiled_kernel(decode_topk_program, groups=groups, block_size=block_size, topk=topk,
                           **{"warps": topk_warps(max_pages), **DECODE_TOPK_DEFAULTS, **config})


def decode_select(scores: torch.Tensor, seqlens: torch.Tensor, block_size: int, topk: int, **config) -> torch.Tensor:
    """scores [B, S, G, max_pages] float32 (:func:`msa_tl.decode.scores.decode_block_scores`), seqlens [B] int32 ->
    indices [B, S, G, topk] int32 (slot 0 the local block). ``config``: :data:`DECODE_TOPK_DEFAULTS` knobs and
    ``warps`` (default :func:`topk_warps` of the row length)."""
    B, S, G, max_pages = scores.shape
    indices = torch.empty((B, S, G, topk), device=scores.device, dtype=torch.int32)
    kernel = topk_kernel(groups=G, block_size=block_size, topk=topk, max_pages=max_pages, **config)
    kernel(scores.view(B, S * G, max_pages), seqlens, indices.view(B, S * G, topk))
    return indices
