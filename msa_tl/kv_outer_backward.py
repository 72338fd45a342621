"""Main-branch backward (TileLang): the delta pre-pass and a KV-outer pass for dQ, dK and dV.

With P = softmax of the scaled scores over the chosen keys, delta = rowsum(dO * O) - dlse:

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q

1. :func:`delta_program` reads O and dO once per (query, head) row and writes that row's
   (lse * log2 e, delta).
2. :func:`kv_outer_backward_program` runs one CTA per work item of :mod:`msa_tl.scheduler`, built
   over the whole sequence: a key block and up to ``item_queries`` of the (query, slot) entries
   that chose it. It loads K/V[blk] once and walks the item's queries in tiles of
   ``block_rows / R`` queries x R heads.
   - Everything is computed key-major, S^T = K Q^T [Bk, rows], so P^T and dS^T stay in registers
     as the A operand of dV += P^T dO and dK += dS^T Q.
   - dQ = dS K goes through shared memory and is added to an fp32 dQ with atomics, one add per
     (query, head, chosen block) row.
   - dK and dV accumulate in registers for the whole item. Hot blocks are split into several
     items, so each item adds its finished dK/dV once with fp32 atomics. That is Bk * D adds per
     item, not per query.
3. The fp32 gradients are cast to the input dtype.
Causal masking happens only in the query's own block, and -1 slots are never scheduled.
"""

import math

import tilelang.language as T
import torch

from msa_tl.scheduler import Schedule, work_item
from msa_tl.tl_compile import compiled_kernel, tl_dtype
from msa_tl.tuning.cache import tuned_config

DELTA_DEFAULTS = dict(rows=64, threads=128)
BACKWARD_DEFAULTS = dict(block_rows=64, threads=256)  # Bk = 128: 227 registers, no spills (ptxas, sm_90a)
BACKWARD_ITEM_QUERIES = 1024
_LOG2E = 1.4426950408889634


def default_config(block_size: int) -> dict:
    """BACKWARD_DEFAULTS, with at most Bk / 16 warps: the key-major MMAs give each warp 16 of the Bk rows."""
    return dict(BACKWARD_DEFAULTS, threads=min(BACKWARD_DEFAULTS["threads"], 2 * block_size))


def delta_program(head_dim: int, rows: int = 64, threads: int = 128, dtype: str = "bfloat16"):
    """O, dO [n_rows, D], LSE, dLSE [n_rows] (fp32) -> Stats [n_rows, 2] = (lse * log2 e, rowsum(dO * O) - dlse)."""
    n_rows = T.dynamic("n_rows")

    @T.prim_func
    def attention_backward_delta(
        O: T.Tensor((n_rows, head_dim), dtype),
        dO: T.Tensor((n_rows, head_dim), dtype),
        LSE: T.Tensor((n_rows,), "float32"),
        dLSE: T.Tensor((n_rows,), "float32"),
        Stats: T.Tensor((n_rows, 2), "float32"),
    ):
        with T.Kernel(T.ceildiv(n_rows, rows), threads=threads) as bx:
            o = T.alloc_fragment((rows, head_dim), dtype)
            do = T.alloc_fragment((rows, head_dim), dtype)
            prod = T.alloc_fragment((rows, head_dim), "float32")
            delta = T.alloc_fragment((rows,), "float32")
            T.copy(O[bx * rows:(bx + 1) * rows, :], o)
            T.copy(dO[bx * rows:(bx + 1) * rows, :], do)
            for r, d in T.Parallel(rows, head_dim):
                prod[r, d] = T.cast(o[r, d], "float32") * T.cast(do[r, d], "float32")
            T.reduce_sum(prod, delta, dim=1)
            for r in T.Parallel(rows):
                if bx * rows + r < n_rows:
                    Stats[bx * rows + r, 0] = LSE[bx * rows + r] * _LOG2E
                    Stats[bx * rows + r, 1] = delta[r] - dLSE[bx * rows + r]

    return attention_backward_delta


def kv_outer_backward_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float,
                              block_rows: int = 64, threads: int = 256, dtype: str = "bfloat16"):
    """Q, dO [B, N, Hq, D], K/V [B, N, G, D], Stats [B, N, Hq, 2], the schedule -> adds into fp32 dQ, dK, dV."""
    batch, seq, n_bg, n_items, cap = T.dynamic("batch, seq, n_bg, n_items, cap")
    R = heads // groups
    tile_queries = block_rows // R
    scale_log2 = scale * _LOG2E

    @T.prim_func
    def kv_outer_attention_backward(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        V: T.Tensor((batch, seq, groups, head_dim), dtype),
        dO: T.Tensor((batch, seq, heads, head_dim), dtype),
        Stats: T.Tensor((batch, seq, heads, 2), "float32"),
        Items: T.Tensor((n_bg, n_items, 3), "int32"),
        ItemCount: T.Tensor((n_bg,), "int32"),
        Entries: T.Tensor((n_bg, cap), "int32"),
        dQ: T.Tensor((batch, seq, heads, head_dim), "float32"),
        dK: T.Tensor((batch, seq, groups, head_dim), "float32"),
        dV: T.Tensor((batch, seq, groups, head_dim), "float32"),
    ):
        with T.Kernel(n_items, n_bg, threads=threads) as (item, bg):
            K_s = T.alloc_shared((block_size, head_dim), dtype)
            V_s = T.alloc_shared((block_size, head_dim), dtype)
            Q_s = T.alloc_shared((block_rows, head_dim), dtype)
            dO_s = T.alloc_shared((block_rows, head_dim), dtype)
            dS_s = T.alloc_shared((block_size, block_rows), dtype)
            stat_s = T.alloc_shared((block_rows, 2), "float32")
            query_s = T.alloc_shared((tile_queries,), "int32")  # the tile's query positions, -1 past the item
            s_t = T.alloc_fragment((block_size, block_rows), "float32")  # S^T, then P^T
            dp_t = T.alloc_fragment((block_size, block_rows), "float32")  # dP^T
            p_cast = T.alloc_fragment((block_size, block_rows), dtype)
            ds_cast = T.alloc_fragment((block_size, block_rows), dtype)
            dk = T.alloc_fragment((block_size, head_dim), "float32")
            dv = T.alloc_fragment((block_size, head_dim), "float32")
            dq = T.alloc_fragment((block_rows, head_dim), "float32")
            b = bg // groups
            g = bg % groups
            blk, start, length = work_item(Items, ItemCount, bg, item)
            T.copy(K[b, blk * block_size:(blk + 1) * block_size, g, :], K_s)
            T.copy(V[b, blk * block_size:(blk + 1) * block_size, g, :], V_s)
            T.clear(dk)
            T.clear(dv)
            for tile in T.serial(T.ceildiv(length, tile_queries)):
                for qi in T.Parallel(tile_queries):
                    query_s[qi] = T.if_then_else(tile * tile_queries + qi < length,
                                                 Entries[bg, start + tile * tile_queries + qi] // topk, -1)
                for r, d in T.Parallel(block_rows, head_dim):
                    Q_s[r, d] = T.if_then_else(query_s[r // R] >= 0, Q[b, query_s[r // R], g * R + r % R, d], 0)
                    dO_s[r, d] = T.if_then_else(query_s[r // R] >= 0, dO[b, query_s[r // R], g * R + r % R, d], 0)
                for r, c in T.Parallel(block_rows, 2):
                    stat_s[r, c] = T.if_then_else(query_s[r // R] >= 0, Stats[b, query_s[r // R], g * R + r % R, c], 0)
                T.clear(s_t)
                T.gemm(K_s, Q_s, s_t, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.clear(dp_t)
                T.gemm(V_s, dO_s, dp_t, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                for i, j in T.Parallel(block_size, block_rows):
                    s_t[i, j] = T.if_then_else(
                        (query_s[j // R] >= 0) & (blk * block_size + i <= query_s[j // R]),
                        T.exp2(s_t[i, j] * scale_log2 - stat_s[j, 0]), 0)
                T.copy(s_t, p_cast)
                T.gemm(p_cast, dO_s, dv, policy=T.GemmWarpPolicy.FullRow)
                for i, j in T.Parallel(block_size, block_rows):
                    ds_cast[i, j] = s_t[i, j] * (dp_t[i, j] - stat_s[j, 1]) * scale
                T.gemm(ds_cast, Q_s, dk, policy=T.GemmWarpPolicy.FullRow)
                T.copy(ds_cast, dS_s)
                T.clear(dq)
                T.gemm(dS_s, K_s, dq, transpose_A=True)
                for r, d in T.Parallel(block_rows, head_dim):
                    if query_s[r // R] >= 0:
                        T.atomic_add(dQ[b, query_s[r // R], g * R + r % R, d], dq[r, d])
            if length > 0:
                for i, d in T.Parallel(block_size, head_dim):
                    if blk * block_size + i < seq:
                        T.atomic_add(dK[b, blk * block_size + i, g, d], dk[i, d])
                        T.atomic_add(dV[b, blk * block_size + i, g, d], dv[i, d])

    return kv_outer_attention_backward


def sparse_attention_backward(do, dlse, q, k, v, indices, o, lse, block_size: int, scale=None, *,
                              item_queries: int = BACKWARD_ITEM_QUERIES, config=None):
    """Main-branch backward on the GPU -> (dq, dk, dv) in the input dtype.

    do, o, q [B, N, Hq, D]; k, v [B, N, G, D]; lse (and dlse, or None) [B, N, Hq] float32;
    indices [B, N, G, topk] int32 (-1 = unused). Workspace: fp32 dQ, dK, dV, the (lse, delta)
    rows (8 bytes per query head) and one schedule over the whole sequence (N * G * topk entries).
    """
    B, N, Hq, D = q.shape
    G, topk = k.shape[2], indices.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dt = tl_dtype(q.dtype)
    stats = torch.empty((B, N, Hq, 2), device=q.device, dtype=torch.float32)
    dlse = torch.zeros_like(lse) if dlse is None else dlse.float().contiguous()
    delta = compiled_kernel(delta_program, head_dim=D, dtype=dt, **DELTA_DEFAULTS)
    delta(o.reshape(-1, D), do.reshape(-1, D), lse.reshape(-1), dlse.reshape(-1), stats.view(-1, 2))
    schedule = Schedule(B, G, math.ceil(N / block_size), N, topk, item_queries, q.device).build(indices, 0, N)
    dq = torch.zeros((B, N, Hq, D), device=q.device, dtype=torch.float32)
    dk = torch.zeros((B, N, G, D), device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    shape = dict(groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk, seq=N)
    config = {**tuned_config("kv_outer_backward", shape, default_config(block_size), q.device), **(config or {})}
    kernel = compiled_kernel(kv_outer_backward_program, groups=G, heads=Hq, head_dim=D, block_size=block_size,
                             topk=topk, scale=scale, dtype=dt, **config)
    kernel(q, k, v, do, stats, schedule.items, schedule.item_count, schedule.entries, dq, dk, dv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
