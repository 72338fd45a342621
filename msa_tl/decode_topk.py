"""Exp-free top-k for decode (TileLang): the blocks each of a row's newest tokens attends to, from its block scores.

For query row ``s * G + g`` of batch row b (token position p = seqlens[b] - S + s, local block p // Bk) slot 0 takes
the local block and slots 1 .. k-1 the k-1 highest-scoring earlier blocks in descending score order (-1 where fewer
exist; NaN and -inf scores are never chosen; of equal scores the lower block id first), as the prefill selection.

Decode has few query rows (S * G) and long rows of scores (8192 blocks at 1M), so a row gets a warp rather than
a thread: each lane keeps its own sorted k-1 best of the blocks ``lane, lane + 32, ...`` (loads ``unroll`` at a
time, so their latencies overlap), then k-1 rounds of a five-step shuffle argmax over the lanes' heads give the
row's list, the winning lane popping its head each round.
"""

import tilelang.language as T
import torch

from msa_tl.index_topk import _LOWEST, _list_insert
from msa_tl.tl_compile import compiled_kernel

DECODE_TOPK_DEFAULTS = dict(rows_per_cta=4, unroll=8)


def decode_topk_program(groups: int, block_size: int, topk: int, rows_per_cta: int = 4, unroll: int = 8):
    """Scores [B, S*G, max_pages] fp32 (:mod:`msa_tl.decode_scores`), SeqLens [B] int32 -> Idx [B, S*G, topk] int32."""
    batch, n_rows, max_pages = T.dynamic("batch, n_rows, max_pages")
    slots = max(topk - 1, 1)

    @T.prim_func
    def decode_topk(
        Scores: T.Tensor((batch, n_rows, max_pages), "float32"),
        SeqLens: T.Tensor((batch,), "int32"),
        Idx: T.Tensor((batch, n_rows, topk), "int32"),
    ):
        with T.Kernel(T.ceildiv(n_rows, rows_per_cta), batch, threads=32 * rows_per_cta) as (bx, b):
            top_val = T.alloc_local((slots,), "float32")  # the lane's best scores, descending
            top_blk = T.alloc_local((slots,), "int32")
            vals = T.alloc_local((unroll,), "float32")
            best_val = T.alloc_local((1,), "float32")
            best_blk = T.alloc_local((1,), "int32")
            insert = _list_insert(top_val, top_blk, slots)
            tx = T.get_thread_binding()
            lane, row = tx % 32, bx * rows_per_cta + tx // 32  # a warp a row
            local = (SeqLens[b] - n_rows // groups + T.min(row, n_rows - 1) // groups) // block_size
            for j in T.serial(slots):
                top_val[j] = _LOWEST
                top_blk[j] = -1
            if row < n_rows:
                for c in T.serial(T.ceildiv(local, 32 * unroll)):
                    for u in T.unroll(unroll):
                        vals[u] = T.if_then_else((c * unroll + u) * 32 + lane < local,
                                                 Scores[b, row, (c * unroll + u) * 32 + lane], _LOWEST)
                    for u in T.unroll(unroll):
                        insert(vals[u], (c * unroll + u) * 32 + lane)
            for r in T.serial(topk - 1):
                best_val[0] = top_val[0]
                best_blk[0] = top_blk[0]
                for m in T.unroll(5):  # argmax over the warp's heads: higher score, then lower block
                    other_val = T.shfl_xor(best_val[0], 1 << m)
                    other_blk = T.shfl_xor(best_blk[0], 1 << m)
                    if (other_val > best_val[0]) | ((other_val == best_val[0]) & (other_blk < best_blk[0])):
                        best_val[0] = other_val
                        best_blk[0] = other_blk
                if lane == 0 and row < n_rows:
                    Idx[b, row, r + 1] = T.if_then_else(best_val[0] > _LOWEST, best_blk[0], -1)
                if best_val[0] > _LOWEST and top_blk[0] == best_blk[0]:  # the winning lane pops its head
                    for j in T.unroll(slots - 1):
                        top_val[j] = top_val[j + 1]
                        top_blk[j] = top_blk[j + 1]
                    top_val[slots - 1] = _LOWEST
                    top_blk[slots - 1] = -1
            if lane == 0 and row < n_rows:
                Idx[b, row, 0] = local

    return decode_topk


def decode_select(scores: torch.Tensor, seqlens: torch.Tensor, block_size: int, topk: int, **config) -> torch.Tensor:
    """scores [B, S, G, max_pages] float32 (:func:`msa_tl.decode_scores.decode_block_scores`), seqlens [B] int32 ->
    indices [B, S, G, topk] int32 (slot 0 the local block). ``config``: :data:`DECODE_TOPK_DEFAULTS` knobs."""
    B, S, G, max_pages = scores.shape
    indices = torch.empty((B, S, G, topk), device=scores.device, dtype=torch.int32)
    kernel = compiled_kernel(decode_topk_program, groups=G, block_size=block_size, topk=topk,
                             **{**DECODE_TOPK_DEFAULTS, **config})
    kernel(scores.view(B, S * G, max_pages), seqlens, indices.view(B, S * G, topk))
    return indices
