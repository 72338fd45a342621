"""KV-outer sparse attention (TileLang) and the main branch's chunked forward driver.

One CTA per work item of :mod:`msa_tl.scheduler` (a key block and up to
``item_queries`` of the queries that chose it). It loads the K/V block once,
then walks its queries in tiles of ``block_rows / R`` queries x R heads
(R = Hq / G; 8 x 16 = 128 rows at the paper's shape):

    S = Q_tile K_blk^T (tensor cores), causal mask inside the query's own block,
    local softmax, O = P V_blk, and the partial o / l and its LSE go to the
    (query, head, slot) home that the query's index row fixes.

:mod:`msa_tl.lse_combine` then merges each (query, head)'s <= topk partials
with a stable log-sum-exp. Partials cost ``chunk * Hq * topk * D`` elements (bf16 by
default: 4 GiB for a 16K-query chunk at the paper's shape), so prefill runs
in query chunks with a fixed workspace.
"""

import math

import tilelang.language as T
import torch

from msa_tl.lse_combine import COMBINE_DEFAULTS, combine_program
from msa_tl.scheduler import DEFAULTS as SCHEDULE_DEFAULTS, Schedule, work_item
from msa_tl.tl_compile import compiled_kernel, tl_dtype
from msa_tl.tuning.cache import tuned_config

ATTENTION_DEFAULTS = dict(block_rows=128, threads=128)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def kv_outer_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float,
                     block_rows: int = 128, threads: int = 128, dtype: str = "bfloat16",
                     partial_dtype: str = "bfloat16"):
    """Q [B, N, Hq, D], K/V [B, N, G, D], the schedule -> Opart [B, C, Hq, topk, D], Lpart [B, C, Hq, topk]."""
    batch, seq, n_bg, n_items, cap, chunk = T.dynamic("batch, seq, n_bg, n_items, cap, chunk")
    R = heads // groups
    tile_queries = block_rows // R
    neg_inf = -T.infinity("float32")
    scale_log2 = scale * _LOG2E

    @T.prim_func
    def kv_outer_attention(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        V: T.Tensor((batch, seq, groups, head_dim), dtype),
        Items: T.Tensor((n_bg, n_items, 3), "int32"),
        ItemCount: T.Tensor((n_bg,), "int32"),
        Entries: T.Tensor((n_bg, cap), "int32"),
        Opart: T.Tensor((batch, chunk, heads, topk, head_dim), partial_dtype),
        Lpart: T.Tensor((batch, chunk, heads, topk), "float32"),
        t0: T.int32,
    ):
        with T.Kernel(n_items, n_bg, threads=threads) as (item, bg):
            K_s = T.alloc_shared((block_size, head_dim), dtype)
            V_s = T.alloc_shared((block_size, head_dim), dtype)
            Q_s = T.alloc_shared((block_rows, head_dim), dtype)
            entry_s = T.alloc_shared((tile_queries,), "int32")
            acc_s = T.alloc_fragment((block_rows, block_size), "float32")
            p_cast = T.alloc_fragment((block_rows, block_size), dtype)
            acc_o = T.alloc_fragment((block_rows, head_dim), "float32")
            row_max = T.alloc_fragment((block_rows,), "float32")
            row_sum = T.alloc_fragment((block_rows,), "float32")
            b = bg // groups
            g = bg % groups
            blk, start, length = work_item(Items, ItemCount, bg, item)
            T.copy(K[b, blk * block_size:(blk + 1) * block_size, g, :], K_s)
            T.copy(V[b, blk * block_size:(blk + 1) * block_size, g, :], V_s)
            for tile in T.serial(T.ceildiv(length, tile_queries)):
                for qi in T.Parallel(tile_queries):
                    entry_s[qi] = T.if_then_else(tile * tile_queries + qi < length,
                                                 Entries[bg, start + tile * tile_queries + qi], -1)
                for r, d in T.Parallel(block_rows, head_dim):
                    Q_s[r, d] = T.if_then_else(entry_s[r // R] >= 0,
                                               Q[b, t0 + entry_s[r // R] // topk, g * R + r % R, d], 0)
                T.clear(acc_s)
                T.gemm(Q_s, K_s, acc_s, transpose_B=True)
                for r, c in T.Parallel(block_rows, block_size):
                    acc_s[r, c] = T.if_then_else(
                        (entry_s[r // R] < 0) | (blk * block_size + c <= t0 + entry_s[r // R] // topk),
                        acc_s[r, c] * scale_log2, neg_inf)
                T.reduce_max(acc_s, row_max, dim=1)
                for r, c in T.Parallel(block_rows, block_size):
                    acc_s[r, c] = T.exp2(acc_s[r, c] - row_max[r])
                T.reduce_sum(acc_s, row_sum, dim=1)
                T.copy(acc_s, p_cast)
                T.clear(acc_o)
                T.gemm(p_cast, V_s, acc_o)
                for r, d in T.Parallel(block_rows, head_dim):
                    if entry_s[r // R] >= 0:
                        Opart[b, entry_s[r // R] // topk, g * R + r % R, entry_s[r // R] % topk, d] = acc_o[r, d] / row_sum[r]
                for r in T.Parallel(block_rows):
                    if entry_s[r // R] >= 0:
                        Lpart[b, entry_s[r // R] // topk, g * R + r % R, entry_s[r // R] % topk] = (
                            row_max[r] + T.log2(row_sum[r])) * _LN2

    return kv_outer_attention


SCHEDULE_TUNABLES = dict(SCHEDULE_DEFAULTS, query_chunk=16384)


def sparse_attention_forward(q, k, v, indices, block_size: int, scale=None, *, query_chunk=None,
                             item_queries=None, partial_dtype=None, attention_config=None, combine_config=None,
                             out=None, lse_out=None):
    """Main-branch forward on the GPU (KV-outer + combine).

    q [B, N, Hq, D], k/v [B, N, G, D] (bf16/fp16, contiguous), indices
    [B, N, G, topk] int32 (-1 = unused) -> (o [B, N, Hq, D] in q's dtype,
    lse [B, N, Hq] float32; ``out`` / ``lse_out`` may supply them). Workspace:
    B * chunk * Hq * topk * (D * partial bytes + 4) plus the schedule; it does not grow with N.
    ``query_chunk``, ``item_queries`` and the two kernels' configs default to the tuned configs of
    this GPU and shape (:func:`msa_tl.tuning.cache.tuned_config`), else the documented defaults.
    """
    B, N, Hq, D = q.shape
    G, topk = k.shape[2], indices.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    partial_dtype = partial_dtype or torch.bfloat16
    shape = dict(groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk, seq=N)
    schedule_config = tuned_config("schedule", shape, SCHEDULE_TUNABLES, q.device)
    item_queries = item_queries or schedule_config["item_queries"]
    chunk = min(N, query_chunk or schedule_config["query_chunk"])
    attention_config = {**tuned_config("kv_outer_attention", shape, ATTENTION_DEFAULTS, q.device),
                        **(attention_config or {})}
    combine_config = {**tuned_config("lse_combine", shape, COMBINE_DEFAULTS, q.device), **(combine_config or {})}
    o = torch.empty_like(q) if out is None else out
    lse = torch.empty((B, N, Hq), device=q.device, dtype=torch.float32) if lse_out is None else lse_out
    schedule = Schedule(B, G, math.ceil(N / block_size), chunk, topk, item_queries, q.device)
    o_part = torch.empty(B * chunk * Hq * topk * D, device=q.device, dtype=partial_dtype)
    l_part = torch.empty(B * chunk * Hq * topk, device=q.device, dtype=torch.float32)
    dt, pdt = tl_dtype(q.dtype), tl_dtype(partial_dtype)
    attention = compiled_kernel(kv_outer_program, groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk,
                                scale=scale, dtype=dt, partial_dtype=pdt, **attention_config)
    combine = compiled_kernel(combine_program, heads=Hq, head_dim=D, topk=topk, dtype=dt, partial_dtype=pdt,
                              **combine_config)
    for t0 in range(0, N, chunk):
        count = min(chunk, N - t0)
        schedule.build(indices, t0, count)
        op = o_part[: B * count * Hq * topk * D].view(B, count, Hq, topk, D)
        lp = l_part[: B * count * Hq * topk].view(B, count, Hq, topk)
        lp.fill_(float("-inf"))
        attention(q, k, v, schedule.items, schedule.item_count, schedule.entries, op, lp, t0)
        combine(op.view(B, count * Hq, topk, D), lp.view(B, count * Hq, topk), o.view(B, N * Hq, D),
                lse.view(B, N * Hq), t0)
    return o, lse
