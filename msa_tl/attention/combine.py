"""LSE combine (TileLang): merge each (query, head)'s <= topk partial outputs of the KV-outer attention.

    m = max_s lse_s,  w_s = exp(lse_s - m),  o = sum_s w_s o_s / sum_s w_s,  lse = m + log sum_s w_s

Unused slots carry lse = -inf (their partial is never read). A row with no used
slot gets o = 0 and lse = -inf; a NaN partial LSE (a NaN score in its block)
makes the row's o and lse NaN, as in dense attention. Memory-bound: it reads each
partial once and writes O in the input dtype and LSE in float32. Two programs:
:func:`combine_program` (a CTA per 64 rows, per-thread loads) and
:func:`persistent_combine_program` (a CTA an SM, TMA bulk copies of whole pairs into a ring).
"""

import tilelang.language as T

from msa_tl.tl_compile import SMEM_LIMIT
from msa_tl.tunable import TunableProgram


COMBINE_DEFAULTS = dict(rows=64, threads=128)
COMBINE_KNOBS = dict(rows=(32, 64, 128), threads=(128, 256))  # the tuner's choices (COMBINE_TUNING)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def combine_program(heads: int, head_dim: int, topk: int, groups: int, rows: int = 64, threads: int = 128,
                    dtype: str = "bfloat16", partial_dtype: str = "bfloat16", skip_empty: bool = False):
    """Opart [B, C*G, topk, R, D], Lpart [B, C*G, topk, R] (R = Hq / G; -inf = unused slot) -> O [B, N, Hq, D], LSE [B, N, Hq].

    Row ``t * Hq + h`` of the chunk (h = g * R + r) merges ``Opart[b, t * G + g, :, r]``. ``skip_empty``: a CTA
    whose rows have no used slot (rows left to :mod:`msa_tl.attention.shared_tiles`) writes them without reading partials.
    """
    batch, seq, n_tg = T.dynamic("batch, seq, n_tg")  # n_tg: the chunk's (query, KV head) pairs
    R = heads // groups
    if rows > threads:
        raise ValueError(f"combine: rows ({rows}) must not exceed threads ({threads}): a thread a row's statistics")
    neg_inf = -T.infinity("float32")

    @T.prim_func
    def lse_combine(
        Opart: T.Tensor((batch, n_tg, topk, R, head_dim), partial_dtype),
        Lpart: T.Tensor((batch, n_tg, topk, R), "float32"),
        O: T.Tensor((batch, seq * heads, head_dim), dtype),
        LSE: T.Tensor((batch, seq * heads), "float32"),
        t0: T.int32,
    ):
        with T.Kernel(T.ceildiv(n_tg * R, rows), batch, threads=threads) as (bx, b):
            rows_c = n_tg * R
            weight = T.alloc_shared((rows, topk), "float32")
            stats = T.alloc_shared((rows, 2), "float32")  # running max, sum of weights
            used = T.alloc_shared((1,), "int32")  # some row of the CTA has a used slot
            acc = T.alloc_fragment((rows, head_dim), "float32")
            row_max = T.alloc_local((1,), "float32")
            row_sum = T.alloc_local((1,), "float32")
            w = T.alloc_local((1,), "float32")
            r0 = bx * rows
            r = T.get_thread_binding()  # thread r < rows owns row r0 + r's statistics
            if skip_empty:
                if r == 0:
                    used[0] = 0
                T.sync_threads()
            # One thread a row, its running max and sum in registers: each shared slot is written once, by its
            # owner, before the barrier that every later reader passes.
            if r < rows:
                row_max[0] = neg_inf
                row_sum[0] = 0.0
                if r0 + r < rows_c:
                    for s in T.serial(topk):
                        row_max[0] = T.max(row_max[0], Lpart[b, (r0 + r) // R, s, (r0 + r) % R])
                for s in T.serial(topk):
                    w[0] = 0.0
                    if r0 + r < rows_c:
                        if Lpart[b, (r0 + r) // R, s, (r0 + r) % R] != neg_inf:  # NaN passes: exp2(NaN) poisons the row
                            w[0] = T.exp2((Lpart[b, (r0 + r) // R, s, (r0 + r) % R] - row_max[0]) * _LOG2E)
                    weight[r, s] = w[0]
                    row_sum[0] += w[0]
                stats[r, 0] = row_max[0]
                stats[r, 1] = row_sum[0]
                if skip_empty:
                    if row_sum[0] != 0.0:
                        used[0] = 1  # every writer writes 1
            T.clear(acc)
            T.sync_threads()
            if not skip_empty or used[0] != 0:
                for s in T.serial(topk):
                    # a select, not an `if`: unused slots hold garbage (even NaN) that must not reach acc.
                    # (An `if` here is vectorised by TileLang 0.1.15 into a test of an uninitialised copy.)
                    for r, d in T.Parallel(rows, head_dim):
                        acc[r, d] += T.if_then_else(weight[r, s] > 0,
                                                    weight[r, s] * Opart[b, (r0 + r) // R, s, (r0 + r) % R, d], 0.0)
            for r, d in T.Parallel(rows, head_dim):
                if r0 + r < rows_c:
                    O[b, t0 * heads + r0 + r, d] = T.if_then_else(stats[r, 1] == 0.0, 0.0, acc[r, d] / stats[r, 1])
            for r in T.Parallel(rows):
                if r0 + r < rows_c:
                    LSE[b, t0 * heads + r0 + r] = stats[r, 0] + T.log2(stats[r, 1]) * _LN2

    return lse_combine


# ctas: CTAs of the persistent combine (None: one an SM; its ring fills most of an SM's shared memory);
# stages: the ring's depth; pairs: (query, KV head) pairs a stage (None: as many as fit 64 KB and divide G,
# so a stage never straddles the chunk's end).
PERSISTENT_COMBINE_DEFAULTS = dict(ctas=None, stages=3, threads=256, pairs=None)
_STAGE_BYTES = 64 * 1024
_SHARED_BYTES = SMEM_LIMIT - 7 * 1024  # the ring's share: the rest holds the weights and barriers


def _pair_bytes(heads: int, head_dim: int, topk: int, groups: int, partial_bytes: int) -> int:
    """Bytes of one (query, KV head) pair's partials: topk x R rows of D values and an LSE."""
    return topk * heads // groups * (head_dim * partial_bytes + 4)


def stage_pairs(heads: int, head_dim: int, topk: int, groups: int, partial_bytes: int = 2) -> int:
    """(query, KV head) pairs a ring stage holds: the largest power of two dividing G within 64 KB (at least 1)."""
    pair_bytes = _pair_bytes(heads, head_dim, topk, groups, partial_bytes)
    pairs = 1
    while groups % (2 * pairs) == 0 and 2 * pairs * pair_bytes <= _STAGE_BYTES:
        pairs *= 2
    return pairs


def persistent_combine_limit(heads: int, head_dim: int, topk: int, groups: int, partial_bytes: int,
                             config: dict) -> str | None:
    """None if :func:`persistent_combine_program` takes this shape and config, else why not."""
    pairs = config.get("pairs") or stage_pairs(heads, head_dim, topk, groups, partial_bytes)
    stage = pairs * _pair_bytes(heads, head_dim, topk, groups, partial_bytes)
    if groups % pairs:
        return f"pairs={pairs} does not divide the {groups} KV heads"
    if stage * config["stages"] > _SHARED_BYTES:
        return f"{config['stages']} stages of {stage} bytes exceed {_SHARED_BYTES} bytes of shared memory"
    return None


def persistent_combine_program(heads: int, head_dim: int, topk: int, groups: int, ctas: int = 132, stages: int = 3,
                               threads: int = 256, pairs: int | None = None, dtype: str = "bfloat16",
                               partial_dtype: str = "bfloat16"):
    """:func:`combine_program`'s merge on ``ctas`` persistent CTAs, each streaming its share of the chunk through a ring.

    Same tensors and results as :func:`combine_program` (to fp32 rounding: the weights are summed as a
    tree). Each CTA takes every ``ctas``-th stage of ``pairs`` (query, KV head) pairs: a pair's partials
    ``Opart[b, pair]`` [topk, R, D] are one contiguous block (64 KB at the paper's shape), copied by a TMA
    bulk copy into a ``stages``-deep ring while the stages before it are merged (TileLang's warp
    specialisation makes the producer warp and the mbarriers). One CTA an SM moves a 128K forward's
    partials 6% faster than :func:`combine_program`'s per-thread loads (NOTES.md).
    """
    batch, seq, n_tg = T.dynamic("batch, seq, n_tg")
    R = heads // groups
    partial_bytes = 4 if partial_dtype == "float32" else 2
    unfit = persistent_combine_limit(heads, head_dim, topk, groups, partial_bytes, dict(stages=stages, pairs=pairs))
    if unfit:
        raise ValueError(f"persistent combine: {unfit}")
    P = pairs or stage_pairs(heads, head_dim, topk, groups, partial_bytes)
    TK = 1 << (topk - 1).bit_length()  # the slots padded to a power of two: the row reductions need one
    neg_inf = -T.infinity("float32")

    @T.prim_func
    def persistent_combine(
        Opart: T.Tensor((batch, n_tg, topk, R, head_dim), partial_dtype),
        Lpart: T.Tensor((batch, n_tg, topk, R), "float32"),
        O: T.Tensor((batch, seq * heads, head_dim), dtype),
        LSE: T.Tensor((batch, seq * heads), "float32"),
        t0: T.int32,
    ):
        with T.Kernel(ctas, threads=threads) as cta:
            O_s = T.alloc_shared((P, topk, R, head_dim), partial_dtype)  # [P, topk, R, D], one ring stage
            L_s = T.alloc_shared((P, topk, R), "float32")
            weight = T.alloc_shared((P * R, TK), "float32")
            stats = T.alloc_shared((P * R, 2), "float32")  # max, sum of weights
            lse_f = T.alloc_fragment((P * R, TK), "float32")  # slots past topk: -inf
            max_f = T.alloc_fragment((P * R,), "float32")
            sum_f = T.alloc_fragment((P * R,), "float32")
            acc = T.alloc_fragment((P, R, head_dim), "float32")
            n_units = n_tg // P
            for b in T.serial(batch):
                for it in T.Pipelined(T.ceildiv(n_units - cta, ctas), num_stages=stages):
                    u = cta + it * ctas
                    T.copy(Lpart[b, u * P:(u + 1) * P, :, :], L_s)
                    T.copy(Opart[b, u * P:(u + 1) * P, :, :, :], O_s)
                    for i, s in T.Parallel(P * R, TK):  # [P * R, TK]
                        lse_f[i, s] = T.if_then_else(s < topk, L_s[i // R, T.min(s, topk - 1), i % R], neg_inf)
                    T.reduce_max(lse_f, max_f, dim=1)
                    for i, s in T.Parallel(P * R, TK):  # NaN passes: exp2(NaN) poisons the row
                        lse_f[i, s] = T.if_then_else(lse_f[i, s] != neg_inf,
                                                     T.exp2((lse_f[i, s] - max_f[i]) * _LOG2E), 0.0)
                    T.reduce_sum(lse_f, sum_f, dim=1)
                    T.copy(lse_f, weight)
                    for i in T.Parallel(P * R):
                        stats[i, 0] = max_f[i]
                        stats[i, 1] = sum_f[i]
                    T.clear(acc)
                    for s in T.serial(topk):
                        for pp, r, d in T.Parallel(P, R, head_dim):  # a select: unused slots hold garbage
                            acc[pp, r, d] += T.if_then_else(weight[pp * R + r, s] > 0,
                                                            weight[pp * R + r, s] * O_s[pp, s, r, d], 0.0)
                    for pp, r, d in T.Parallel(P, R, head_dim):
                        O[b, t0 * heads + (u * P + pp) * R + r, d] = T.if_then_else(
                            stats[pp * R + r, 1] == 0.0, 0.0, acc[pp, r, d] / stats[pp * R + r, 1])
                    for i in T.Parallel(P * R):
                        LSE[b, t0 * heads + u * P * R + i] = stats[i, 0] + T.log2(stats[i, 1]) * _LN2

    return persistent_combine


def _reject_combine(config: dict, shape: dict):
    if config["rows"] * shape["head_dim"] // config["threads"] > 128:
        return "too many accumulator registers per thread"
    return None


def _compile_units(shape: dict, config: dict) -> list:
    return [(combine_program, dict(heads=shape["heads"], head_dim=shape["head_dim"], topk=shape["topk"],
                                   groups=shape["groups"], dtype="bfloat16", partial_dtype="bfloat16", **config))]


def _gpu_trial(shape: dict, check_seq: int) -> tuple:
    """Timed: the kernel alone on the last (heaviest) query chunk's random partials, every slot merged."""
    import torch

    from msa_tl.attention.kv_outer import driver_forward, forward_trial
    from msa_tl.tl_compile import compiled_kernel

    rows, D = shape["seq"] * shape["heads"], shape["head_dim"]

    def launch(config, c):
        kernel = compiled_kernel(combine_program, **_compile_units(shape, config)[0][1])
        c.l_part.copy_(torch.randn_like(c.l_part))  # finite LSEs: every slot is merged
        return lambda: kernel(c.o_part, c.l_part, c.o.view(1, rows, D), c.lse.view(1, rows), c.t0)

    return forward_trial(shape, check_seq, driver_forward(shape, "combine_config"), launch)


COMBINE_TUNING = TunableProgram(
    name="lse_combine", dims=("heads", "head_dim", "topk"), defaults=COMBINE_DEFAULTS, knobs=COMBINE_KNOBS,
    reject=_reject_combine, compile_units=_compile_units, gpu_trial=_gpu_trial)


COMBINE_WARP_THREADS = 64  # the producer warpgroup's last two warps
# the combine warps' L2 prefetch of slot boxes beyond their ring (a bulk prefetch takes no shared memory)
COMBINE_PREFETCH_CUDA = r"""
__device__ __forceinline__ void msa_prefetch_l2(const void *ptr, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(ptr), "r"(bytes) : "memory");
}
"""


def combine_warps_limit(heads: int, head_dim: int, topk: int, groups: int, stages: int) -> str | None:
    """None if :func:`combine_warps_macro` takes this shape and ring, else why not."""
    R, D = heads // groups, head_dim
    if (R * D) % (8 * COMBINE_WARP_THREADS):
        return (f"combine warps: a slot's {R} x {D} box must split into 16-byte pieces over {COMBINE_WARP_THREADS} "
                f"threads")
    if R * D // COMBINE_WARP_THREADS > 32:
        return (f"combine warps: a slot's {R} x {D} box leaves {R * D // COMBINE_WARP_THREADS} accumulators a thread, "
                f"more than the 32 their registers hold")
    if not 1 <= stages <= topk:
        return (f"combine warps: 1 <= combine_stages <= topk ({topk}), got {stages}: the ring holds at most one "
                f"unit's slots, so a unit's LSE buffer is free again when the next but one loads")
    return None


def combine_warps_shared_bytes(heads: int, head_dim: int, topk: int, groups: int, stages: int) -> int:
    """Shared memory of :func:`combine_warps_buffers` (16-bit partials): the ring of ``stages`` slot boxes [R, D],
    two units' LSEs [topk, R], the weights [topk, R], the weight sums and their threads' partial maxima and sums
    [1 + 2 * COMBINE_WARP_THREADS // R, R] and the ring's barriers."""
    R = heads // groups
    return stages * R * head_dim * 2 + 3 * topk * R * 4 + (1 + 2 * _weight_threads(R)) * R * 4 + 8 * stages


def _weight_threads(R: int) -> int:
    """Threads a head's weights are split over: each takes every this-many-th slot of the unit."""
    return max(COMBINE_WARP_THREADS // R, 1)


def combine_warps_buffers(heads: int, head_dim: int, topk: int, groups: int, stages: int, partial_dtype: str,
                          dtype: str) -> tuple:
    """Inside the kernel: :func:`combine_warps_macro`'s buffers, in its argument order: the ring [stages, R, D], the
    LSEs [2, topk, R], the weights [topk, R], their sums [1 + 2 S, R] (row 0; then the S threads' partial maxima and
    partial sums of each head), the ring's mbarriers (32 arrivals), and the locals (accumulators
    [R * D / COMBINE_WARP_THREADS] fp32, a 16-byte piece in and out)."""
    R, D = heads // groups, head_dim
    c_ring = T.alloc_shared((stages, R, D), partial_dtype)
    c_lse = T.alloc_shared((2, topk, R), "float32")
    c_wt = T.alloc_shared((topk, R), "float32")
    c_sum = T.alloc_shared((1 + 2 * _weight_threads(R), R), "float32")
    c_full = T.alloc_barrier([32] * stages)
    c_acc = T.alloc_local((R * D // COMBINE_WARP_THREADS,), "float32")
    c_xv = T.alloc_local((8,), partial_dtype)
    c_ov = T.alloc_local((8,), dtype)
    return c_ring, c_lse, c_wt, c_sum, c_full, c_acc, c_xv, c_ov


def combine_warps_macro(heads: int, head_dim: int, topk: int, groups: int, stages: int, dtype: str,
                        prefetch: int = 0):
    """Macro ``combine_previous(cw, item, n_live, units, b, g, t_first, OpartPrev, LpartPrev, O, LSE, ring, lse_s,
    wt_s, sum_s, full, acc, xv, ov)``: :func:`combine_program`'s merge, run by ``COMBINE_WARP_THREADS`` threads (cw
    0..63) of a KV-outer attention CTA while its consumers work, on the partials of the *previous* query chunk.

    The previous chunk's ``units`` queries of KV head g (batch b) are split evenly over ``n_live`` attention CTAs of
    (b, g); CTA ``item`` (< n_live) merges its share, unit u being query ``t_first + u``'s R
    heads: OpartPrev [B, >= units * G * topk * R, D] (rows as the attention writes them), LpartPrev [B, >= units * G
    * topk, R]. A unit's topk slot boxes [R, D] stream through ``ring`` [stages, R, D] (one TMA copy a slot, the
    unit's LSEs [topk, R] with its first into ``lse_s`` [2, topk, R]; mbarriers ``full`` of 32 arrivals: the first
    warp issues and arrives); weights ``wt_s`` [topk, R] as :func:`combine_program`'s, computed by S = 64 / R
    threads a head, each over every S-th slot (so the weights' sum is added in S parts: equal to the combine's
    within fp32 rounding), their sums in row 0 of ``sum_s`` [1 + 2 S, R] (then the threads' partial maxima and
    sums); O [B, rows, D] and LSE [B, rows] at row (t_first + u) * heads + g * R + r. An unused slot's box is
    neither read nor added (a branch a 16-byte piece). The buffers come from :func:`combine_warps_buffers` (``acc``,
    ``xv``, ``ov``: its locals). The two warps meet on named barrier 6 once a slot, so a ring slot is refilled only
    after both have read it, and three times a unit for its weights. ``prefetch`` > 0:
    the first thread also asks the L2 for the slot box ``prefetch`` stages past the ring's (a bulk prefetch, with
    :data:`COMBINE_PREFETCH_CUDA` as the kernel's prelude), so the ring's copies find their boxes in the L2 and each
    SM keeps ``stages + prefetch`` boxes in flight for the shared memory of ``stages``.
    """
    unfit = combine_warps_limit(heads, head_dim, topk, groups, stages)
    if unfit:
        raise ValueError(unfit)
    R, D = heads // groups, head_dim
    pieces = R * D // 8 // COMBINE_WARP_THREADS  # 16-byte pieces of a slot box a thread
    S = _weight_threads(R)
    neg_inf = -T.infinity("float32")

    def piece(cw, j):
        """Piece cw + 64 j of a slot box: (its head, its first column of 8)."""
        return ((cw + COMBINE_WARP_THREADS * j) // (D // 8), (cw + COMBINE_WARP_THREADS * j) % (D // 8) * 8)

    @T.macro
    def issue(k, u0, b, g, OpartPrev, LpartPrev, ring, lse_s, full):
        """The first warp: stage k (slot k % topk of unit u0 + k // topk) into ring slot k % stages."""
        pair = (u0 + k // topk) * groups + g
        # read once: evict first, so the partials streaming through the L2 do not push out the chunk's Q rows
        T.tma_copy(OpartPrev[b, (pair * topk + k % topk) * R:(pair * topk + k % topk + 1) * R, :],
                   ring[k % stages, :, :], barrier=full[k % stages], leader_scope_threads=32,
                   eviction_policy="evict_first")
        if k % topk == 0:
            T.tma_copy(LpartPrev[b, pair * topk:(pair + 1) * topk, :], lse_s[(k // topk) % 2, :, :],
                       barrier=full[k % stages], leader_scope_threads=32, eviction_policy="evict_first")
        T.barrier_arrive(full[k % stages])

    @T.macro
    def prefetch_box(k, u0, b, g, OpartPrev, LpartPrev):
        """One thread: an L2 prefetch of stage k's slot box (and of its unit's LSEs with its first)."""
        pair = (u0 + k // topk) * groups + g
        T.call_extern("handle", "msa_prefetch_l2", T.address_of(OpartPrev[b, (pair * topk + k % topk) * R, 0]),
                      R * D * 2)
        if k % topk == 0:
            T.call_extern("handle", "msa_prefetch_l2", T.address_of(LpartPrev[b, pair * topk, 0]), topk * R * 4)

    @T.macro
    def combine_previous(cw, item, n_live, units, b, g, t_first, OpartPrev, LpartPrev, O, LSE, ring, lse_s, wt_s,
                         sum_s, full, acc, xv, ov):
        u0 = T.alloc_var("int32")  # the share's first unit and its stages, computed once (integer divisions)
        n_stages = T.alloc_var("int32")
        u0 = T.if_then_else(item < n_live, item * units // n_live, 0)
        n_stages = T.if_then_else(item < n_live, ((item + 1) * units // n_live) * topk - u0 * topk, 0)
        if cw < 32:
            for k in T.serial(T.min(stages, n_stages)):
                issue(k, u0, b, g, OpartPrev, LpartPrev, ring, lse_s, full)
        if prefetch > 0:
            if cw == 0:
                for k in T.serial(T.max(T.min(stages + prefetch, n_stages) - stages, 0)):
                    prefetch_box(stages + k, u0, b, g, OpartPrev, LpartPrev)
        for k in T.serial(n_stages):
            T.barrier_wait(full[k % stages], (k // stages) & 1)
            if k % topk == 0:  # the unit's weights: head cw % R, every S-th slot from cw // R, on S threads a head
                mx = T.alloc_var("float32")
                sm = T.alloc_var("float32")
                if cw < R * S:
                    mx = neg_inf
                    for i in T.serial(T.ceildiv(topk, S)):
                        if cw // R + i * S < topk:
                            mx = T.max(mx, lse_s[(k // topk) % 2, cw // R + i * S, cw % R])
                    sum_s[1 + cw // R, cw % R] = mx
                T.sync_threads(6, COMBINE_WARP_THREADS)
                if cw < R * S:
                    mx = neg_inf
                    for i in T.serial(S):
                        mx = T.max(mx, sum_s[1 + i, cw % R])
                    sm = 0.0
                    for i in T.serial(T.ceildiv(topk, S)):  # NaN passes: exp2(NaN) poisons the row
                        if cw // R + i * S < topk:
                            wt_s[cw // R + i * S, cw % R] = T.if_then_else(
                                lse_s[(k // topk) % 2, cw // R + i * S, cw % R] != neg_inf,
                                T.exp2((lse_s[(k // topk) % 2, cw // R + i * S, cw % R] - mx) * _LOG2E), 0.0)
                            sm += wt_s[cw // R + i * S, cw % R]
                    sum_s[1 + S + cw // R, cw % R] = sm
                T.sync_threads(6, COMBINE_WARP_THREADS)
                if cw < R:
                    sm = 0.0
                    for i in T.serial(S):
                        sm += sum_s[1 + S + i, cw]
                    sum_s[0, cw] = sm
                    LSE[b, (t_first + u0 + k // topk) * heads + g * R + cw] = mx + T.log2(sm) * _LN2
                T.sync_threads(6, COMBINE_WARP_THREADS)
                for i in T.unroll(pieces * 8):
                    acc[i] = 0.0
            for j in T.unroll(pieces):
                h, col = piece(cw, j)
                # a branch a piece, not a select an element: an unused slot's box holds garbage (even NaN), and
                # a slot is used or unused for all of a query's heads, so the warp does not diverge
                if wt_s[k % topk, h] > 0:
                    for e in T.vectorized(8):
                        xv[e] = ring[k % stages, h, col + e]
                    for e in T.unroll(8):
                        acc[j * 8 + e] += wt_s[k % topk, h] * T.cast(xv[e], "float32")
            if k % topk == topk - 1:
                for j in T.unroll(pieces):
                    h, col = piece(cw, j)
                    for e in T.unroll(8):
                        ov[e] = T.cast(T.if_then_else(sum_s[0, h] == 0.0, 0.0, acc[j * 8 + e] / sum_s[0, h]),
                                       dtype)
                    for e in T.vectorized(8):
                        O[b, (t_first + u0 + k // topk) * heads + g * R + h, col + e] = ov[e]
            T.sync_threads(6, COMBINE_WARP_THREADS)  # both warps are done with ring slot k % stages
            if cw < 32:
                if k + stages < n_stages:
                    issue(k + stages, u0, b, g, OpartPrev, LpartPrev, ring, lse_s, full)
            if prefetch > 0:
                if cw == 0:
                    if k + stages + prefetch < n_stages:
                        prefetch_box(k + stages + prefetch, u0, b, g, OpartPrev, LpartPrev)

    return combine_previous
