"""Two-stage selection for FP8 index keys (TileLang): the FP8 scan's best blocks, rescored with the exact keys.

FP8 scoring perturbs a block score by ~1e-2 of its size, while on random keys the 15th-best block maxima of a long
row lie within ~1e-3 of each other, so the FP8 top-k keeps only ~93% of the bf16 selection's blocks. A cache that
keeps its index keys at full precision beside the FP8 codes (+2 B a key element: ~12% of a paper-shape cache) can
take the FP8 top ``local_blocks + candidates`` (by default 2 (k - local_blocks): ``ops.cache.default_candidates``) and rank those
candidates again by their exact score:

    Rescored[b, row, j] = index_scale * max_{c in blk} q_idx[b, row] . k_idx_exact[b, blk * Bk + c],
    blk = Cand[b, row, local_blocks + j]

Candidates lie before the row's forced local blocks, so every key of theirs is visible and nothing is masked. The
exact keys read are ``candidates`` blocks a query row (32 KB each at Bk = Di = 128: ~1 MB at decode, against the
scan's 134 MB of FP8 keys at 1M), one CTA a (candidate, query row) so the loads are all in flight at once.
:func:`rescore_select_program` then ranks each row's rescored candidates (higher score first, then the lower block
id; NaN and -inf never chosen) into the final ``topk`` slots, the forced blocks first as the top-k left them.
On random keys the float64 model of both stages (``benchmarks/NOTES.md``) keeps every block of the exact selection
at 2 (k - 1) candidates, at 128K and at 1M.
"""

import tilelang.language as T
import torch

from msa_tl.decode.scores import _block_max
from msa_tl.decode.topk import ranks_before
from msa_tl.index.select import _LOWEST
from msa_tl.tl_compile import compiled_kernel, tl_dtype

_ROWS = 8  # the query row padded to the wgmma's N step (keys-major: acc [Bk, 8] = K Q^T)


def rescore_program(groups: int, index_dim: int, block_size: int, candidates: int, scale: float,
                    local_blocks: int = 1, threads: int = 128, pdl: bool = False, dtype: str = "bfloat16"):
    """Q [B, S*G, Di] (the exact index queries), exact index-key pages Kx [num_pages, Bk, Di], BlockTable
    [B, max_pages] int32, Cand [B, S*G, local_blocks + candidates] int32 (the FP8 top-k; -1 = none) ->
    Rescored [B, S*G, candidates] fp32 (-inf where the slot holds no block)."""
    batch, n_rows, num_pages, max_pages = T.dynamic("batch, n_rows, num_pages, max_pages")
    Bk, Di, L = block_size, index_dim, local_blocks
    neg_inf = -T.infinity("float32")
    alloc, score, best_of = _block_max(True, _ROWS, Bk, groups)

    @T.prim_func
    def rescore(
        Q: T.Tensor((batch, n_rows, index_dim), dtype),
        Kx: T.Tensor((num_pages, block_size, index_dim), dtype),
        BlockTable: T.Tensor((batch, max_pages), "int32"),
        Cand: T.Tensor((batch, n_rows, local_blocks + candidates), "int32"),
        Rescored: T.Tensor((batch, n_rows, candidates), "float32"),
    ):
        with T.Kernel(candidates, n_rows, batch, threads=threads) as (j, row, b):
            Q_s = T.alloc_shared((_ROWS, Di), dtype)  # [8, Di] row 0 the query, the rest zero
            K_s = T.alloc_shared((Bk, Di), dtype)  # [Bk, Di]
            acc, acc_t, acc_rows, best = alloc()
            if pdl:
                T.pdl_sync()  # the first stage's top-k has finished
            blk = Cand[b, row, L + j]
            for r, d in T.Parallel(_ROWS, Di):
                Q_s[r, d] = T.if_then_else(r == 0, Q[b, row, d], 0)
            # an empty slot loads the row's first page (any page is harmless) and writes -inf: no branch around the MMA
            T.copy(Kx[BlockTable[b, T.max(blk, 0)], :, :], K_s)
            score(Q_s, K_s, None, acc, acc_t, acc_rows, best, 0, 0, 0, False)
            for r in T.Parallel(_ROWS):
                if r == 0:
                    Rescored[b, row, j] = T.if_then_else(blk >= 0, best_of(best, r) * scale, neg_inf)
            if pdl:
                T.pdl_trigger()

    return rescore


def rescore_select_program(topk: int, candidates: int, local_blocks: int = 1, pdl: bool = False):
    """Cand [B, n_rows, local_blocks + candidates] int32, Rescored [B, n_rows, candidates] fp32 -> Idx
    [B, n_rows, topk] int32: the forced slots as Cand holds them, then the best ``topk - local_blocks`` rescored
    candidates in descending score order (equal scores: the lower block first), -1 past the last valid one. Each
    candidate's rank is the count of valid candidates ahead of it, so no sort and no exp."""
    batch, n_rows = T.dynamic("batch, n_rows")
    L, ranked = local_blocks, topk - local_blocks
    threads = 32 * -(-max(candidates, topk) // 32)

    @T.prim_func
    def rescore_select(
        Cand: T.Tensor((batch, n_rows, local_blocks + candidates), "int32"),
        Rescored: T.Tensor((batch, n_rows, candidates), "float32"),
        Idx: T.Tensor((batch, n_rows, topk), "int32"),
    ):
        with T.Kernel(n_rows, batch, threads=threads) as (row, b):
            val_s = T.alloc_shared((candidates,), "float32")  # [candidates] _LOWEST where invalid
            blk_s = T.alloc_shared((candidates,), "int32")  # [candidates]
            out_s = T.alloc_shared((topk,), "int32")  # [topk]
            value = T.alloc_local((1,), "float32")
            rank = T.alloc_local((1,), "int32")
            tx = T.get_thread_binding()
            if pdl:
                T.pdl_sync()
            if tx < candidates:
                value[0] = Rescored[b, row, tx]
                # NaN fails both comparisons: never chosen, as -inf and an empty slot
                valid = (Cand[b, row, L + tx] >= 0) & (value[0] > _LOWEST)
                val_s[tx] = T.if_then_else(valid, value[0], _LOWEST)
                blk_s[tx] = T.if_then_else(valid, Cand[b, row, L + tx], -1)
            if tx < topk:
                out_s[tx] = T.if_then_else(tx < L, Cand[b, row, T.min(tx, L + candidates - 1)], -1)
            T.sync_threads()
            if tx < candidates:
                if blk_s[tx] >= 0:
                    rank[0] = 0
                    for i in T.serial(candidates):
                        ahead = (blk_s[i] >= 0) & ranks_before(val_s[i], blk_s[i], val_s[tx], blk_s[tx])
                        rank[0] += T.if_then_else(ahead, 1, 0)
                    if rank[0] < ranked:
                        out_s[L + rank[0]] = blk_s[tx]
            T.sync_threads()
            if tx < topk:
                Idx[b, row, tx] = out_s[tx]
            if pdl:
                T.pdl_trigger()

    return rescore_select


def rescore_kernels(*, groups: int, index_dim: int, block_size: int, topk: int, candidates: int, scale: float,
                    local_blocks: int, dtype: str, pdl: bool = False):
    """(rescore, select): the two compiled programs of the second stage."""
    launch = dict(pdl=True) if pdl else {}  # the default builds as they were compiled and run
    rescore = compiled_kernel(rescore_program, groups=groups, index_dim=index_dim, block_size=block_size,
                              candidates=candidates, scale=scale, local_blocks=local_blocks, dtype=dtype, **launch)
    select = compiled_kernel(rescore_select_program, topk=topk, candidates=candidates, local_blocks=local_blocks,
                             **launch)
    return rescore, select


def rescore_blocks(q_idx: torch.Tensor, k_idx_pages: torch.Tensor, block_table: torch.Tensor,
                   candidates: torch.Tensor, topk: int, index_scale: float, local_blocks: int = 1) -> torch.Tensor:
    """The second stage on the GPU: q_idx [B, S, G, Di] (exact, k_idx_pages' dtype), exact index-key pages
    [num_pages, Bk, Di], block_table [B, max_pages] int32, candidates [B, S, G, local_blocks + c] int32 (the first
    stage's top-k) -> indices [B, S, G, topk] int32."""
    B, S, G, Di = q_idx.shape
    c = candidates.shape[3] - local_blocks
    rescore, select = rescore_kernels(groups=G, index_dim=Di, block_size=k_idx_pages.shape[1], topk=topk,
                                      candidates=c, scale=index_scale, local_blocks=local_blocks,
                                      dtype=tl_dtype(q_idx.dtype))
    rescored = torch.empty((B, S * G, c), device=q_idx.device, dtype=torch.float32)
    indices = torch.empty((B, S, G, topk), device=q_idx.device, dtype=torch.int32)
    cand = candidates.reshape(B, S * G, -1)
    rescore(q_idx.reshape(B, S * G, Di), k_idx_pages, block_table, cand, rescored)
    select(cand, rescored, indices.view(B, S * G, topk))
    return indices
