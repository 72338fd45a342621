"""LSE combine (TileLang): merge each (query, head)'s <= topk partial outputs of the KV-outer attention.

    m = max_s lse_s,  w_s = exp(lse_s - m),  o = sum_s w_s o_s / sum_s w_s,  lse = m + log sum_s w_s

Unused slots carry lse = -inf (their partial is never read). A row with no used
slot gets o = 0 and lse = -inf; a NaN partial LSE (a NaN score in its block)
makes the row's o and lse NaN, as in dense attention. Memory-bound: it reads each
partial once and writes O in the input dtype and LSE in float32.
"""

import tilelang.language as T

COMBINE_DEFAULTS = dict(rows=64, threads=128)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def combine_program(heads: int, head_dim: int, topk: int, groups: int, rows: int = 64, threads: int = 128,
                    dtype: str = "bfloat16", partial_dtype: str = "bfloat16", skip_empty: bool = False):
    """Opart [B, C*G, topk, R, D], Lpart [B, C*G, topk, R] (R = Hq / G; -inf = unused slot) -> O [B, N, Hq, D], LSE [B, N, Hq].

    Row ``t * Hq + h`` of the chunk (h = g * R + r) merges ``Opart[b, t * G + g, :, r]``. ``skip_empty``: a CTA
    whose rows have no used slot (rows left to :mod:`msa_tl.shared_tiles`) writes them without reading partials.
    """
    batch, seq, n_tg = T.dynamic("batch, seq, n_tg")  # n_tg: the chunk's (query, KV head) pairs
    R = heads // groups
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
            r0 = bx * rows
            if skip_empty:
                if T.get_thread_binding() == 0:
                    used[0] = 0
                T.sync_threads()
            for r in T.Parallel(rows):
                stats[r, 0] = neg_inf
                stats[r, 1] = 0.0
                for s in T.serial(topk):
                    if r0 + r < rows_c:
                        stats[r, 0] = T.max(stats[r, 0], Lpart[b, (r0 + r) // R, s, (r0 + r) % R])
                for s in T.serial(topk):
                    weight[r, s] = 0.0
                    if r0 + r < rows_c:
                        if Lpart[b, (r0 + r) // R, s, (r0 + r) % R] != neg_inf:  # NaN passes: exp2(NaN) poisons the row
                            weight[r, s] = T.exp2((Lpart[b, (r0 + r) // R, s, (r0 + r) % R] - stats[r, 0]) * _LOG2E)
                    stats[r, 1] += weight[r, s]
                if skip_empty:
                    if stats[r, 1] != 0.0:
                        used[0] = 1
            T.clear(acc)
            if skip_empty:
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
