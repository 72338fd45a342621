"""Decode attention over the chosen blocks of a paged cache (TileLang), split over the slots, then the LSE combine.

Each of a row's newest S tokens (position p = seqlens[b] - S + s) attends, per group, to its chosen blocks, whose
keys and values sit in the pages ``block_table[b, blk]`` (pages of one block). Decode has few (token, group) pairs
(B * S * G: 4 at B = 1, S = 1), so each pair's ``topk`` slots are split over ``splits`` CTAs (flash-decoding): a CTA
walks its slots as :mod:`msa_tl.attention.q_outer` walks a query's blocks (the R heads of the group are the rows,
one online-softmax step a block, causal only in the token's own block) and leaves an fp32 partial O and LSE; the
combine (:func:`decode_combine_program`) merges the splits. Split partials with no block (LSE -inf) drop out.

The combine is its own kernel rather than the prefill's (:mod:`msa_tl.attention.combine`, 64 rows a CTA walking the
slots in turn): at B = 1 the partials are 512 KB, which that kernel's single CTA reads in ~60 us, so here a CTA
takes one (token, group)'s R heads and 32 of the D columns, every split's loads in flight at once.
"""

import math

import tilelang.language as T
import torch

from msa_tl.attention.q_outer import attend_block_buffers, attend_block_macro
from msa_tl.decode.union import (UNION_TOKENS, decode_union_roles_program, union_ctas_per_sm, union_limit,
                                 union_splits, union_tile_rows, union_tokens)
from msa_tl.tl_compile import compiled_kernel, sm_count, tl_dtype
from msa_tl.tunable import DECODE_DIMS, HOPPER_SMS, TunableProgram

# ctas_per_sm sizes the splits (attention_splits), not the program: the CTAs of a step at about that many an SM.
# union: the row's newest tokens attend together over the union of their blocks (msa_tl.decode.union; num_stages
# is then its rings' depth); tokens: how many a CTA takes; skip_idle: with two consumer warpgroups, one whose tokens
# did not choose a block releases it unread.
DECODE_ATTENTION_DEFAULTS = dict(threads=128, num_stages=2, pipelined=False, ctas_per_sm=2, union=False, tokens=8,
                                 skip_idle=False)
DECODE_ATTENTION_KNOBS = dict(num_stages=(1, 2, 3), pipelined=(False, True), ctas_per_sm=(1, 2, 4),
                              union=(False, True), tokens=UNION_TOKENS, skip_idle=(False, True))  # tuner choices
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def attention_defaults(shape: dict, sms: int = HOPPER_SMS) -> dict:
    """The config the decode attention runs at ``shape`` (batch, queries, heads, groups, head_dim, block_size, topk)
    without a tuned one: with several newest tokens a row the union kernel, 8 tokens a CTA where those CTAs (batch x
    groups x chunks of 8) fill the ``sms`` SMs, else 4 (twice the CTAs); with one token a row, or a layout the union
    kernel does not take, the per-pair kernel. On the H100 at S = 8 (benchmarks/NOTES.md, session 22) the union
    steps were 1.08-3.9x the per-pair ones, and 4 tokens beat 8 by 4-5% only where 8 left SMs idle."""
    config = dict(DECODE_ATTENTION_DEFAULTS)
    queries = shape.get("queries", 1)
    if queries == 1:
        return config
    dims = (shape["head_dim"], shape["block_size"], shape["topk"], config["num_stages"])
    fits = [t for t in (8, 4) if union_limit(union_tokens(t, queries), shape["heads"] // shape["groups"], *dims) is None]
    if not fits:
        return config
    idle = shape.get("batch", 1) * shape["groups"] * math.ceil(queries / 8) < sms
    return dict(config, union=True, tokens=4 if idle and 4 in fits else fits[0])


def _decode_attention(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float, splits: int,
                      threads: int, num_stages: int, dtype: str, pipelined: bool, pdl: bool = False):
    """Q [B, S, Hq, D], K / V pages [num_pages, Bk, G, D], BlockTable [B, max_pages], SeqLens [B], Indices
    [B, S, G, topk] -> Opart [B, S*G, splits, R, D], Lpart [B, S*G, splits, R] (fp32; natural-log LSE)."""
    batch, n_q, num_pages, max_pages = T.dynamic("batch, n_q, num_pages, max_pages")
    R = heads // groups
    M = max(R, 16)  # MMA rows: fewer heads per group than one m16 tile are padded with zero rows
    per_split = math.ceil(topk / splits)
    neg_inf = -T.infinity("float32")
    scale_log2 = scale * _LOG2E
    attend = attend_block_macro(M, block_size, head_dim, scale)

    @T.prim_func
    def decode_attention(
        Q: T.Tensor((batch, n_q, heads, head_dim), dtype),
        Kc: T.Tensor((num_pages, block_size, groups, head_dim), dtype),
        Vc: T.Tensor((num_pages, block_size, groups, head_dim), dtype),
        BlockTable: T.Tensor((batch, max_pages), "int32"),
        SeqLens: T.Tensor((batch,), "int32"),
        Indices: T.Tensor((batch, n_q, groups, topk), "int32"),
        Opart: T.Tensor((batch, n_q * groups, splits, R, head_dim), "float32"),
        Lpart: T.Tensor((batch, n_q * groups, splits, R), "float32"),
    ):
        with T.Kernel(n_q * splits, batch * groups, threads=threads) as (ts, bg):
            buf = attend_block_buffers(M, block_size, head_dim, dtype)
            Q_s, acc_o, row_max, row_sum, rescale_s = buf.q, buf.acc_o, buf.row_max, buf.row_sum, buf.rescale
            b, g = bg // groups, bg % groups
            t, sp = ts // splits, ts % splits
            if pdl:
                T.pdl_sync()  # the selection has finished
            pos = SeqLens[b] - n_q + t  # the token's position in its row
            for r, d in T.Parallel(M, head_dim):
                Q_s[r, d] = T.if_then_else(r < R, Q[b, t, g * R + r % R, d], 0)
            T.clear(acc_o)
            T.clear(row_sum)
            T.fill(row_max, neg_inf)
            if pipelined:
                # the used slots lead (the top-k writes -1 only after them): the split's share is a trip count and
                # the body has no branch, so TileLang gives the K / V copies a TMA producer warpgroup
                used = T.alloc_var("int32")
                used = 0
                for s in T.unroll(topk):
                    used += T.if_then_else(Indices[b, t, g, s] >= 0, 1, 0)
                for i in T.Pipelined(T.max(T.min(per_split, used - sp * per_split), 0), num_stages=num_stages):
                    blk = Indices[b, t, g, sp * per_split + i]
                    attend(Kc[BlockTable[b, blk], :, g, :], Vc[BlockTable[b, blk], :, g, :], blk * block_size, pos,
                           *buf)
            else:
                for i in T.Pipelined(per_split, num_stages=num_stages):
                    blk = T.if_then_else(sp * per_split + i < topk,
                                         Indices[b, t, g, T.min(sp * per_split + i, topk - 1)], -1)
                    if blk >= 0:
                        attend(Kc[BlockTable[b, blk], :, g, :], Vc[BlockTable[b, blk], :, g, :], blk * block_size,
                               pos, *buf)
            for r in T.Parallel(M):
                rescale_s[r] = row_sum[r]
            for r, d in T.Parallel(M, head_dim):  # a NaN sum passes into O and the LSE, as in dense attention
                if r < R:
                    Opart[b, t * groups + g, sp, r, d] = T.if_then_else(rescale_s[r] == 0, 0,
                                                                        acc_o[r, d] / rescale_s[r])
            for r in T.Parallel(M):
                if r < R:  # a split with no block: -inf, which the combine leaves out
                    Lpart[b, t * groups + g, sp, r] = T.if_then_else(
                        row_sum[r] == 0, neg_inf, (row_max[r] * scale_log2 + T.log2(row_sum[r])) * _LN2)
            if pdl:
                T.pdl_trigger()

    return decode_attention


def decode_attention_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int, scale: float,
                             splits: int = 1, threads: int = 128, num_stages: int = 2, dtype: str = "bfloat16",
                             pdl: bool = False):
    """The split attention, each slot behind a branch (a -1 slot is skipped wherever it sits); its K / V loads are
    plain loads in the consumer's threads. Tensors as :func:`_decode_attention`; ``pdl``: programmatic dependent
    launch (:mod:`msa_tl.decode.plan`)."""
    return _decode_attention(groups, heads, head_dim, block_size, topk, scale, splits, threads, num_stages, dtype,
                             pipelined=False, pdl=pdl)


# As the Q-outer kernel it follows (msa_tl.attention.q_outer): TileLang's warp-specialised lowering gave wrong rows
# there at Bk = 64.
decode_attention_program.pass_configs = {"tl.disable_warp_specialized": True}


def decode_attention_pipelined_program(groups: int, heads: int, head_dim: int, block_size: int, topk: int,
                                       scale: float, splits: int = 1, threads: int = 128, num_stages: int = 2,
                                       dtype: str = "bfloat16", pdl: bool = False):
    """The split attention with its K / V pages loaded by a TMA producer warpgroup (TileLang's warp-specialised
    pipeline): the used slots must lead each row of Indices, as the top-k writes them. It passes its GPU test on the
    H200 but was slower there (16.1 against 13.7 us at 1M, B = 1; 37.4 against 33.8 at B = 8), so it is not the
    default (:data:`DECODE_ATTENTION_DEFAULTS` ``pipelined``). Tensors as :func:`_decode_attention`. Without warp specialisation this loop's dynamic trip
    count fails TileLang's CUDA codegen ("Downcast from tirx.Sub to IntImm")."""
    return _decode_attention(groups, heads, head_dim, block_size, topk, scale, splits, threads, num_stages, dtype,
                             pipelined=True, pdl=pdl)


DECODE_COMBINE_COLUMNS = 32  # head-dim columns a combine CTA merges (16 rows x 8 threads x 4 floats)


def decode_combine_program(heads: int, groups: int, head_dim: int, splits: int, dtype: str = "bfloat16",
                           pdl: bool = False):
    """Opart [B, S*G, splits, R, D], Lpart [B, S*G, splits, R] fp32 (:func:`decode_attention_program`) -> O
    [B, S*G, R, D] (= [B, S, Hq, D]), LSE [B, S*G, R] fp32 (natural log). R <= 16. ``pdl``: programmatic
    dependent launch (:mod:`msa_tl.decode.plan`)."""
    batch, n_tg = T.dynamic("batch, n_tg")
    R, cols, vec = heads // groups, DECODE_COMBINE_COLUMNS, 4
    if R > 16 or head_dim % cols:
        raise ValueError(f"decode combine: {R} heads a group (at most 16), head dim {head_dim} (a multiple of {cols})")
    neg_inf = -T.infinity("float32")

    @T.prim_func
    def decode_combine(
        Opart: T.Tensor((batch, n_tg, splits, R, head_dim), "float32"),
        Lpart: T.Tensor((batch, n_tg, splits, R), "float32"),
        O: T.Tensor((batch, n_tg, R, head_dim), dtype),
        LSE: T.Tensor((batch, n_tg, R), "float32"),
    ):
        with T.Kernel(head_dim // cols, n_tg, batch, threads=16 * cols // vec) as (bd, tg, b):
            weight = T.alloc_local((splits,), "float32")  # [splits] this row's split weights
            acc = T.alloc_local((vec,), "float32")  # [vec] its columns c .. c + 3
            row_max = T.alloc_local((1,), "float32")
            row_sum = T.alloc_local((1,), "float32")
            tx = T.get_thread_binding()
            r, c = tx // (cols // vec), bd * cols + tx % (cols // vec) * vec
            if pdl:
                T.pdl_sync()  # the split attention has finished
            if r < R:
                row_max[0] = neg_inf
                for s in T.unroll(splits):
                    row_max[0] = T.max(row_max[0], Lpart[b, tg, s, r])
                row_sum[0] = 0.0
                for s in T.unroll(splits):  # NaN passes: it poisons the row's sum, so its output
                    weight[s] = T.if_then_else(Lpart[b, tg, s, r] != neg_inf,
                                               T.exp2((Lpart[b, tg, s, r] - row_max[0]) * _LOG2E), 0.0)
                    row_sum[0] += weight[s]
                for v in T.unroll(vec):
                    acc[v] = 0.0
                for s in T.unroll(splits):
                    for v in T.unroll(vec):
                        acc[v] += weight[s] * Opart[b, tg, s, r, c + v]
                for v in T.unroll(vec):  # no split with a block: o = 0, lse = -inf; a NaN sum passes
                    O[b, tg, r, c + v] = T.if_then_else(row_sum[0] == 0, 0.0, acc[v] / row_sum[0])
                if tx % (cols // vec) == 0 and bd == 0:
                    LSE[b, tg, r] = T.if_then_else(row_sum[0] == 0, neg_inf, row_max[0] + T.log(row_sum[0]))
            if pdl:
                T.pdl_trigger()  # the next layer's scan may launch

    return decode_combine


def attention_build(queries: int = 1, **config) -> tuple:
    """(program, kwargs) of the split attention of ``queries`` newest tokens a row for ``config``
    (:data:`DECODE_ATTENTION_DEFAULTS` knobs over the defaults; ``union`` and ``pipelined`` pick the builder;
    ``ctas_per_sm`` was spent on ``splits``)."""
    config = {**DECODE_ATTENTION_DEFAULTS, **config}
    config.pop("ctas_per_sm")
    union, tokens, skip_idle = config.pop("union"), config.pop("tokens"), config.pop("skip_idle")
    pipelined = config.pop("pipelined")
    if union:
        config.pop("threads")  # the union kernel sizes its own: a consumer warpgroup a 64 rows and a producer
        stages = config.pop("num_stages")
        return decode_union_roles_program, dict(config, tokens=union_tokens(tokens, queries), stages=stages,
                                                **(dict(skip_idle=True) if skip_idle else {}))
    builder = decode_attention_pipelined_program if pipelined else decode_attention_program
    return builder, config


def attention_kernel(**config):
    """The compiled :func:`attention_build`."""
    builder, kwargs = attention_build(**config)
    return compiled_kernel(builder, **kwargs)


def attention_splits(batch: int, queries: int, groups: int, head_dim: int, block_size: int, topk: int, device=None,
                     sms: int | None = None, **config) -> int:
    """Splits of the attention's work for ``config``: of each (token, group) pair's slots (:func:`decode_splits`),
    or with ``union`` of each (row, group, chunk of tokens)'s union (:func:`msa_tl.decode.union.union_splits`, at
    as many CTAs an SM as fit)."""
    config = {**DECODE_ATTENTION_DEFAULTS, **config}
    sms = sms or sm_count(device)
    if not config["union"]:
        return decode_splits(batch * queries * groups, topk, None, sms=sms, ctas_per_sm=config["ctas_per_sm"])
    tokens = union_tokens(config["tokens"], queries)
    ctas = min(config["ctas_per_sm"], union_ctas_per_sm(tokens, head_dim, block_size, topk, config["num_stages"]))
    return union_splits(batch * groups * math.ceil(queries / tokens), tokens, topk, sms, ctas)


def decode_splits(pairs: int, topk: int, device, sms: int | None = None, ctas_per_sm: int = 2) -> int:
    """Splits of each (token, group) pair's slots: enough CTAs for ``ctas_per_sm`` an SM (of ``device``, or
    ``sms``), at most one slot a CTA."""
    return max(1, min(topk, math.ceil(ctas_per_sm * (sms or sm_count(device)) / pairs)))


def decode_attention(q, k_pages, v_pages, block_table, seqlens, indices, block_size: int, scale=None, *,
                     splits=None, **config):
    """Attention of each row's newest S tokens over their chosen blocks, on the GPU.

    q [B, S, Hq, D]; k_pages / v_pages [num_pages, Bk, G, D] (pages of ``block_size`` tokens); block_table
    [B, max_pages] int32; seqlens [B] int32 (each >= S); indices [B, S, G, topk] int32 (-1 = unused; after the
    used slots if ``pipelined``) -> (o [B, S, Hq, D] in q's dtype, lse [B, S, Hq] float32). ``splits`` (default
    :func:`attention_splits`) CTAs share each (token, group) pair's slots, or with ``union`` each chunk's union of
    blocks; ``config``: :data:`DECODE_ATTENTION_DEFAULTS` knobs over :func:`attention_defaults`.
    """
    B, S, Hq, D = q.shape
    G, topk = k_pages.shape[2], indices.shape[3]
    if k_pages.shape[1] != block_size:
        raise ValueError(f"decode attention reads pages of one block: page size {k_pages.shape[1]} != block size "
                         f"{block_size}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    shape = dict(batch=B, queries=S, heads=Hq, groups=G, head_dim=D, block_size=block_size, topk=topk)
    config = {**attention_defaults(shape, sm_count(q.device)), **config}
    splits = splits or attention_splits(B, S, G, D, block_size, topk, q.device, **config)
    R = Hq // G
    o_part = torch.empty((B, S * G, splits, R, D), device=q.device, dtype=torch.float32)
    l_part = torch.empty((B, S * G, splits, R), device=q.device, dtype=torch.float32)
    kernel = attention_kernel(queries=S, groups=G, heads=Hq, head_dim=D, block_size=block_size, topk=topk,
                              scale=scale, splits=splits, dtype=tl_dtype(q.dtype), **config)
    kernel(q, k_pages, v_pages, block_table, seqlens, indices, o_part, l_part)
    o = torch.empty_like(q)
    lse = torch.empty((B, S, Hq), device=q.device, dtype=torch.float32)
    combine = compiled_kernel(decode_combine_program, heads=Hq, groups=G, head_dim=D, splits=splits,
                              dtype=tl_dtype(q.dtype))
    combine(o_part, l_part, o.view(B, S * G, R, D), lse.view(B, S * G, R))
    return o, lse


def _attention_units(shape: dict, config: dict) -> list:
    dims = dict(groups=shape["groups"], heads=shape["heads"], head_dim=shape["head_dim"],
                block_size=shape["block_size"], topk=shape["topk"])
    queries = shape.get("queries", 1)
    splits = attention_splits(shape.get("batch", 1), queries, shape["groups"], shape["head_dim"], shape["block_size"],
                              shape["topk"], sms=HOPPER_SMS, **config)
    return [attention_build(queries=queries, scale=1.0 / math.sqrt(shape["head_dim"]), splits=splits,
                            dtype="bfloat16", **dims, **config)]


def _attention_trial(shape: dict, check_seq: int) -> tuple:
    from msa_tl.decode.plan import decode_trial

    return decode_trial("attention", shape, check_seq)


def _reject_attention(config: dict, shape: dict):
    if config["pipelined"]:
        # TileLang 0.1.15's ThreadSync pass warns, lowering this build, that it hoisted a barrier out of a branch
        # holding both ends of a shared-memory conflict ("the race remains"); it also measured slower (NOTES.md)
        return "the pipelined build: TileLang hoists a barrier out of a branch with a shared-memory race left in it"
    queries = shape.get("queries", 1)
    if not config["union"]:
        if config["skip_idle"]:
            return "skip_idle is the union's"
        return "tokens sizes the union only" if config["tokens"] != DECODE_ATTENTION_DEFAULTS["tokens"] else None
    if queries == 1:
        return "one token a row: no union to share"
    smaller = [t for t in UNION_TOKENS if t < config["tokens"]]
    if smaller and smaller[-1] >= queries:
        return f"tokens={config['tokens']} takes the row's {queries} tokens as tokens={smaller[-1]} does"
    tokens = union_tokens(config["tokens"], queries)
    if config["skip_idle"] and union_tile_rows(tokens, shape["heads"] // shape["groups"]) <= 64:
        return "skip_idle with one consumer: every block is its own (the same kernel as without)"
    dims = (shape["head_dim"], shape["block_size"], shape["topk"], config["num_stages"])
    fit = union_ctas_per_sm(tokens, *dims)
    return union_limit(tokens, shape["heads"] // shape["groups"], *dims) or (
        f"{config['ctas_per_sm']} CTAs an SM: {fit} fit" if config["ctas_per_sm"] > fit else None)


def _tuning_defaults(shape: dict) -> dict:
    """:func:`attention_defaults` as a point of the search space: the union's CTAs an SM cut to those that fit, as
    :func:`attention_splits` cuts them (the same kernel and splits; the space holds each once)."""
    config = {k: v for k, v in attention_defaults(shape).items() if k in DECODE_ATTENTION_KNOBS}
    if config["union"]:
        dims = (shape["head_dim"], shape["block_size"], shape["topk"], config["num_stages"])
        fit = union_ctas_per_sm(union_tokens(config["tokens"], shape.get("queries", 1)), *dims)
        config["ctas_per_sm"] = min(config["ctas_per_sm"], fit)
    return config


DECODE_ATTENTION_TUNING = TunableProgram(
    name="decode_attention", dims=DECODE_DIMS["attention"],
    defaults=_tuning_defaults, knobs=DECODE_ATTENTION_KNOBS,
    reject=_reject_attention, compile_units=_attention_units, gpu_trial=_attention_trial)
