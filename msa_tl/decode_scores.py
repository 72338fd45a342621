"""Index scoring over a paged cache for decode (TileLang): block scores of each row's newest S tokens.

    S[b, s * G + g, blk] = index_scale * max_{j in blk, j <= p} q_idx[b, s, g] . k_idx[b, j]

for token s of row b at position p = seqlens[b] - S + s and the row's blocks blk < ceil(seqlens[b] / Bk); key j of
the row lives in its page ``block_table[b, j // Bk]`` (pages of Bk tokens: page size = block size). Entries with
no visible key are -inf, blocks past the row's end included, so the scores [B, S * G, max_pages] are a fixed shape
from the cache's maxima whatever the row lengths (a CUDA graph can hold the launch).

Decode reads bytes: every row streams its whole index-key cache (N Di 2 B: 256 MB at 1M, Di = 128) for a few query
rows, so a CTA takes ``blocks_per_cta`` consecutive blocks of one row (its pages through the block table, pipelined)
and the grid spreads a row over the GPU. A CTA's ``rows`` query rows (S * G of them, zero rows padding the wgmma
tile) are one ``[rows, Di] x [Di, Bk]`` GEMM per block, whose row max is the block score; only blocks that reach
past the first query's position are masked.
"""

import math

import tilelang.language as T
import torch

from msa_tl.tl_compile import compiled_kernel, tl_dtype

DECODE_SCORES_DEFAULTS = dict(rows=64, blocks_per_cta=8, num_stages=2, threads=128)
DECODE_SCORES_KNOBS = dict(blocks_per_cta=(4, 8, 16, 32), num_stages=(1, 2, 3, 4))  # the tuner's choices


def decode_scores_program(groups: int, index_dim: int, block_size: int, scale: float, rows: int = 64,
                          blocks_per_cta: int = 8, num_stages: int = 2, threads: int = 128, dtype: str = "bfloat16"):
    """Q [B, S*G, Di], index-key pages [num_pages, Bk, Di], BlockTable [B, max_pages] int32, SeqLens [B] int32 ->
    Scores [B, S*G, max_pages] fp32."""
    batch, n_rows, num_pages, max_pages = T.dynamic("batch, n_rows, num_pages, max_pages")
    BPC, Bk, Di = blocks_per_cta, block_size, index_dim
    neg_inf = -T.infinity("float32")

    @T.prim_func
    def decode_block_scores(
        Q: T.Tensor((batch, n_rows, index_dim), dtype),
        Kc: T.Tensor((num_pages, block_size, index_dim), dtype),
        BlockTable: T.Tensor((batch, max_pages), "int32"),
        SeqLens: T.Tensor((batch,), "int32"),
        Scores: T.Tensor((batch, n_rows, max_pages), "float32"),
    ):
        with T.Kernel(T.ceildiv(max_pages, BPC), T.ceildiv(n_rows, rows), batch, threads=threads) as (bx, by, b):
            Q_s = T.alloc_shared((rows, Di), dtype)  # [rows, Di]
            K_s = T.alloc_shared((Bk, Di), dtype)  # [Bk, Di]
            acc = T.alloc_fragment((rows, Bk), "float32")  # [rows, Bk]
            row_max = T.alloc_fragment((rows,), "float32")  # [rows]
            n = SeqLens[b]
            first = n - n_rows // groups  # position of the row's first query token
            r0, blk0 = by * rows, bx * BPC
            live = T.max(T.min(BPC, T.ceildiv(n, Bk) - blk0), 0)  # this CTA's blocks inside the row
            for r, d in T.Parallel(rows, Di):
                Q_s[r, d] = T.if_then_else(r0 + r < n_rows, Q[b, T.min(r0 + r, n_rows - 1), d], 0)
            for i in T.Pipelined(live, num_stages=num_stages):
                T.copy(Kc[BlockTable[b, blk0 + i], :, :], K_s)
                T.clear(acc)
                T.gemm(Q_s, K_s, acc, transpose_B=True)
                if (blk0 + i + 1) * Bk - 1 > first:  # the block reaches past the first query: mask by position
                    for r, c in T.Parallel(rows, Bk):
                        acc[r, c] = T.if_then_else((blk0 + i) * Bk + c <= first + (r0 + r) // groups, acc[r, c],
                                                   neg_inf)
                T.reduce_max(acc, row_max, dim=1)
                for r in T.Parallel(rows):
                    if r0 + r < n_rows:
                        Scores[b, r0 + r, blk0 + i] = row_max[r] * scale
            for r, i in T.Parallel(rows, BPC):  # blocks past the row's end
                if r0 + r < n_rows and blk0 + i < max_pages and i >= live:
                    Scores[b, r0 + r, blk0 + i] = neg_inf

    return decode_block_scores


def decode_block_scores(q_idx: torch.Tensor, k_idx_pages: torch.Tensor, block_table: torch.Tensor,
                        seqlens: torch.Tensor, block_size: int, index_scale: float | None = None,
                        **config) -> torch.Tensor:
    """Block scores of each row's newest S tokens over its cached index keys, on the GPU.

    q_idx [B, S, G, Di]; k_idx_pages [num_pages, Bk, Di] (pages of ``block_size`` tokens); block_table
    [B, max_pages] int32; seqlens [B] int32 (each >= S) -> [B, S, G, max_pages] float32, -inf where nothing is
    visible. ``config``: :data:`DECODE_SCORES_DEFAULTS` knobs.
    """
    B, S, G, Di = q_idx.shape
    if k_idx_pages.shape[1] != block_size:
        raise ValueError(f"the decode scores read pages of one block: page size {k_idx_pages.shape[1]} != "
                         f"block size {block_size}")
    scale = 1.0 / math.sqrt(Di) if index_scale is None else float(index_scale)
    scores = torch.empty((B, S * G, block_table.shape[1]), device=q_idx.device, dtype=torch.float32)
    kernel = compiled_kernel(decode_scores_program, groups=G, index_dim=Di, block_size=block_size, scale=scale,
                             dtype=tl_dtype(q_idx.dtype), **{**DECODE_SCORES_DEFAULTS, **config})
    kernel(q_idx.view(B, S * G, Di), k_idx_pages, block_table, seqlens, scores)
    return scores.view(B, S, G, -1)
