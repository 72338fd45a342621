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

from msa_tl.reference import FP8_MAX
from msa_tl.tl_compile import SMEM_LIMIT, compiled_kernel, sm_count, tl_dtype
from msa_tl.tunable import DECODE_DIMS, HOPPER_SMS, TunableProgram, decode_rows

DECODE_SCORES_DEFAULTS = dict(num_stages=3, threads=128)  # keys_major, rows, blocks_per_cta: scan_tiling
# the tuner's choices (DECODE_SCAN_TUNING, DECODE_SCAN_FP8_TUNING); pages: FP8 keys only
DECODE_SCORES_KNOBS = dict(blocks_per_cta=(4, 8, 16, 32), num_stages=(1, 2, 3, 4), keys_major=(True, False),
                           shuffle_max=(False, True))
DECODE_SCORES_FP8_KNOBS = dict(DECODE_SCORES_KNOBS, pages=(1, 2))


def scan_blocks_per_cta(blocks: int, sms: int) -> int:
    """Blocks a scan CTA takes: the most (up to 32, which keeps the most loads in flight) that still leaves
    ``blocks`` (batch x max_pages x row tiles) a CTA an SM, at least 4. On the H200
    (benchmarks/results/h200/decode_scan_sweep*.csv) 32 was the best or within 1% at 1M x 1 row, 128K x 8 and
    128K x 32 rows of 8 tokens, for bf16 and FP8 keys."""
    per_cta = 32
    while per_cta > 4 and blocks < sms * per_cta:
        per_cta //= 2
    return per_cta


def scan_tiling(n_rows: int, batch: int, max_pages: int, sms: int, config: dict) -> dict:
    """``config`` with the scan's shape-dependent knobs filled in where it leaves them out: ``keys_major`` (for up
    to 16 query rows: S * G = 4 at decode; on the H200 the keys-major FP8 scan took 52.5 us at 1M against 83 us
    queries-major, while at 32 rows queries-major was the faster, 76 against 92 us), ``rows``
    (:func:`query_rows_tile`) and ``blocks_per_cta`` (:func:`scan_blocks_per_cta`)."""
    config = dict(config)
    config.setdefault("keys_major", n_rows <= 16)
    config.setdefault("rows", query_rows_tile(n_rows, config["keys_major"]))
    config.setdefault("blocks_per_cta", scan_blocks_per_cta(batch * max_pages * -(-n_rows // config["rows"]), sms))
    return config


# shuffle_max: each block's max over its keys straight from the keys-major wgmma accumulator's registers. A thread's
# values of [64 t + 64 keys, kN rows] are kN / 2 t + 4 j + 2 h + e: key 64 t + 16 warp + 8 h + lane / 4, row
# 8 j + 2 (lane % 4) + e (the layout TileLang's fragment keeps, as DIRECT_STORES_CUDA in attention/kv_outer.py
# reads it). Max over h and the block's tiles, then over the 8 lanes that share a row (xor 4, 8, 16), leaves one
# value a warp; TileLang cannot reduce a fragment along M, hence the helper.
WARP_BLOCK_MAX_CUDA = r"""
template <int kTiles, int kN, int kBlocks>
__device__ __forceinline__ void msa_warp_block_max(const float *acc, float *out) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  constexpr int kPer = kTiles / kBlocks;
  #pragma unroll
  for (int p = 0; p < kBlocks; ++p) {
    #pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
      #pragma unroll
      for (int e = 0; e < 2; ++e) {
        float m = -INFINITY;
        #pragma unroll
        for (int t = p * kPer; t < (p + 1) * kPer; ++t) {
          #pragma unroll
          for (int h = 0; h < 2; ++h) m = fmaxf(m, acc[kN / 2 * t + 4 * j + 2 * h + e]);
        }
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
        if (lane < 4) out[(p * 4 + warp) * kN + 8 * j + 2 * lane + e] = m;
      }
    }
  }
}
"""


def _block_max(keys_major: bool, rows: int, Bk: int, groups: int, pages: int = 1, shuffle_max: bool = False):
    """(alloc, score, best_of): the buffers, the macro that turns one pipeline stage's K_s [pages * Bk, Di]
    (``pages`` consecutive blocks of the row) into the masked max of each block for each of the CTA's query rows,
    scaled per key (``k_scale``, FP8) or not, and ``best_of(best, i, it)``: block i // rows' max for row i % rows
    after the macro ran in pipeline iteration ``it``.

    ``keys_major`` puts the block's keys on the MMA's M side: acc [Bk, rows] = K Q^T holds only ``rows`` (a multiple
    of 8, the query rows padded) columns, where the queries as M rows pad to 64: 8x the registers, masking and
    maxing at S * G = 4. The max over keys then runs on a transposed copy through shared memory (the wgmma layout
    cannot be reduced along M in place), or with ``shuffle_max`` (keys-major, 128 threads) from the registers by
    :data:`WARP_BLOCK_MAX_CUDA` into a [pages * 4 warps, rows] shared buffer (two of them, by the iteration's
    parity, so one barrier an iteration orders them), whose four warps' values ``best_of`` takes the max of.
    ``pages`` > 1 (keys-major only) spreads a stage's fixed cost (barriers, the transpose's syncs) over more bytes:
    an FP8 page is 16 KB."""
    neg_inf = -T.infinity("float32")
    keys = pages * Bk
    if pages > 1 and not keys_major:
        raise ValueError("decode scan: more than one page a stage needs keys_major")
    if shuffle_max and not keys_major:
        raise ValueError("decode scan: shuffle_max reduces the keys-major accumulator")

    def alloc():
        if keys_major and shuffle_max:
            warp_max = T.alloc_shared((2, pages * 4, rows), "float32")  # [parity, pages * 4 warps, rows]
            return T.alloc_fragment((keys, rows), "float32"), warp_max, None, warp_max  # acc [pages * Bk, rows]
        if keys_major:
            return (T.alloc_fragment((keys, rows), "float32"),  # [pages * Bk, rows] acc
                    T.alloc_shared((pages * rows, Bk), "float32"),  # [pages * rows, Bk] its transpose, block by block
                    T.alloc_fragment((pages * rows, Bk), "float32"),  # [pages * rows, Bk]
                    T.alloc_fragment((pages * rows,), "float32"))  # [pages * rows] each block's max
        acc = T.alloc_fragment((rows, Bk), "float32")  # [rows, Bk]
        return acc, None, acc, T.alloc_fragment((rows,), "float32")

    @T.macro
    def score(Q_s, K_s, k_scale, acc, acc_t, acc_rows, best, blk, first, r0, masked, it=0):
        T.clear(acc)
        if keys_major:
            T.gemm(K_s, Q_s, acc, transpose_B=True)
            for c, r in T.Parallel(keys, rows):  # the stage's keys are consecutive tokens from blk * Bk on
                acc[c, r] = T.if_then_else(masked & (blk * Bk + c > first + (r0 + r) // groups), neg_inf,
                                           acc[c, r] * (k_scale[c] if k_scale is not None else 1.0))
            if shuffle_max:
                T.call_extern("handle", f"msa_warp_block_max<{keys // 64}, {rows}, {pages}>", acc.data,
                              T.address_of(acc_t[it % 2, 0, 0]))
                T.sync_threads()
            else:
                if pages == 1:
                    for c, r in T.Parallel(Bk, rows):
                        acc_t[r, c] = acc[c, r]
                else:
                    for c, r in T.Parallel(keys, rows):
                        acc_t[c // Bk * rows + r, c % Bk] = acc[c, r]
                T.copy(acc_t, acc_rows)
        else:
            T.gemm(Q_s, K_s, acc, transpose_B=True)
            for r, c in T.Parallel(rows, Bk):
                acc[r, c] = T.if_then_else(masked & (blk * Bk + c > first + (r0 + r) // groups), neg_inf,
                                           acc[r, c] * (k_scale[c] if k_scale is not None else 1.0))
        if not shuffle_max:
            T.reduce_max(acc_rows, best, dim=1)

    def best_of(best, i, it=0):
        if not shuffle_max:
            return best[i]
        return T.max(T.max(best[it % 2, i // rows * 4, i % rows], best[it % 2, i // rows * 4 + 1, i % rows]),
                     T.max(best[it % 2, i // rows * 4 + 2, i % rows], best[it % 2, i // rows * 4 + 3, i % rows]))

    return alloc, score, best_of


def _score_iteration(i, shuffle_max: bool) -> tuple:
    """The pipeline iteration :func:`_block_max`'s ``score`` is told with ``shuffle_max`` (it picks the warp maxima's
    buffer by its parity); none without, as an argument a macro does not read still changes the program."""
    return (i,) if shuffle_max else ()


def _fp8_page_loader(Bk: int, pages: int):
    """Macro ``load(Kc, KScale, BlockTable, K_s, k_scale, b, blk, max_pages)``: the stage's ``pages`` (1 or 2)
    FP8 index-key pages and their scales from the pages the block table names for blocks blk, blk + 1 (an id past
    the table clamped: past the row's end any page's load is harmless, its scores are not written)."""
    if pages not in (1, 2):
        raise ValueError(f"decode scan: 1 or 2 pages a stage, got {pages}")

    @T.macro
    def load(Kc, KScale, BlockTable, K_s, k_scale, b, blk, max_pages):
        if pages == 1:
            T.copy(Kc[BlockTable[b, blk], :, :], K_s)
            T.copy(KScale[BlockTable[b, blk], :], k_scale)
        else:
            T.copy(Kc[BlockTable[b, blk], :, :], K_s[0:Bk, :])
            T.copy(Kc[BlockTable[b, T.min(blk + 1, max_pages - 1)], :, :], K_s[Bk:2 * Bk, :])
            T.copy(KScale[BlockTable[b, blk], :], k_scale[0:Bk])
            T.copy(KScale[BlockTable[b, T.min(blk + 1, max_pages - 1)], :], k_scale[Bk:2 * Bk])

    return load


def query_rows_tile(n_rows: int, keys_major: bool = True) -> int:
    """Query rows a scan CTA takes: 64 (the wgmma's M) queries-major; keys-major the rows padded to a multiple of 8
    (the wgmma's N step), at most 64."""
    return 64 if not keys_major else min(64, -(-n_rows // 8) * 8)


def decode_scores_program(groups: int, index_dim: int, block_size: int, scale: float, rows: int = 8,
                          blocks_per_cta: int = 16, num_stages: int = 3, threads: int = 128, keys_major: bool = True,
                          shuffle_max: bool = False, pdl: bool = False, dtype: str = "bfloat16"):
    """Q [B, S*G, Di], index-key pages [num_pages, Bk, Di], BlockTable [B, max_pages] int32, SeqLens [B] int32 ->
    Scores [B, S*G, max_pages] fp32. ``rows``: :func:`query_rows_tile`; ``shuffle_max``: :func:`_block_max`;
    ``pdl``: programmatic dependent launch (:mod:`msa_tl.decode.plan`)."""
    batch, n_rows, num_pages, max_pages = T.dynamic("batch, n_rows, num_pages, max_pages")
    BPC, Bk, Di = blocks_per_cta, block_size, index_dim
    neg_inf = -T.infinity("float32")
    alloc, score, best_of = _block_max(keys_major, rows, Bk, groups, shuffle_max=shuffle_max)

    @T.prim_func
    def decode_block_scores(
        Q: T.Tensor((batch, n_rows, index_dim), dtype),
        Kc: T.Tensor((num_pages, block_size, index_dim), dtype),
        BlockTable: T.Tensor((batch, max_pages), "int32"),
        SeqLens: T.Tensor((batch,), "int32"),
        Scores: T.Tensor((batch, n_rows, max_pages), "float32"),
    ):
        with T.Kernel(T.ceildiv(max_pages, BPC), T.ceildiv(n_rows, rows), batch, threads=threads,
                      prelude=WARP_BLOCK_MAX_CUDA if shuffle_max else None) as (bx, by, b):
            Q_s = T.alloc_shared((rows, Di), dtype)  # [rows, Di]
            K_s = T.alloc_shared((Bk, Di), dtype)  # [Bk, Di]
            acc, acc_t, acc_rows, best = alloc()
            if pdl:
                T.pdl_sync()  # the kernel before it (an append, the previous layer) has finished
            n = SeqLens[b]
            first = n - n_rows // groups  # position of the row's first query token
            r0, blk0 = by * rows, bx * BPC
            live = T.max(T.min(BPC, T.ceildiv(n, Bk) - blk0), 0)  # this CTA's blocks inside the row
            for r, d in T.Parallel(rows, Di):
                Q_s[r, d] = T.if_then_else(r0 + r < n_rows, Q[b, T.min(r0 + r, n_rows - 1), d], 0)
            for i in T.Pipelined(live, num_stages=num_stages):
                T.copy(Kc[BlockTable[b, blk0 + i], :, :], K_s)
                # only a block that reaches past the first query's position needs the causal mask
                score(Q_s, K_s, None, acc, acc_t, acc_rows, best, blk0 + i, first, r0,
                      (blk0 + i + 1) * Bk - 1 > first, *_score_iteration(i, shuffle_max))
                for r in T.Parallel(rows):
                    if r0 + r < n_rows:
                        Scores[b, r0 + r, blk0 + i] = best_of(best, r, i) * scale
            for r, i in T.Parallel(rows, BPC):  # blocks past the row's end
                if r0 + r < n_rows and blk0 + i < max_pages and i >= live:
                    Scores[b, r0 + r, blk0 + i] = neg_inf
            if pdl:
                T.pdl_trigger()  # the top-k may launch; it waits for this grid to finish before it reads

    return decode_block_scores


def decode_scores_fp8_program(groups: int, index_dim: int, block_size: int, scale: float, rows: int = 8,
                              blocks_per_cta: int = 16, num_stages: int = 3, threads: int = 128,
                              keys_major: bool = True, pages: int = 1, shuffle_max: bool = False, pdl: bool = False,
                              dtype: str = "bfloat16"):
    """The scan over FP8 index keys: Q [B, S*G, Di] (bf16 / fp16), index-key pages [num_pages, Bk, Di] float8_e4m3
    with their per-token scales KScale [num_pages, Bk] fp32, BlockTable, SeqLens -> Scores [B, S*G, max_pages] fp32.

    A key is ``Kc * KScale``; each query row is quantised here to e4m3 with its own scale amax / 448, so each block is
    one FP8 wgmma (half the bf16 key bytes and twice the MMA rate) and the score is
    ``index_scale * q_scale[r] * max_c(acc[r, c] * KScale[c])`` (q_scale > 0 leaves the max where it is).
    ``pages`` (keys-major): blocks a pipeline stage, 2 to spread the stage's fixed cost over 32 KB as a bf16 page
    has (lowered and compiled, not yet run on a GPU).
    """
    batch, n_rows, num_pages, max_pages = T.dynamic("batch, n_rows, num_pages, max_pages")
    BPC, Bk, Di, P = blocks_per_cta, block_size, index_dim, pages
    neg_inf = -T.infinity("float32")
    fp8 = "float8_e4m3"
    alloc, score, best_of = _block_max(keys_major, rows, Bk, groups, pages, shuffle_max)
    load = _fp8_page_loader(Bk, pages)
    if BPC % P:
        raise ValueError(f"decode scan: blocks_per_cta {BPC} is not a multiple of pages {P}")

    @T.prim_func
    def decode_block_scores_fp8(
        Q: T.Tensor((batch, n_rows, index_dim), dtype),
        Kc: T.Tensor((num_pages, block_size, index_dim), fp8),
        KScale: T.Tensor((num_pages, block_size), "float32"),
        BlockTable: T.Tensor((batch, max_pages), "int32"),
        SeqLens: T.Tensor((batch,), "int32"),
        Scores: T.Tensor((batch, n_rows, max_pages), "float32"),
    ):
        with T.Kernel(T.ceildiv(max_pages, BPC), T.ceildiv(n_rows, rows), batch, threads=threads,
                      prelude=WARP_BLOCK_MAX_CUDA if shuffle_max else None) as (bx, by, b):
            Q_f = T.alloc_fragment((rows, Di), "float32")  # [rows, Di]
            q_amax = T.alloc_fragment((rows,), "float32")  # [rows]
            q_scale = T.alloc_shared((rows,), "float32")  # [rows] read in the acc layout, so through shared memory
            Q_s = T.alloc_shared((rows, Di), fp8)  # [rows, Di]
            K_s = T.alloc_shared((P * Bk, Di), fp8)  # [P * Bk, Di]
            k_scale = T.alloc_shared((P * Bk,), "float32")  # [P * Bk]
            acc, acc_t, acc_rows, best = alloc()
            if pdl:
                T.pdl_sync()
            n = SeqLens[b]
            first = n - n_rows // groups
            r0, blk0 = by * rows, bx * BPC
            live = T.max(T.min(BPC, T.ceildiv(n, Bk) - blk0), 0)
            for r, d in T.Parallel(rows, Di):
                Q_f[r, d] = T.if_then_else(r0 + r < n_rows, Q[b, T.min(r0 + r, n_rows - 1), d], 0)
            T.reduce_absmax(Q_f, q_amax, dim=1)
            for r in T.Parallel(rows):
                q_amax[r] = T.if_then_else(q_amax[r] > 0, q_amax[r] / FP8_MAX, 1.0)
                q_scale[r] = q_amax[r] * scale
            for r, d in T.Parallel(rows, Di):
                Q_s[r, d] = T.Cast(fp8, Q_f[r, d] / q_amax[r])
            for i in T.Pipelined(live if P == 1 else T.ceildiv(live, P), num_stages=num_stages):
                load(Kc, KScale, BlockTable, K_s, k_scale, b, blk0 + i * P, max_pages)
                score(Q_s, K_s, k_scale, acc, acc_t, acc_rows, best, blk0 + i * P, first, r0,
                      (blk0 + i * P + P) * Bk - 1 > first, *_score_iteration(i, shuffle_max))
                if P == 1:
                    for r in T.Parallel(rows):
                        if r0 + r < n_rows:
                            Scores[b, r0 + r, blk0 + i] = best_of(best, r, i) * q_scale[r]
                else:
                    for p, r in T.Parallel(P, rows):
                        if r0 + r < n_rows and i * P + p < live:
                            Scores[b, r0 + r, blk0 + i * P + p] = best_of(best, p * rows + r, i) * q_scale[r]
            for r, i in T.Parallel(rows, BPC):
                if r0 + r < n_rows and blk0 + i < max_pages and i >= live:
                    Scores[b, r0 + r, blk0 + i] = neg_inf
            if pdl:
                T.pdl_trigger()

    return decode_block_scores_fp8


def scan_build(*, n_rows: int, batch: int, max_pages: int, groups: int, index_dim: int, block_size: int,
               index_scale: float | None, dtype: str, fp8: bool, sms: int, **config) -> tuple:
    """(program, kwargs) of the scan for ``batch`` rows of ``n_rows`` (S * G) query rows over ``max_pages`` pages on
    a GPU of ``sms`` SMs: the program by the keys' dtype (``fp8``), its knobs :data:`DECODE_SCORES_DEFAULTS` and
    :func:`scan_tiling` under ``config``; ``index_scale`` None is 1 / sqrt(Di)."""
    scale = 1.0 / math.sqrt(index_dim) if index_scale is None else float(index_scale)
    config = scan_tiling(n_rows, batch, max_pages, sms, {**DECODE_SCORES_DEFAULTS, **config})
    program = decode_scores_fp8_program if fp8 else decode_scores_program
    return program, dict(groups=groups, index_dim=index_dim, block_size=block_size, scale=scale, dtype=dtype, **config)


def scan_kernel(*, device, **args):
    """The compiled :func:`scan_build` for ``device``."""
    program, kwargs = scan_build(sms=sm_count(device), **args)
    return compiled_kernel(program, **kwargs)


def decode_block_scores(q_idx: torch.Tensor, k_idx_pages: torch.Tensor, block_table: torch.Tensor,
                        seqlens: torch.Tensor, block_size: int, index_scale: float | None = None,
                        k_idx_scale: torch.Tensor | None = None, **config) -> torch.Tensor:
    """Block scores of each row's newest S tokens over its cached index keys, on the GPU.

    q_idx [B, S, G, Di]; k_idx_pages [num_pages, Bk, Di] (pages of ``block_size`` tokens; float8_e4m3fn codes
    with ``k_idx_scale`` [num_pages, Bk] fp32, or q_idx's dtype); block_table [B, max_pages] int32; seqlens [B]
    int32 (each >= S) -> [B, S, G, max_pages] float32, -inf where nothing is visible. ``config``:
    :data:`DECODE_SCORES_DEFAULTS` knobs and ``keys_major``, ``rows``, ``blocks_per_cta`` (default
    :func:`scan_tiling`).
    """
    B, S, G, Di = q_idx.shape
    if k_idx_pages.shape[1] != block_size:
        raise ValueError(f"the decode scores read pages of one block: page size {k_idx_pages.shape[1]} != "
                         f"block size {block_size}")
    scores = torch.empty((B, S * G, block_table.shape[1]), device=q_idx.device, dtype=torch.float32)
    kernel = scan_kernel(n_rows=S * G, batch=B, max_pages=block_table.shape[1], groups=G, index_dim=Di,
                         block_size=block_size, index_scale=index_scale, dtype=tl_dtype(q_idx.dtype),
                         fp8=k_idx_scale is not None, device=q_idx.device, **config)
    scales = () if k_idx_scale is None else (k_idx_scale,)
    kernel(q_idx.view(B, S * G, Di), k_idx_pages, *scales, block_table, seqlens, scores)
    return scores.view(B, S, G, -1)


def _scan_defaults(fp8: bool):
    def defaults(shape: dict) -> dict:
        """The scan's knobs as :func:`scan_tiling` picks them on a Hopper GPU of 132 SMs."""
        tiling = scan_tiling(decode_rows(shape), shape.get("batch", 1), -(-shape["seq"] // shape["block_size"]),
                             HOPPER_SMS, DECODE_SCORES_DEFAULTS)
        config = dict({k: tiling[k] for k in ("blocks_per_cta", "num_stages", "keys_major")}, shuffle_max=False)
        return dict(config, pages=1) if fp8 else config

    return defaults


def _reject_scan(fp8: bool):
    def reject(config: dict, shape: dict):
        pages = config.get("pages", 1)
        if (pages > 1 or config["shuffle_max"]) and not config["keys_major"]:
            return "two pages a stage and shuffle_max need keys_major"
        if config["blocks_per_cta"] % pages:
            return f"blocks_per_cta {config['blocks_per_cta']} is not a multiple of pages {pages}"
        rows = query_rows_tile(decode_rows(shape), config["keys_major"])
        Bk, Di = shape["block_size"], shape["index_dim"]
        stage = pages * Bk * (Di * (1 if fp8 else 2) + (4 if fp8 else 0))
        if config["num_stages"] * stage + rows * Di * 2 + pages * rows * Bk * 4 > SMEM_LIMIT:
            return "shared memory"
        return None

    return reject


def _scan_units(fp8: bool):
    def units(shape: dict, config: dict) -> list:
        return [scan_build(n_rows=decode_rows(shape), batch=shape.get("batch", 1),
                           max_pages=-(-shape["seq"] // shape["block_size"]), groups=shape["groups"],
                           index_dim=shape["index_dim"], block_size=shape["block_size"], index_scale=None,
                           dtype="bfloat16", fp8=fp8, sms=HOPPER_SMS, **config)]

    return units


def _scan_trial(fp8: bool):
    def gpu_trial(shape: dict, check_seq: int) -> tuple:
        from msa_tl.decode.plan import decode_trial

        return decode_trial("scores", shape, check_seq, fp8=fp8)

    return gpu_trial


DECODE_SCAN_TUNING = TunableProgram(
    name="decode_scan", dims=DECODE_DIMS["scan"], defaults=_scan_defaults(False), knobs=DECODE_SCORES_KNOBS,
    reject=_reject_scan(False), compile_units=_scan_units(False), gpu_trial=_scan_trial(False))
DECODE_SCAN_FP8_TUNING = TunableProgram(
    name="decode_scan_fp8", dims=DECODE_DIMS["scan"], defaults=_scan_defaults(True), knobs=DECODE_SCORES_FP8_KNOBS,
    reject=_reject_scan(True), compile_units=_scan_units(True), gpu_trial=_scan_trial(True))
