"""Index scoring with block max-pool (TileLang): block scores for one query chunk.

    S[b, t - t0, g, blk] = index_scale * max_{j in blk, j <= t} q_idx[b, t, g] . k_idx[b, j]

for the chunk's queries t0 <= t < t0 + C and the visible blocks blk <= t // Bk.
The G index heads of a token are consecutive rows of ``q_idx.view(B, N*G, Di)``,
so a CTA's ``block_M`` rows are ``block_M / G`` tokens x G heads, all inside
one key block: the blocks before it need no causal mask, only the local block
does. Each (row tile, key block) is one ``[block_M, Di] x [Di, Bk]`` tensor-core
GEMM whose row max is the block score; the N x N token scores never exist.

Memory: the score buffer holds B * C * G * ceil(N / Bk) float32 values
(C = query chunk), e.g. 2 GiB for C = 16K at N = 1M, G = 4, Bk = 128.
Entries of future blocks (blk > t // Bk) are not written.
"""


import math

import tilelang.language as T
import torch

from msa_tl.tl_compile import SMEM_LIMIT, compiled_kernel, tl_dtype
from msa_tl.tunable import MAX_REGS_PER_THREAD, TunableProgram, acc_regs
from msa_tl.tuning.cache import tuned_config

DEFAULTS = dict(block_M=128, num_stages=3, threads=128, heavy_first=False)  # best of the H100 sweep (NOTES.md)
# the tuner's choices of each knob (TUNING below adds the constraints)
KNOBS = dict(block_M=(64, 128, 256), num_stages=(1, 2, 3, 4), threads=(128, 256), heavy_first=(False, True))


def row_tile(groups: int, block_size: int, block_M: int) -> int:
    """Rows per CTA: at most ``block_M`` and never more tokens than one key block holds."""
    return min(block_M, groups * block_size)


def block_scores_program(groups: int, index_dim: int, block_size: int, scale: float, block_M: int = 128,
                         num_stages: int = 2, threads: int = 128, heavy_first: bool = True, dtype: str = "bfloat16"):
    """q [batch, seq*G, Di], k [batch, seq, Di], S [batch, chunk_rows, nblk] fp32, t0 (chunk's first token)."""
    batch, seq, chunk_rows, nblk = T.dynamic("batch"), T.dynamic("seq"), T.dynamic("chunk_rows"), T.dynamic("nblk")
    block_M = row_tile(groups, block_size, block_M)
    neg_inf = -T.infinity("float32")

    @T.prim_func
    def index_block_scores(
        Q: T.Tensor((batch, seq * groups, index_dim), dtype),
        K: T.Tensor((batch, seq, index_dim), dtype),
        S: T.Tensor((batch, chunk_rows, nblk), "float32"),
        t0: T.int32,
    ):
        with T.Kernel(T.ceildiv(chunk_rows, block_M), batch, threads=threads) as (tile, bz):
            # causal work grows with the tile index: launching the longest tiles first shortens the tail
            bx = T.ceildiv(chunk_rows, block_M) - 1 - tile if heavy_first else tile
            Q_s = T.alloc_shared((block_M, index_dim), dtype)
            K_s = T.alloc_shared((block_size, index_dim), dtype)
            acc = T.alloc_fragment((block_M, block_size), "float32")
            row_max = T.alloc_fragment((block_M,), "float32")
            row0 = t0 * groups + bx * block_M  # first q row of this tile in the whole sequence
            local = row0 // groups // block_size
            T.copy(Q[bz, row0:row0 + block_M, :], Q_s)
            for blk in T.Pipelined(local + 1, num_stages=num_stages):
                T.copy(K[bz, blk * block_size:(blk + 1) * block_size, :], K_s)
                T.clear(acc)
                T.gemm(Q_s, K_s, acc, transpose_B=True)
                if blk == local:
                    for i, j in T.Parallel(block_M, block_size):
                        acc[i, j] = T.if_then_else(blk * block_size + j <= (row0 + i) // groups, acc[i, j], neg_inf)
                T.reduce_max(acc, row_max, dim=1)
                for i in T.Parallel(block_M):
                    if bx * block_M + i < chunk_rows and row0 + i < seq * groups:
                        S[bz, bx * block_M + i, blk] = row_max[i] * scale

    return index_block_scores


def block_scores(q_idx, k_idx, block_size: int, index_scale=None,
                 query_start: int = 0, query_count=None, out=None, **config):
    """Block scores of queries ``query_start .. query_start + C - 1`` on the GPU.

    q_idx [B, N, G, Di], k_idx [B, N, Di] (bf16/fp16, contiguous, CUDA) ->
    S [B, C, G, nblk] float32 (``out`` may supply a contiguous buffer of at least
    B * C * G * nblk elements). Only visible blocks (blk <= t // Bk) are written.
    """
    B, N, G, Di = q_idx.shape
    C = N - query_start if query_count is None else query_count
    nblk = math.ceil(N / block_size)
    size = B * C * G * nblk
    if out is None:
        out = torch.empty(size, device=q_idx.device, dtype=torch.float32)
    S = out.view(-1)[:size].view(B, C * G, nblk)
    scale = 1.0 / math.sqrt(Di) if index_scale is None else float(index_scale)
    shape = dict(groups=G, index_dim=Di, block_size=block_size, seq=N)
    config = {**tuned_config("index_block_scores", shape, DEFAULTS, q_idx.device), **config}
    kernel = compiled_kernel(block_scores_program, groups=G, index_dim=Di, block_size=block_size, scale=scale,
                             dtype=tl_dtype(q_idx.dtype), **config)
    kernel(q_idx.view(B, N * G, Di), k_idx, S, query_start)
    return S.view(B, C, G, nblk)


def reject_row_tile(config: dict, shape: dict, *, stored_scores: bool):
    """Why a ``block_M``-row GEMM tile over key blocks cannot run at ``shape``, or None: this program
    (``stored_scores``) and :func:`msa_tl.index.select.fused_select_program`, which also keeps each row's top-k list
    in registers and gives each row a thread."""
    rows, Bk, Di = config["block_M"], shape["block_size"], shape["index_dim"]
    if rows > shape["groups"] * Bk:
        return f"block_M {rows} spans more tokens than one key block ({shape['groups']} x {Bk} rows)"
    if rows < 64:
        return "block_M below 64 rows cannot use wgmma"
    smem = 2 * (rows * Di + config["num_stages"] * Bk * Di) + (0 if stored_scores else 4 * rows)
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    regs = acc_regs(rows, Bk, config["threads"]) + (0 if stored_scores else 2 * shape["topk"])
    if regs > MAX_REGS_PER_THREAD - 40:
        return f"about {regs} accumulator registers per thread leave too few for the rest"
    if not stored_scores and config["threads"] < rows:
        return "the fused select gives each row its own thread: threads must be >= block_M"
    return None


def _compile_units(shape: dict, config: dict) -> list:
    Di = shape["index_dim"]
    return [(block_scores_program, dict(groups=shape["groups"], index_dim=Di, block_size=shape["block_size"],
                                        scale=1.0 / math.sqrt(Di), dtype="bfloat16", **config))]


def _gpu_trial(shape: dict, check_seq: int) -> tuple:
    """Timed: the kernel alone on the last (heaviest) query chunk of at most 16K queries."""
    from msa_tl import reference as R
    from msa_tl.checks import index_inputs

    N, Bk, G = shape["seq"], shape["block_size"], shape["groups"]
    chunk = min(N, 16384)
    q_idx, k_idx = index_inputs(shape, N)
    buffer = torch.empty(chunk * G * math.ceil(N / Bk), device="cuda")

    def check(config):
        qc, kc = index_inputs(shape, check_seq)
        nblk = math.ceil(check_seq / Bk)
        S = block_scores(qc, kc, Bk, out=torch.full((check_seq * G * nblk,), float("nan"), device="cuda"), **config)
        ref = R.block_scores(qc.cpu(), kc.cpu(), Bk).permute(0, 2, 1, 3)  # [1, N, G, nblk]
        visible = (torch.arange(nblk)[None, :] <= (torch.arange(check_seq) // Bk)[:, None])[None, :, None, :]
        visible = visible.expand_as(ref)
        torch.testing.assert_close(S.cpu().double()[visible], ref[visible], rtol=1e-4, atol=1e-4)

    def timed(config):
        return lambda: block_scores(q_idx, k_idx, Bk, None, N - chunk, chunk, out=buffer, **config)

    return check, timed


TUNING = TunableProgram(
    name="index_block_scores", dims=("groups", "index_dim", "block_size"), defaults=DEFAULTS, knobs=KNOBS,
    reject=lambda config, shape: reject_row_tile(config, shape, stored_scores=True),
    compile_units=_compile_units, gpu_trial=_gpu_trial)
