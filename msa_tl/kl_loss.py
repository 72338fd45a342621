"""KL alignment loss on the GPU (TileLang), over the KV-outer schedule (sparse mode: the chosen blocks).

For a (query t, group g) row with chosen tokens j:

    teacher_j = mean over the group's R heads of exp(scale q_h . k_j - lse_h)    (the main branch, detached)
    s_j       = index_scale q_idx . k_idx_j                                     (student logits)
    KL        = sum_j teacher_j log teacher_j - sum_j teacher_j s_j + logsumexp_j s_j

(sum_j teacher_j = 1, since the lse_h are the main branch's). Both programs run one CTA per work
item of :mod:`msa_tl.scheduler` (a key block and the (query, slot) entries that chose it). Each
loads K and K_idx of the block once, then walks tiles of ``tile_queries`` queries.
- :func:`kl_stats_program` writes, per (query, slot), two partials over the block:
  sum (t log t - t s) and logsumexp s. :func:`kl_alignment_loss_forward` merges them over the
  slots in torch; that step is small, N·G·topk values.
- :func:`kl_backward_program` recomputes teacher and student with the merged student LSE.
  dS = w (softmax(s) - teacher); dk_idx and dq_idx are its two products with the index rows, on the
  tensor cores. dk_idx accumulates per item and is added once (fp32 atomics); dq_idx gets one atomic
  add per (query, slot) row.
Nothing N x N is formed; the teacher tile is [Bk, tile_queries * R]. The teacher's lse is the main
branch's own, passed in by the layer (one main-branch forward recomputes it otherwise). The warmup's KL,
over every visible token, runs the same programs on :func:`causal_selection`.
"""

import math

import tilelang.language as T
import torch

from msa_tl.scheduler import Schedule, work_item
from msa_tl.tl_compile import compiled_kernel, tl_dtype

KL_DEFAULTS = dict(tile_queries=8, threads=256)
KL_ITEM_QUERIES = 1024
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _teacher_student_macro(R: int, block_size: int, tile_queries: int, scale_log2: float, index_scale: float):
    """Macro: teacher / student [tile_queries, Bk] of one tile (teacher 0 and student -inf where masked)."""
    rows = tile_queries * R

    @T.macro
    def teacher_student(K_s, Kidx_s, Q_s, Qidx_s, lse_s, query_s, P_s, s_t, sp_t, Sp_s, teacher, student, blk):
        T.clear(s_t)
        T.gemm(K_s, Q_s, s_t, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        for i, j in T.Parallel(block_size, rows):
            P_s[i, j] = T.if_then_else((query_s[j // R] >= 0) & (blk * block_size + i <= query_s[j // R]),
                                       T.exp2(s_t[i, j] * scale_log2 - lse_s[j]), 0)
        T.clear(sp_t)
        T.gemm(Kidx_s, Qidx_s, sp_t, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        T.copy(sp_t, Sp_s)
        for qi, i in T.Parallel(tile_queries, block_size):
            student[qi, i] = T.if_then_else((query_s[qi] >= 0) & (blk * block_size + i <= query_s[qi]),
                                            Sp_s[i, qi] * index_scale, -T.infinity("float32"))
            teacher[qi, i] = 0.0
            for r in T.serial(R):
                teacher[qi, i] += P_s[i, qi * R + r]
            teacher[qi, i] = teacher[qi, i] / R

    return teacher_student


def _gather_macro(R: int, topk: int, tile_queries: int, head_dim: int, index_dim: int):
    """Macro: the tile's query positions and slots (-1 past the item), Q rows, q_idx rows and main-branch lse."""
    rows = tile_queries * R

    @T.macro
    def gather(Q, Qidx, Lse2, Entries, query_s, slot_s, Q_s, Qidx_s, lse_s, b, g, bg, start, length, tile):
        for qi in T.Parallel(tile_queries):
            query_s[qi] = T.if_then_else(tile * tile_queries + qi < length,
                                         Entries[bg, start + tile * tile_queries + qi] // topk, -1)
            slot_s[qi] = T.if_then_else(tile * tile_queries + qi < length,
                                        Entries[bg, start + tile * tile_queries + qi] % topk, 0)
        for r, d in T.Parallel(rows, head_dim):
            Q_s[r, d] = T.if_then_else(query_s[r // R] >= 0, Q[b, query_s[r // R], g * R + r % R, d], 0)
        for qi, d in T.Parallel(tile_queries, index_dim):
            Qidx_s[qi, d] = T.if_then_else(query_s[qi] >= 0, Qidx[b, query_s[qi], g, d], 0)
        for r in T.Parallel(rows):
            lse_s[r] = T.if_then_else(query_s[r // R] >= 0, Lse2[b, query_s[r // R], g * R + r % R], 0)

    return gather


def _tile_buffers(R: int, block_size: int, tile_queries: int, head_dim: int, index_dim: int, dtype: str):
    """The buffers both programs pass to the gather and teacher/student macros, allocated in the kernel body."""
    rows = tile_queries * R

    def allocate():
        return (T.alloc_shared((block_size, head_dim), dtype), T.alloc_shared((block_size, index_dim), dtype),
                T.alloc_shared((rows, head_dim), dtype), T.alloc_shared((tile_queries, index_dim), dtype),
                T.alloc_shared((rows,), "float32"), T.alloc_shared((tile_queries,), "int32"),
                T.alloc_shared((tile_queries,), "int32"), T.alloc_shared((block_size, rows), "float32"),
                T.alloc_shared((block_size, tile_queries), "float32"), T.alloc_fragment((block_size, rows), "float32"),
                T.alloc_fragment((block_size, tile_queries), "float32"),
                T.alloc_fragment((tile_queries, block_size), "float32"),
                T.alloc_fragment((tile_queries, block_size), "float32"))

    return allocate


def kl_stats_program(groups: int, heads: int, head_dim: int, index_dim: int, block_size: int, topk: int, scale: float,
                     index_scale: float, tile_queries: int = 8, threads: int = 256, dtype: str = "bfloat16"):
    """Q [B,N,Hq,D], K [B,N,G,D], Qidx [B,N,G,Di], Kidx [B,N,Di], Lse2 [B,N,Hq] (lse * log2 e), the schedule
    -> Stats [B, N, G, topk, 2]: per (query, slot) sum_j (t log t - t s) and logsumexp s over the slot's block."""
    batch, seq, n_bg, n_items, cap = T.dynamic("batch, seq, n_bg, n_items, cap")
    R = heads // groups
    gather = _gather_macro(R, topk, tile_queries, head_dim, index_dim)
    teacher_student = _teacher_student_macro(R, block_size, tile_queries, scale * _LOG2E, index_scale)
    tile_buffers = _tile_buffers(R, block_size, tile_queries, head_dim, index_dim, dtype)

    @T.prim_func
    def kl_alignment_stats(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        Qidx: T.Tensor((batch, seq, groups, index_dim), dtype),
        Kidx: T.Tensor((batch, seq, index_dim), dtype),
        Lse2: T.Tensor((batch, seq, heads), "float32"),
        Items: T.Tensor((n_bg, n_items, 3), "int32"),
        ItemCount: T.Tensor((n_bg,), "int32"),
        Entries: T.Tensor((n_bg, cap), "int32"),
        Stats: T.Tensor((batch, seq, groups, topk, 2), "float32"),
    ):
        with T.Kernel(n_items, n_bg, threads=threads) as (item, bg):
            K_s, Kidx_s, Q_s, Qidx_s, lse_s, query_s, slot_s, P_s, Sp_s, s_t, sp_t, teacher, student = tile_buffers()
            terms = T.alloc_fragment((tile_queries, block_size), "float32")
            row_kl = T.alloc_fragment((tile_queries,), "float32")
            row_max = T.alloc_fragment((tile_queries,), "float32")
            row_sum = T.alloc_fragment((tile_queries,), "float32")
            b = bg // groups
            g = bg % groups
            blk, start, length = work_item(Items, ItemCount, bg, item)
            T.copy(K[b, blk * block_size:(blk + 1) * block_size, g, :], K_s)
            T.copy(Kidx[b, blk * block_size:(blk + 1) * block_size, :], Kidx_s)
            for tile in T.serial(T.ceildiv(length, tile_queries)):
                gather(Q, Qidx, Lse2, Entries, query_s, slot_s, Q_s, Qidx_s, lse_s, b, g, bg, start, length, tile)
                teacher_student(K_s, Kidx_s, Q_s, Qidx_s, lse_s, query_s, P_s, s_t, sp_t, Sp_s, teacher, student, blk)
                for qi, i in T.Parallel(tile_queries, block_size):
                    terms[qi, i] = T.if_then_else(teacher[qi, i] > 0,
                                                  teacher[qi, i] * (T.log(teacher[qi, i]) - student[qi, i]), 0)
                T.reduce_sum(terms, row_kl, dim=1)
                T.reduce_max(student, row_max, dim=1)
                for qi, i in T.Parallel(tile_queries, block_size):
                    terms[qi, i] = T.exp2((student[qi, i] - row_max[qi]) * _LOG2E)
                T.reduce_sum(terms, row_sum, dim=1)
                for qi in T.Parallel(tile_queries):
                    if query_s[qi] >= 0:
                        Stats[b, query_s[qi], g, slot_s[qi], 0] = row_kl[qi]
                        Stats[b, query_s[qi], g, slot_s[qi], 1] = row_max[qi] + T.log(row_sum[qi])

    return kl_alignment_stats


def kl_backward_program(groups: int, heads: int, head_dim: int, index_dim: int, block_size: int, topk: int,
                        scale: float, index_scale: float, tile_queries: int = 8, threads: int = 256,
                        dtype: str = "bfloat16"):
    """As :func:`kl_stats_program`, plus LseS [B, N, G] (student LSE) and Weight [1] = dloss / (B N G)
    (a tensor, so the backward needs no host sync) -> adds into fp32 dQidx [B, N, G, Di] and dKidx [B, N, Di].

    dk_idx += dS^T q_idx and dq_idx = dS k_idx run on the tensor cores, dS rounded to ``dtype`` and the
    query tile padded to 16 rows (the MMA's K step). As fp32 CUDA-core loops they took 1.84x longer (H100)."""
    batch, seq, n_bg, n_items, cap = T.dynamic("batch, seq, n_bg, n_items, cap")
    R = heads // groups
    gather = _gather_macro(R, topk, tile_queries, head_dim, index_dim)
    teacher_student = _teacher_student_macro(R, block_size, tile_queries, scale * _LOG2E, index_scale)
    tile_buffers = _tile_buffers(R, block_size, tile_queries, head_dim, index_dim, dtype)
    pad = -(-tile_queries // 16) * 16  # bf16 / fp16 MMA takes K in steps of 16

    @T.prim_func
    def kl_alignment_backward(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        Qidx: T.Tensor((batch, seq, groups, index_dim), dtype),
        Kidx: T.Tensor((batch, seq, index_dim), dtype),
        Lse2: T.Tensor((batch, seq, heads), "float32"),
        LseS: T.Tensor((batch, seq, groups), "float32"),
        Items: T.Tensor((n_bg, n_items, 3), "int32"),
        ItemCount: T.Tensor((n_bg,), "int32"),
        Entries: T.Tensor((n_bg, cap), "int32"),
        dQidx: T.Tensor((batch, seq, groups, index_dim), "float32"),
        dKidx: T.Tensor((batch, seq, index_dim), "float32"),
        Weight: T.Tensor((1,), "float32"),
    ):
        with T.Kernel(n_items, n_bg, threads=threads) as (item, bg):
            K_s, Kidx_s, Q_s, Qidx_s, lse_s, query_s, slot_s, P_s, Sp_s, s_t, sp_t, teacher, student = tile_buffers()
            lse_student_s = T.alloc_shared((tile_queries,), "float32")
            dS_s = T.alloc_shared((pad, block_size), dtype)
            Qidx_pad = T.alloc_shared((pad, index_dim), dtype)
            dkidx = T.alloc_fragment((block_size, index_dim), "float32")
            dqidx = T.alloc_fragment((pad, index_dim), "float32")
            b = bg // groups
            g = bg % groups
            blk, start, length = work_item(Items, ItemCount, bg, item)
            T.copy(K[b, blk * block_size:(blk + 1) * block_size, g, :], K_s)
            T.copy(Kidx[b, blk * block_size:(blk + 1) * block_size, :], Kidx_s)
            T.clear(dkidx)
            T.clear(dS_s)  # rows past tile_queries stay zero: the padding of the GEMMs' K
            T.clear(Qidx_pad)
            for tile in T.serial(T.ceildiv(length, tile_queries)):
                gather(Q, Qidx, Lse2, Entries, query_s, slot_s, Q_s, Qidx_s, lse_s, b, g, bg, start, length, tile)
                for qi in T.Parallel(tile_queries):
                    lse_student_s[qi] = T.if_then_else(query_s[qi] >= 0, LseS[b, query_s[qi], g], 0)
                teacher_student(K_s, Kidx_s, Q_s, Qidx_s, lse_s, query_s, P_s, s_t, sp_t, Sp_s, teacher, student, blk)
                # d loss / d s = w (softmax(s) - teacher), then through s = index_scale q_idx . k_idx;
                # w (Weight) is applied to the fp32 results, so dS keeps its range in 16 bits
                for qi, i in T.Parallel(tile_queries, block_size):
                    dS_s[qi, i] = index_scale * (T.exp2((student[qi, i] - lse_student_s[qi]) * _LOG2E) - teacher[qi, i])
                T.clear(dqidx)
                for qi, d in T.Parallel(tile_queries, index_dim):
                    Qidx_pad[qi, d] = Qidx_s[qi, d]
                T.gemm(dS_s, Qidx_pad, dkidx, transpose_A=True, policy=T.GemmWarpPolicy.FullRow)
                T.gemm(dS_s, Kidx_s, dqidx, policy=T.GemmWarpPolicy.FullCol)
                for qi, d in T.Parallel(pad, index_dim):
                    if qi < tile_queries:
                        if query_s[qi] >= 0:
                            T.atomic_add(dQidx[b, query_s[qi], g, d], dqidx[qi, d] * Weight[0])
            if length > 0:
                for i, d in T.Parallel(block_size, index_dim):
                    if blk * block_size + i < seq:
                        T.atomic_add(dKidx[b, blk * block_size + i, d], dkidx[i, d] * Weight[0])

    return kl_alignment_backward


# Bound on the partial outputs of the warmup's teacher-lse pass: they grow with topk = ceil(N / Bk).
WARMUP_LSE_WORKSPACE_BYTES = 2 ** 30


def causal_selection(batch: int, seq: int, groups: int, block_size: int, device) -> torch.Tensor:
    """Every causally visible block -> indices [B, N, G, ceil(N / Bk)] int32 (block j for j <= t // Bk, else -1).

    The warmup's KL runs over all visible tokens; this selection makes the sparse kernels compute it exactly.
    """
    n_blocks = math.ceil(seq / block_size)
    blocks = torch.arange(n_blocks, device=device, dtype=torch.int32)
    query_block = torch.arange(seq, device=device, dtype=torch.int32) // block_size
    chosen = torch.where(blocks[None, :] <= query_block[:, None], blocks[None, :], -1)
    return chosen[None, :, None, :].expand(batch, seq, groups, n_blocks).contiguous()


def teacher_lse(q, k, indices, block_size: int, scale: float, query_chunk=None) -> torch.Tensor:
    """The main branch's lse [B, N, Hq] float32 over ``indices`` (it does not depend on V: K stands in for it)."""
    from msa_tl.kv_outer_attention import sparse_attention_forward

    return sparse_attention_forward(q, k, k, indices, block_size, scale, query_chunk=query_chunk)[1]


def _prepare(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse):
    """The selection (indices None: :func:`causal_selection`), the whole-sequence schedule and the two kernels'
    common arguments; the teacher lse is computed here when None."""
    B, N, Hq, D = q.shape
    G, Di = k.shape[2], k_idx.shape[-1]
    warmup = indices is None
    if warmup:
        indices = causal_selection(B, N, G, block_size, q.device)
    topk = indices.shape[3]
    if lse is None:
        per_query = B * Hq * topk * (D * 2 + 4)
        lse = teacher_lse(q, k, indices, block_size, scale,
                          max(block_size, WARMUP_LSE_WORKSPACE_BYTES // per_query) if warmup else None)
    schedule = Schedule(B, G, math.ceil(N / block_size), N, topk, KL_ITEM_QUERIES, q.device).build(indices, 0, N)
    config = dict(groups=G, heads=Hq, head_dim=D, index_dim=Di, block_size=block_size, topk=topk, scale=scale,
                  index_scale=index_scale, dtype=tl_dtype(q.dtype),
                  **dict(KL_DEFAULTS, threads=min(KL_DEFAULTS["threads"], 2 * block_size)))
    inputs = (q, k, q_idx, k_idx.reshape(B, N, Di), lse * _LOG2E)
    return indices, config, inputs, (schedule.items, schedule.item_count, schedule.entries)


def _student_stats(indices, config, inputs, schedule):
    """Run the stats kernel and merge its slots -> (loss float32 scalar, student lse [B, N, G])."""
    B, N, G, topk = indices.shape
    stats = torch.empty((B, N, G, topk, 2), device=indices.device, dtype=torch.float32)
    stats[..., 0] = 0.0
    stats[..., 1] = float("-inf")  # unused slots are never written
    compiled_kernel(kl_stats_program, **config)(*inputs, *schedule, stats)
    lse_student = torch.logsumexp(stats[..., 1], dim=-1)
    return (stats[..., 0].sum(-1) + lse_student).mean(), lse_student


def kl_alignment_loss_forward(q, k, q_idx, k_idx, indices, block_size: int, scale: float, index_scale: float,
                              lse=None):
    """KL loss over the chosen tokens on the GPU -> (loss float32 scalar, student lse [B, N, G] float32).

    q [B, N, Hq, D], k [B, N, G, D], q_idx [B, N, G, Di], k_idx [B, N, Di], indices [B, N, G, topk] (None: every
    visible token, through :func:`causal_selection`). lse [B, N, Hq] float32: the main branch's lse over the same
    selection, when the caller has it (the layer does); otherwise one main-branch forward computes it.
    """
    return _student_stats(*_prepare(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse))


def kl_alignment_loss_backward(dloss, q, k, q_idx, k_idx, indices, block_size: int, scale: float,
                               index_scale: float, lse=None, lse_student=None):
    """Gradients of the KL loss for q_idx and k_idx (their dtypes). ``lse`` (teacher) and ``lse_student`` (from
    :func:`kl_alignment_loss_forward`) are recomputed when not given."""
    prepared = _prepare(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse)
    indices, config, inputs, schedule = prepared
    B, N, G, _ = indices.shape
    if lse_student is None:
        _, lse_student = _student_stats(*prepared)
    dq_idx = torch.zeros(q_idx.shape, device=q.device, dtype=torch.float32)
    dk_idx = torch.zeros(inputs[3].shape, device=q.device, dtype=torch.float32)
    weight = (torch.as_tensor(dloss, device=q.device, dtype=torch.float32) / (B * N * G)).reshape(1)
    compiled_kernel(kl_backward_program, **config)(*inputs, lse_student.contiguous(), *schedule, dq_idx, dk_idx, weight)
    return dq_idx.to(q_idx.dtype), dk_idx.view(k_idx.shape).to(k_idx.dtype)
