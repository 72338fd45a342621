"""Exp-free top-k block selection (TileLang), standalone over stored block scores and fused with scoring.

For each (b, t, g) the local block t // Bk takes slot 0; slots 1 .. k-1 take the
k-1 highest-scoring earlier blocks in descending score order, -1 where fewer
exist. Raw scores are ranked (softmax preserves order): no exp, max or sum.

Both kernels give every row of a CTA's ``block_M`` rows (``block_M / G`` tokens
x G heads, all in one key block, so all with the same candidate set
``0 .. local-1``) to one thread, which keeps its k-1 best (score, block) pairs
sorted in registers. Inserting a value v into the sorted list a is branch-light
and in place when walked from the tail: ``a[j] <- v > a[j] ? (v <= a[j-1] ? v : a[j-1]) : a[j]``;
a value below the current k-1-th is rejected with one compare, which is the
common case once the list fills.

* ``topk_program`` reads S [B, C*G, nblk] (from :mod:`msa_tl.index_scores`)
  tile by tile through shared memory (rows padded by one word against bank
  conflicts).
* ``fused_select_program`` computes each block score with a tensor-core GEMM
  and feeds it to the list directly, so block scores never reach device memory
  and the local block's score (never needed: it is forced) is not computed.
"""


import math

import tilelang.language as T
import torch

from msa_tl.index_scores import block_scores, row_tile
from msa_tl.tl_compile import compiled_kernel, tl_dtype
from msa_tl.tuning.cache import tuned_config

TOPK_DEFAULTS = dict(block_M=128, col_tile=32)
FUSED_DEFAULTS = dict(block_M=128, num_stages=2, threads=128, heavy_first=True)  # best of the H100 sweep (NOTES.md)
_LOWEST = -3.0e38  # below every finite score; "no candidate yet"


def _list_insert(top_val, top_blk, slots: int):
    @T.macro
    def insert(value, blk):
        if value > top_val[slots - 1]:
            for step in T.unroll(slots):
                j = slots - 1 - step
                if value > top_val[j]:
                    if j == 0:
                        top_val[j] = value
                        top_blk[j] = blk
                    elif value <= top_val[j - 1]:
                        top_val[j] = value
                        top_blk[j] = blk
                    else:
                        top_val[j] = top_val[j - 1]
                        top_blk[j] = top_blk[j - 1]

    return insert


def topk_program(groups: int, block_size: int, topk: int, block_M: int = 128, col_tile: int = 32):
    """S [batch, chunk_rows, nblk] fp32 + t0 -> Idx [batch, seq*G, topk] int32 rows of the chunk."""
    batch, seq, chunk_rows, nblk = T.dynamic("batch"), T.dynamic("seq"), T.dynamic("chunk_rows"), T.dynamic("nblk")
    block_M = row_tile(groups, block_size, block_M)
    slots = max(topk - 1, 1)

    @T.prim_func
    def index_topk(
        S: T.Tensor((batch, chunk_rows, nblk), "float32"),
        Idx: T.Tensor((batch, seq * groups, topk), "int32"),
        t0: T.int32,
    ):
        with T.Kernel(T.ceildiv(chunk_rows, block_M), batch, threads=block_M) as (bx, bz):
            S_s = T.alloc_shared((block_M, col_tile + 1), "float32")
            top_val = T.alloc_local((slots,), "float32")
            top_blk = T.alloc_local((slots,), "int32")
            insert = _list_insert(top_val, top_blk, slots)
            tx = T.get_thread_binding()
            r0 = bx * block_M
            local = (t0 * groups + r0) // groups // block_size
            for j in T.serial(slots):
                top_val[j] = _LOWEST
                top_blk[j] = -1
            for c in T.serial(T.ceildiv(local, col_tile)):
                for i, j in T.Parallel(block_M, col_tile):
                    S_s[i, j] = T.if_then_else(
                        (r0 + i < chunk_rows) & (c * col_tile + j < local), S[bz, r0 + i, c * col_tile + j], _LOWEST
                    )
                for j in T.serial(col_tile):
                    if c * col_tile + j < local:
                        insert(S_s[tx, j], c * col_tile + j)
            if r0 + tx < chunk_rows:
                Idx[bz, t0 * groups + r0 + tx, 0] = local
                for j in T.serial(topk - 1):
                    Idx[bz, t0 * groups + r0 + tx, j + 1] = top_blk[j]

    return index_topk


def fused_select_program(groups: int, index_dim: int, block_size: int, topk: int, block_M: int = 128,
                         num_stages: int = 2, threads: int = 128, heavy_first: bool = True, dtype: str = "bfloat16"):
    """Q [batch, seq*G, Di], K [batch, seq, Di] -> Idx [batch, seq*G, topk] int32, scores kept on chip."""
    batch, seq = T.dynamic("batch"), T.dynamic("seq")
    block_M = row_tile(groups, block_size, block_M)
    slots = max(topk - 1, 1)

    @T.prim_func
    def index_select_fused(
        Q: T.Tensor((batch, seq * groups, index_dim), dtype),
        K: T.Tensor((batch, seq, index_dim), dtype),
        Idx: T.Tensor((batch, seq * groups, topk), "int32"),
    ):
        with T.Kernel(T.ceildiv(seq * groups, block_M), batch, threads=threads) as (tile, bz):
            bx = T.ceildiv(seq * groups, block_M) - 1 - tile if heavy_first else tile
            Q_s = T.alloc_shared((block_M, index_dim), dtype)
            K_s = T.alloc_shared((block_size, index_dim), dtype)
            acc = T.alloc_fragment((block_M, block_size), "float32")
            row_max = T.alloc_fragment((block_M,), "float32")
            row_max_s = T.alloc_shared((block_M,), "float32")
            top_val = T.alloc_local((slots,), "float32")
            top_blk = T.alloc_local((slots,), "int32")
            insert = _list_insert(top_val, top_blk, slots)
            tx = T.get_thread_binding()
            r0 = bx * block_M
            local = r0 // groups // block_size
            for j in T.serial(slots):
                top_val[j] = _LOWEST
                top_blk[j] = -1
            T.copy(Q[bz, r0:r0 + block_M, :], Q_s)
            for blk in T.Pipelined(local, num_stages=num_stages):
                T.copy(K[bz, blk * block_size:(blk + 1) * block_size, :], K_s)
                T.clear(acc)
                T.gemm(Q_s, K_s, acc, transpose_B=True)
                T.reduce_max(acc, row_max, dim=1)
                T.copy(row_max, row_max_s)
                if tx < block_M:
                    insert(row_max_s[tx], blk)
            if tx < block_M and r0 + tx < seq * groups:
                Idx[bz, r0 + tx, 0] = local
                for j in T.serial(topk - 1):
                    Idx[bz, r0 + tx, j + 1] = top_blk[j]

    return index_select_fused


def select_blocks(q_idx, k_idx, block_size: int, topk: int, index_scale=None, *,
                  fused: bool = True, query_chunk: int = 16384, config=None, out=None):
    """Index branch on the GPU. q_idx [B, N, G, Di], k_idx [B, N, Di] -> indices [B, N, G, topk] int32.

    ``fused`` (default) scores and selects in one kernel with no score buffer;
    otherwise block scores go through a buffer of B * query_chunk * G *
    ceil(N / Bk) float32 and the standalone top-k kernel. ``index_scale`` only
    matters to the unfused path's scores: a positive scale does not change ranks.
    ``out`` may supply the contiguous int32 [B, N, G, topk] result tensor. ``config`` overrides the
    tuned config (:func:`msa_tl.tuning.cache.tuned_config`) of the select kernel that runs.
    """
    B, N, G, Di = q_idx.shape
    if out is None:
        out = torch.empty((B, N, G, topk), device=q_idx.device, dtype=torch.int32)
    indices = out.view(B, N * G, topk)
    shape = dict(groups=G, index_dim=Di, block_size=block_size, topk=topk, seq=N)
    if fused:
        config = {**tuned_config("index_select_fused", shape, FUSED_DEFAULTS, q_idx.device), **(config or {})}
        kernel = compiled_kernel(fused_select_program, groups=G, index_dim=Di, block_size=block_size, topk=topk,
                                 dtype=tl_dtype(q_idx.dtype), **config)
        kernel(q_idx.view(B, N * G, Di), k_idx, indices)
        return indices.view(B, N, G, topk)
    chunk = min(N, max(block_size, query_chunk // block_size * block_size))
    buffer = torch.empty(B * chunk * G * math.ceil(N / block_size), device=q_idx.device, dtype=torch.float32)
    config = {**tuned_config("index_topk", shape, TOPK_DEFAULTS, q_idx.device), **(config or {})}
    kernel = compiled_kernel(topk_program, groups=G, block_size=block_size, topk=topk, **config)
    for t0 in range(0, N, chunk):
        count = min(chunk, N - t0)
        S = block_scores(q_idx, k_idx, block_size, index_scale, t0, count, out=buffer)
        kernel(S.view(B, count * G, -1), indices, t0)
    return indices.view(B, N, G, topk)
