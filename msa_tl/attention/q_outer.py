"""Q-outer sparse attention (TileLang): a CTA per (query, group) walks the query's chosen blocks.

The baseline beside :mod:`msa_tl.attention.kv_outer`, and the short-sequence path.
The group's R = Hq / G heads of one query are the M rows (16 at the paper's
shape); for each of its ``topk`` blocks the CTA loads K/V[blk] (strided rows of
``[B, N, G, D]``) and runs one online-softmax step, masking causally only in
the query's own block. Output and LSE are final: no partials, no combine, no
workspace. Each K/V block is loaded once per query that chose it (k * 2 * Bk * D
bytes per query and group, mostly L2 hits when neighbours share blocks), and
the MMAs have only R rows, so the kernel is bound by loads, not tensor cores.
"""

import math
from typing import NamedTuple

import tilelang.language as T
import torch

from msa_tl.tl_compile import SMEM_LIMIT, compiled_kernel, tl_dtype
from msa_tl.tunable import ATTENTION_DIMS, TunableProgram, attention_program_args
from msa_tl.tuning.cache import tuned_config

Q_OUTER_DEFAULTS = dict(threads=128, num_stages=2)
Q_OUTER_KNOBS = dict(threads=(64, 128, 256), num_stages=(1, 2, 3))  # the tuner's choices (Q_OUTER_TUNING)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


class AttendBuffers(NamedTuple):
    """The buffers of :func:`attend_block_macro`, in its argument order."""
    q: object  # [M, D] shared: the query rows
    k: object  # [Bk, D] shared
    v: object  # [Bk, D] shared
    scores_s: object  # [M, Bk] fp32 shared
    p: object  # [M, Bk] shared
    acc_s: object  # [M, Bk] fp32 fragment
    scores: object  # [M, Bk] fp32 fragment
    acc_o: object  # [M, D] fp32 fragment
    row_max: object  # [M]
    prev_max: object  # [M]
    block_sum: object  # [M]
    row_sum: object  # [M]
    rescale: object  # [M] shared


def attend_block_buffers(rows: int, block_size: int, head_dim: int, dtype: str) -> AttendBuffers:
    """Inside a kernel: the shared tiles and fragments one :func:`attend_block_macro` step works in."""
    M = rows
    return AttendBuffers(
        T.alloc_shared((M, head_dim), dtype), T.alloc_shared((block_size, head_dim), dtype),
        T.alloc_shared((block_size, head_dim), dtype),
        # M = R rows is one MMA tile, so the warps split the columns. TileLang 0.1.15 cannot reduce such a
        # column-split fragment across warps, so the scores go through shared memory to a row-owned fragment.
        T.alloc_shared((M, block_size), "float32"), T.alloc_shared((M, block_size), dtype),
        T.alloc_fragment((M, block_size), "float32"), T.alloc_fragment((M, block_size), "float32"),
        T.alloc_fragment((M, head_dim), "float32"), T.alloc_fragment((M,), "float32"),
        T.alloc_fragment((M,), "float32"), T.alloc_fragment((M,), "float32"), T.alloc_fragment((M,), "float32"),
        T.alloc_shared((M,), "float32"))


def attend_block_macro(rows: int, block_size: int, head_dim: int, scale: float):
    """Macro ``attend(k_src, v_src, key0, pos, *buffers)`` (the :class:`AttendBuffers` of
    :func:`attend_block_buffers`): one online-softmax step of ``rows`` query rows (one query's heads, at position
    ``pos``) over a block of keys ``key0 ..`` whose K / V come from ``k_src`` / ``v_src`` [block_size, head_dim];
    keys after ``pos`` are masked."""
    neg_inf = -T.infinity("float32")
    scale_log2 = scale * _LOG2E
    M = rows

    @T.macro
    def attend(k_src, v_src, key0, pos, Q_s, K_s, V_s, S_s, P_s, acc_s, scores, acc_o, row_max, prev_max, block_sum,
               row_sum, rescale_s):
        T.copy(k_src, K_s)
        # causal mask as an additive bias; only the query's own block has keys after it
        for r, c in T.Parallel(M, block_size):
            acc_s[r, c] = T.if_then_else(key0 + c <= pos, 0, neg_inf)
        T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
        T.copy(acc_s, S_s)
        T.copy(S_s, scores)
        T.copy(row_max, prev_max)
        T.reduce_max(scores, row_max, dim=1, clear=False)
        for r, c in T.Parallel(M, block_size):
            scores[r, c] = T.exp2((scores[r, c] - row_max[r]) * scale_log2)
        T.reduce_sum(scores, block_sum, dim=1)
        for r in T.Parallel(M):
            rescale_s[r] = T.exp2((prev_max[r] - row_max[r]) * scale_log2)
            row_sum[r] = row_sum[r] * rescale_s[r] + block_sum[r]
        T.copy(scores, P_s)
        for r, d in T.Parallel(M, head_dim):
            acc_o[r, d] *= rescale_s[r]
        T.copy(v_src, V_s)
        T.gemm(P_s, V_s, acc_o, policy=T.GemmWarpPolicy.FullCol)

    return attend


def q_outer_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float,
                    threads: int = 128, num_stages: int = 2, dtype: str = "bfloat16"):
    """Q [B, N, Hq, D], K/V [B, N, G, D], Indices [B, N, G, topk] -> O [B, N, Hq, D], LSE [B, N, Hq] (fp32, natural log)."""
    batch, seq = T.dynamic("batch, seq")
    R = heads // groups
    M = max(R, 16)  # MMA rows: fewer heads per group than one m16 tile are padded with zero rows
    neg_inf = -T.infinity("float32")
    scale_log2 = scale * _LOG2E
    attend = attend_block_macro(M, block_size, head_dim, scale)

    @T.prim_func
    def q_outer_attention(
        Q: T.Tensor((batch, seq, heads, head_dim), dtype),
        K: T.Tensor((batch, seq, groups, head_dim), dtype),
        V: T.Tensor((batch, seq, groups, head_dim), dtype),
        Indices: T.Tensor((batch, seq, groups, topk), "int32"),
        O: T.Tensor((batch, seq, heads, head_dim), dtype),
        LSE: T.Tensor((batch, seq, heads), "float32"),
    ):
        with T.Kernel(seq, batch * groups, threads=threads) as (t, bg):
            buf = attend_block_buffers(M, block_size, head_dim, dtype)
            Q_s, acc_o, row_max, row_sum, rescale_s = buf.q, buf.acc_o, buf.row_max, buf.row_sum, buf.rescale
            O_s = T.alloc_shared((M, head_dim), dtype)
            b = bg // groups
            g = bg % groups
            if M > R:
                for r, d in T.Parallel(M, head_dim):
                    Q_s[r, d] = T.if_then_else(r < R, Q[b, t, g * R + r % R, d], 0)
            else:
                T.copy(Q[b, t, g * R:(g + 1) * R, :], Q_s)
            T.clear(acc_o)
            T.clear(row_sum)
            T.fill(row_max, neg_inf)
            for s in T.Pipelined(topk, num_stages=num_stages):
                blk = Indices[b, t, g, s]
                if blk >= 0:
                    attend(K[b, blk * block_size:(blk + 1) * block_size, g, :],
                           V[b, blk * block_size:(blk + 1) * block_size, g, :], blk * block_size, t, *buf)
            # the local block is always chosen, so row_sum > 0 for every valid selection
            for r in T.Parallel(M):
                rescale_s[r] = row_sum[r]
            for r, d in T.Parallel(M, head_dim):
                O_s[r, d] = acc_o[r, d] / rescale_s[r]
            if M > R:
                for r, d in T.Parallel(R, head_dim):
                    O[b, t, g * R + r, d] = O_s[r, d]
            else:
                T.copy(O_s, O[b, t, g * R:(g + 1) * R, :])
            for r in T.Parallel(M):
                if r < R:
                    LSE[b, t, g * R + r] = (row_max[r] * scale_log2 + T.log2(row_sum[r])) * _LN2

    return q_outer_attention


# Measured on the H100 (benchmarks/NOTES.md, "Q-outer at Bk = 64"): TileLang 0.1.15's warp-specialised
# lowering of this kernel (a TMA producer warpgroup beside the MMA warps) returned wrong rows at Bk = 64
# (1-11% of rows off, relative error 1.5e-2 to 6e-2, varying run to run), while the same program without
# warp specialisation matched the reference to 2.0e-3 at every stage and thread count tried.
q_outer_program.pass_configs = {"tl.disable_warp_specialized": True}


def q_outer_attention_forward(q, k, v, indices, block_size: int, scale=None, *, out=None, lse_out=None, **config):
    """Main-branch forward, Q-outer. Shapes as :func:`msa_tl.attention.kv_outer.sparse_attention_forward`; no workspace."""
    B, N, Hq, D = q.shape
    G, topk = k.shape[2], indices.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o = torch.empty_like(q) if out is None else out
    lse = torch.empty((B, N, Hq), device=q.device, dtype=torch.float32) if lse_out is None else lse_out
    shape = dict(groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk, seq=N)
    config = {**tuned_config("q_outer_attention", shape, Q_OUTER_DEFAULTS, q.device), **config}
    kernel = compiled_kernel(q_outer_program, groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk,
                             scale=scale, dtype=tl_dtype(q.dtype), **config)
    kernel(q, k, v, indices, o, lse)
    return o, lse


def _reject_q_outer(config: dict, shape: dict):
    R = shape["heads"] // shape["groups"]
    rows, D, Bk = max(R, 16), shape["head_dim"], shape["block_size"]
    # Q, O, P (bf16) and S (fp32) once; K and V once per pipeline stage
    smem = 2 * 2 * rows * D + 6 * rows * Bk + config["num_stages"] * 2 * 2 * Bk * D
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    if Bk % (config["threads"] // 32 * 8):
        return f"{config['threads'] // 32} warps cannot split {Bk} keys into 8-wide MMA columns"
    return None


def _gpu_trial(shape: dict, check_seq: int) -> tuple:
    """Timed: the whole main branch on this kernel."""
    from msa_tl.attention.kv_outer import forward_trial

    def forward(config):
        return lambda q, k, v, indices, o, lse: q_outer_attention_forward(q, k, v, indices, shape["block_size"],
                                                                          out=o, lse_out=lse, **config)

    return forward_trial(shape, check_seq, forward)


Q_OUTER_TUNING = TunableProgram(
    name="q_outer_attention", dims=ATTENTION_DIMS, defaults=Q_OUTER_DEFAULTS, knobs=Q_OUTER_KNOBS,
    reject=_reject_q_outer,
    compile_units=lambda shape, config: [(q_outer_program, dict(attention_program_args(shape), **config))],
    gpu_trial=_gpu_trial)
