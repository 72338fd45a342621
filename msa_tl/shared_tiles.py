"""Query tiles that share their selection (TileLang): attended Q-outer, with no partials.

A tile is ``128 / R`` consecutive queries (R = Hq / G heads each: 128 rows, two warpgroups' wgmma M tiles;
64 rows where a key block holds fewer) of one key block and one KV group. Where all its queries chose the same blocks in the same slot order (a torch compare of
their index rows, no host sync), :func:`tile_attention_program` attends them as a flash-attention tile:
Q [64, D] against each chosen block's K/V [Bk, D] (software-pipelined loads, mostly L2 hits since
neighbouring tiles choose alike), online softmax, causal inside the tile's own block, and writes O and
LSE final. The KV-outer path never sees those rows (their index rows are -1 in the copy it schedules), so
the tile's (query, slot) pairs cost no partial writes and reads: Q once and O once instead of k partials.
"""

import tilelang.language as T
import torch

from msa_tl.tl_compile import compiled_kernel, tl_dtype
from msa_tl.tuning.cache import tuned_config

TILE_DEFAULTS = dict(num_stages=2)
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


def without_shared_tiles(indices: torch.Tensor, shared: torch.Tensor, heads_per_group: int,
                         block_size: int) -> torch.Tensor:
    """A copy of indices with every row of a shared tile set to -1 (what the KV-outer path is left with)."""
    B, N, G, topk = indices.shape
    TQ = tile_queries(heads_per_group, block_size)
    mask = torch.zeros((B, N, G), dtype=torch.bool, device=indices.device)
    mask[:, : shared.shape[1] * TQ] = shared.bool().repeat_interleave(TQ, dim=1)
    return torch.where(mask[..., None], -1, indices).contiguous()


def tile_attention_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float,
                           num_stages: int = 2, dtype: str = "bfloat16"):
    """Q [B, N, Hq, D], K/V [B, N, G, D], Indices [B, N, G, topk], Shared [B, N // TQ, G] -> O, LSE of the shared
    tiles' rows (other rows untouched). Each tile attends the blocks of its first query's row."""
    batch, seq, n_tiles = T.dynamic("batch, seq, n_tiles")
    R, D, Bk = heads // groups, head_dim, block_size
    rows = tile_rows(R, Bk)
    assert rows % R == 0 and Bk % (rows // R) == 0, "a tile's queries lie in one key block"
    TQ = rows // R
    neg_inf = -T.infinity("float32")
    scale_log2 = scale * _LOG2E

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
                            acc_s[i, c] = T.if_then_else(blk * Bk + c <= first + i // R, acc_s[i, c] * scale_log2,
                                                         neg_inf)
                        T.copy(row_max, prev_max)
                        T.reduce_max(acc_s, row_max, dim=1, clear=False)
                        for i in T.Parallel(rows):  # no key yet (-inf): keep the rescale finite
                            rescale[i] = T.if_then_else(row_max[i] == neg_inf, 1.0, T.exp2(prev_max[i] - row_max[i]))
                        for i, c in T.Parallel(rows, Bk):
                            acc_s[i, c] = T.if_then_else(row_max[i] == neg_inf, 0.0, T.exp2(acc_s[i, c] - row_max[i]))
                        T.reduce_sum(acc_s, block_sum, dim=1)
                        for i in T.Parallel(rows):
                            row_sum[i] = row_sum[i] * rescale[i] + block_sum[i]
                        for i, d in T.Parallel(rows, D):
                            acc_o[i, d] *= rescale[i]
                        T.copy(acc_s, acc_p)
                        T.gemm(acc_p, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
                for i, d in T.Parallel(rows, D):  # nothing chosen: o = 0, lse = -inf
                    O_s[i, d] = T.if_then_else(row_sum[i] == 0.0, 0.0, acc_o[i, d] / row_sum[i])
                for i, d in T.Parallel(rows, D):
                    O[b, first + i // R, g * R + i % R, d] = O_s[i, d]
                for i in T.Parallel(rows):
                    LSE[b, first + i // R, g * R + i % R] = T.if_then_else(
                        row_sum[i] == 0.0, neg_inf, (row_max[i] + T.log2(row_sum[i])) * _LN2)

    return tile_attention


# TileLang 0.1.15's warp-specialised lowering gave wrong rows for the Q-outer kernel's loop at Bk = 64
# (NOTES.md); this loop is the same, so it is compiled without it.
tile_attention_program.pass_configs = {"tl.disable_warp_specialized": True}


def shared_tile_attention(q, k, v, indices, shared, block_size: int, scale: float, o, lse, config=None):
    """Attend the tiles ``shared`` marks (:func:`sharing_tiles`) into o [B, N, Hq, D] and lse [B, N, Hq]."""
    B, N, Hq, D = q.shape
    G, topk = k.shape[2], indices.shape[3]
    shape = dict(groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk, seq=N)
    config = {**tuned_config("tile_attention", shape, TILE_DEFAULTS, q.device), **(config or {})}
    kernel = compiled_kernel(tile_attention_program, groups=G, heads=Hq, head_dim=D, block_size=block_size,
                             topk=topk, scale=scale, dtype=tl_dtype(q.dtype), **config)
    if shared.shape[1]:
        kernel(q, k, v, indices, shared, o, lse)
    return o, lse
