"""MSA decode steps against dense decode over the same cache, timed in one process.

    python -m benchmarks.bench_decode [--cases paper|grid|all|none] [--scan-sweep] [--fp8-quality] [--radix]
                                      [--ab VARIANT ... [--ab-cases NxBxS ...] [--ab-index bf16|fp8|fp8+rescore]]

Paper shape: Hq=64, G=4, D=Di=128, Bk=128 (= page size), k=16, bf16, pages in random order; index keys bf16 and
FP8 (e4m3 codes and a scale per token, from the same keys). Each step is timed as
serving runs it, from a CUDA graph: ours is one :class:`msa_tl.decode.plan.DecodePlan` run (index scan, top-k, split
attention, LSE combine); dense is torch SDPA over the contiguous cache (flash, cuDNN and efficient backends, the
fastest; S > 1 with a bottom-right causal mask). The stages are also timed alone. Bytes: dense reads all K and V
(B N G D 2 B x 2); ours reads the index keys (B N Di 2 B) plus at most B S G k Bk D 2 B x 2 of K and V, so their
ratio bounds the speedup; the scan's rate is reported against the device copy rate measured in the same run.

Index modes: bf16 keys, FP8 keys, FP8 keys whose best 2 (k - 1) blocks the bf16 keys rank again (``rescore``), and with
``--radix`` each of them again with the radix-select top-k.

``paper``: context 128K and 1M at batch 1, 8 and 32 (1M at 1 and 8), S = 1 and 8. ``grid``: MiniMax's serving
grid, batch 8 / 32 / 64 / 128 x context 1K-200K, 8 queries a request (the whole step only). Cases that do not fit in memory are skipped
and said so. ``--scan-sweep`` times the scan's blocks_per_cta x num_stages (x pages, FP8), bf16 and FP8 keys, at three sizes,
and the top-k's warps x unroll at 128K and 1M; ``--fp8-quality``
measures the FP8 selection's recall of the bf16 one and both outputs' error against the float64 reference (random
keys; B = 1, S = 8, 128K and 1M). ``--ab`` times named plan variants (``AB_VARIANTS``: the draft tokens'
attention per pair or over the union at 4 / 8 tokens a CTA and with idle consumers skipping, PDL, the scan's shuffle max, the radix top-k, rows in waves) against the default plan in interleaved
rounds, the whole step and, for attention variants, the attention alone on the plan's selection (random keys: a
row's tokens barely share blocks) and at S > 1 on a correlated one (every token takes token 0's blocks). Writes
``decode.csv`` (and ``decode_scan_sweep.csv``, ``decode_ab.csv``).
"""

import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from msa_tl.benchmark import BenchTable, time_ms
from msa_tl.decode.plan import DecodePlan
from msa_tl.decode.scores import DECODE_SCORES_FP8_KNOBS
from msa_tl.decode.topk import DECODE_TOPK_KNOBS
from msa_tl.ops.cache import default_candidates
from msa_tl.reference import quantize_fp8

HQ, G, D, DI, BK, TOPK = 64, 4, 128, 128, 128, 16
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
PAPER_CASES = [(N, B, S) for N, B in [(131072, 1), (131072, 8), (131072, 32), (1 << 20, 1), (1 << 20, 8)]
               for S in (1, 8)]
GRID_CASES = [(N, B, 8) for B in (8, 32, 64, 128) for N in (1024, 8192, 32768, 131072, 204800)]
# the index keys a step scores: bf16, FP8, and FP8 whose best 2 (k - 1) blocks the bf16 keys rank again
INDEX_MODES = {"bf16": dict(index_fp8=False), "fp8": dict(index_fp8=True),
               "fp8+rescore": dict(index_fp8=True, rescore_candidates=default_candidates(TOPK))}
# --radix: each mode again with the radix-select top-k
RADIX_MODES = {f"{name}+radix": dict(options, topk_config=dict(radix=True)) for name, options in INDEX_MODES.items()}


def mode_keys(options, k_idx_pages, codes, k_scale):
    """(the scan's key tensors, the exact keys a rescoring plan's select takes or None) of a mode's plan options."""
    if not options["index_fp8"]:
        return (k_idx_pages,), None
    return (codes, k_scale), (k_idx_pages if options.get("rescore_candidates") else None)


def run_plan(plan, q, q_idx, k_pages, v_pages, scan_keys, exact):
    return plan.run(q, q_idx, k_pages, v_pages, *scan_keys, *(() if exact is None else (exact,)))


def graph_ms(fn, rep_ms: float = 1000) -> float:
    """Median ms of replaying a CUDA graph of ``fn`` (warmed up outside the capture)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, warmup_ms=min(200, rep_ms), rep_ms=rep_ms)


def cache_bytes(N, B):
    return B * math.ceil(N / BK) * BK * (2 * G * D + DI) * 2


def paged_cache(N, B, S, gen):
    """Pages of K, V [B*pages, Bk, G, D] and index keys [B*pages, Bk, Di] in random order, every row N tokens."""
    pages = math.ceil(N / BK)
    table = torch.randperm(B * pages, device="cuda", generator=gen).view(B, pages).int()  # [B, pages]
    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    k_pages, v_pages, k_idx_pages = rand(B * pages, BK, G, D), rand(B * pages, BK, G, D), rand(B * pages, BK, DI)
    q, q_idx = rand(B, S, HQ, D), rand(B, S, G, DI)
    seqlens = torch.full((B,), N, device="cuda", dtype=torch.int32)
    return table, seqlens, k_pages, v_pages, k_idx_pages, q, q_idx


def dense_decode_ms(q, k_pages, v_pages, N, rep_ms=1000):
    """Fastest SDPA backend's graph time over the pages seen as one contiguous [B, G, N, D] cache, and its name."""
    B, S = q.shape[:2]
    kd = k_pages.view(B, -1, G, D)[:, :N].transpose(1, 2)  # [B, G, N, D]
    vd = v_pages.view(B, -1, G, D)[:, :N].transpose(1, 2)
    qd = q.transpose(1, 2)  # [B, Hq, S, D]
    mask = causal_lower_right(S, N) if S > 1 else None
    times = {}
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                times[name] = graph_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask,
                                                                              enable_gqa=True), rep_ms)
        except RuntimeError:  # a backend that does not take this shape or mask
            continue
    best = min(times, key=times.get)
    return times[best], best, times


def copy_rate_gbs() -> float:
    x = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    return 2 * x.numel() / time_ms(lambda: y.copy_(x)) / 1e6


def bench_case(table_out, N, B, S, copy_gbs, gen, stages=True, modes=INDEX_MODES):
    free = torch.cuda.mem_get_info()[0]
    if cache_bytes(N, B) * 1.2 > free:
        print(f"N={N} B={B} S={S}: skipped, the cache ({cache_bytes(N, B) / 2**30:.1f} GiB) does not fit", flush=True)
        return
    table, seqlens, k_pages, v_pages, k_idx_pages, q, q_idx = paged_cache(N, B, S, gen)
    codes, k_scale = quantize_fp8(k_idx_pages)
    rep_ms = 1000 if stages else 300
    dense_ms, dense_name, dense_all = dense_decode_ms(q, k_pages, v_pages, N, rep_ms)
    dense_bytes = B * N * G * D * 2 * 2
    chosen = {}
    for name, options in modes.items():
        plan = DecodePlan(table, seqlens, queries=S, heads=HQ, groups=G, head_dim=D, index_dim=DI, block_size=BK,
                          topk=TOPK, **options)
        keys, exact = mode_keys(options, k_idx_pages, codes, k_scale)
        step_ms = graph_ms(lambda: run_plan(plan, q, q_idx, k_pages, v_pages, keys, exact), rep_ms)
        scores = plan.index_scores(q_idx, *keys)
        indices = chosen[name] = plan.select(scores, q_idx, exact)
        nan = float("nan")
        scan_ms = graph_ms(lambda: plan.index_scores(q_idx, *keys)) if stages else nan
        select_ms = graph_ms(lambda: plan.select(scores, q_idx, exact)) if stages else nan
        attend_ms = graph_ms(lambda: plan.attend(q, k_pages, v_pages, indices)) if stages else nan
        pipelined_ms = nan
        if stages and name == "bf16":  # the attention with TMA-loaded K / V (not yet the default)
            piped = DecodePlan(table, seqlens, queries=S, heads=HQ, groups=G, head_dim=D, index_dim=DI, block_size=BK,
                               topk=TOPK, attention_config=dict(pipelined=True))
            pipelined_ms = graph_ms(lambda: piped.attend(q, k_pages, v_pages, indices))
            del piped
        index_bytes = B * N * (DI + 4 if options["index_fp8"] else DI * 2)
        rescore_bytes = B * S * G * plan.rescore_candidates * BK * DI * 2
        ours_bytes = index_bytes + rescore_bytes + B * min(S * TOPK, math.ceil(N / BK)) * G * BK * D * 2 * 2
        scan_gbs = index_bytes / scan_ms / 1e6
        row = table_out.add(what="decode step", B=B, N=N, S=S, Hq=HQ, G=G, D=D, Di=DI, Bk=BK, k=TOPK, dtype="bf16",
                            index_dtype=name, ours_us=step_ms * 1e3, scan_us=scan_ms * 1e3,
                            select_us=select_ms * 1e3, attend_us=attend_ms * 1e3, dense_us=dense_ms * 1e3,
                            attend_pipelined_us=pipelined_ms * 1e3,
                            dense_backend=dense_name, speedup=dense_ms / step_ms, bytes_limit=dense_bytes / ours_bytes,
                            scan_gbs=scan_gbs, scan_pct_of_copy=100 * scan_gbs / copy_gbs, splits=plan.splits,
                            dense_all_us=" ".join(f"{k}:{v * 1e3:.0f}" for k, v in dense_all.items()))
        if name != "bf16":
            row["fp8_recall"] = selection_recall(chosen[name], chosen["bf16"])  # of the first mode, bf16
        print(f"N={N:8d} B={B:3d} S={S} {name:11s}: ours {row['ours_us']:7.1f} us (scan {row['scan_us']:.1f}, select "
              f"{row['select_us']:.1f}, attend {row['attend_us']:.1f}, TMA-pipelined "
              f"{row['attend_pipelined_us']:.1f}) | dense {row['dense_us']:8.1f} us "
              f"({dense_name}) -> {row['speedup']:6.2f}x of a {row['bytes_limit']:.2f}x bytes limit; scan "
              f"{scan_gbs:.0f} GB/s ({row['scan_pct_of_copy']:.0f}% of copy)"
              + (f"; recall of the bf16 selection {row['fp8_recall']:.4f}" if name != "bf16" else ""), flush=True)
        del plan, scores
    del table, k_pages, v_pages, k_idx_pages, codes, k_scale
    torch.cuda.empty_cache()


def selection_recall(got, want):
    """Fraction of the blocks ``want`` [B, S, G, k] chooses that ``got`` chooses too (-1 slots left out)."""
    hit = (got[..., :, None] == want[..., None, :]).any(-2) & (want >= 0)
    return (hit.sum() / (want >= 0).sum()).item()


def fp8_quality(N, S, gen):
    """At context N, batch 1: recall of the bf16 kernels' selection by the FP8 ones (alone and rescored), and each
    path's output error against the float64 reference over the unquantised keys."""
    from msa_tl import reference as R
    from msa_tl.checks import relative_error

    table, seqlens, k_pages, v_pages, k_idx_pages, q, q_idx = paged_cache(N, 1, S, gen)
    codes, k_scale = quantize_fp8(k_idx_pages)
    ref_o, _, _ = R.msa_decode(q, q_idx, k_pages, v_pages, k_idx_pages, table, [N], BK, TOPK)
    out = {}
    for name, options in INDEX_MODES.items():
        plan = DecodePlan(table, seqlens, queries=S, heads=HQ, groups=G, head_dim=D, index_dim=DI, block_size=BK,
                          topk=TOPK, **options)
        out[name] = run_plan(plan, q, q_idx, k_pages, v_pages, *mode_keys(options, k_idx_pages, codes, k_scale))
    recall = {name: selection_recall(out[name][2], out["bf16"][2]) for name in ("fp8", "fp8+rescore")}
    errors = {k: relative_error(v[0], ref_o) for k, v in out.items()}
    print(f"FP8 quality N={N} S={S}: recall of the bf16 selection: fp8 {recall['fp8']:.4f}, fp8+rescore "
          f"{recall['fp8+rescore']:.4f}; output rel err vs float64: bf16 index {errors['bf16']:.2e}, fp8 index "
          f"{errors['fp8']:.2e}, fp8+rescore {errors['fp8+rescore']:.2e}", flush=True)
    return dict(what="fp8 index quality", N=N, B=1, S=S, fp8_recall=recall["fp8"],
                rescore_recall=recall["fp8+rescore"], rel_err_bf16_index=errors["bf16"],
                rel_err_fp8_index=errors["fp8"], rel_err_rescore=errors["fp8+rescore"])


def scan_sweep(copy_gbs, gen):
    """The keys-major scan's blocks_per_cta x num_stages (x pages a stage, FP8) for bf16 and FP8 keys, each timed
    from a graph, at three sizes."""
    sweep = BenchTable("decode_scan_sweep")
    for N, B, S in [(1 << 20, 1, 1), (131072, 8, 1), (131072, 32, 8)]:
        table, seqlens, _, _, k_idx_pages, _, q_idx = paged_cache(N, B, S, gen)
        codes, k_scale = quantize_fp8(k_idx_pages)
        for index_fp8 in (False, True):
            keys = (codes, k_scale) if index_fp8 else (k_idx_pages,)
            for pages in DECODE_SCORES_FP8_KNOBS["pages"] if index_fp8 else (1,):
                for bpc in DECODE_SCORES_FP8_KNOBS["blocks_per_cta"]:
                    for stages in (3, 4):
                        plan = DecodePlan(table, seqlens, queries=S, heads=HQ, groups=G, head_dim=D, index_dim=DI,
                                          block_size=BK, topk=TOPK, index_fp8=index_fp8,
                                          scores_config=dict(blocks_per_cta=bpc, num_stages=stages, keys_major=True,
                                                             **({"pages": pages} if index_fp8 else {})))
                        ms = graph_ms(lambda: plan.index_scores(q_idx, *keys), 300)
                        gbs = B * N * (DI + 4 if index_fp8 else 2 * DI) / ms / 1e6
                        sweep.add(what="decode scan", B=B, N=N, S=S, index_dtype="fp8" if index_fp8 else "bf16",
                                  keys_major=True, pages=pages, blocks_per_cta=bpc, num_stages=stages, us=ms * 1e3,
                                  gbs=gbs, pct_of_copy=100 * gbs / copy_gbs)
                        print(f"scan N={N} B={B} S={S} {'fp8' if index_fp8 else 'bf16'} pages={pages} "
                              f"blocks_per_cta={bpc:2d} stages={stages}: {ms * 1e3:7.1f} us {gbs:6.0f} GB/s "
                              f"({100 * gbs / copy_gbs:.0f}% of copy)", flush=True)
        del table, k_idx_pages, codes, k_scale
        torch.cuda.empty_cache()
    print(f"wrote {sweep.write_csv()}")


def select_sweep(gen):
    """The top-k's warps a row x loads in flight (``unroll``) at 128K and 1M, one token a row, from graphs; then the
    radix select against the lists at k and 2k - 1 slots (and whether it chose the same)."""
    sweep = BenchTable("decode_select_sweep")
    for N in (131072, 1 << 20):
        table, seqlens, _, _, k_idx_pages, _, q_idx = paged_cache(N, 1, 1, gen)
        plan = DecodePlan(table, seqlens, queries=1, heads=HQ, groups=G, head_dim=D, index_dim=DI, block_size=BK,
                          topk=TOPK)
        scores = plan.index_scores(q_idx, k_idx_pages).clone()
        for warps in DECODE_TOPK_KNOBS["warps"]:
            for unroll in DECODE_TOPK_KNOBS["unroll"]:
                variant = DecodePlan(table, seqlens, queries=1, heads=HQ, groups=G, head_dim=D, index_dim=DI,
                                     block_size=BK, topk=TOPK, topk_config=dict(warps=warps, unroll=unroll))
                ms = graph_ms(lambda: variant.select(scores), 300)
                sweep.add(what="decode top-k", B=1, N=N, S=1, warps=warps, unroll=unroll, us=ms * 1e3)
                print(f"top-k N={N} warps={warps:2d} unroll={unroll:2d}: {ms * 1e3:6.1f} us", flush=True)
        # the radix select against the lists (default knobs) at k and at the rescore's 2k - 1 candidate slots
        for slots in (TOPK, 1 + default_candidates(TOPK)):
            for radix in (False, True):
                variant = DecodePlan(table, seqlens, queries=1, heads=HQ, groups=G, head_dim=D, index_dim=DI,
                                     block_size=BK, topk=slots, topk_config=dict(radix=radix))
                ms = graph_ms(lambda: variant.select(scores), 300)
                same = torch.equal(variant.select(scores), DecodePlan(
                    table, seqlens, queries=1, heads=HQ, groups=G, head_dim=D, index_dim=DI, block_size=BK,
                    topk=slots).select(scores))
                sweep.add(what="decode top-k", B=1, N=N, S=1, slots=slots, radix=radix, us=ms * 1e3, same=same)
                print(f"top-k N={N} slots={slots} {'radix' if radix else 'lists'}: {ms * 1e3:6.1f} us "
                      f"(same as the lists: {same})", flush=True)
        del table, k_idx_pages, plan, scores
        torch.cuda.empty_cache()
    print(f"wrote {sweep.write_csv()}")


# --ab: plan options against the default plan, by name
AB_VARIANTS = {
    "per-pair": dict(attention_config=dict(union=False)),  # S > 1: the attention before the union default
    "union-4": dict(attention_config=dict(union=True, tokens=4)),
    "union-8": dict(attention_config=dict(union=True, tokens=8)),
    "union-8-skip": dict(attention_config=dict(union=True, tokens=8, skip_idle=True)),
    "pipelined": dict(attention_config=dict(union=False, pipelined=True)),
    "pdl": dict(pdl=True),
    "keys_major": dict(scores_config=dict(keys_major=True)),
    "shuffle_max": dict(scores_config=dict(keys_major=True, shuffle_max=True)),
    "radix": dict(topk_config=dict(radix=True)),
    "waves2": dict(waves=2),
    "waves4": dict(waves=4),
}
AB_CASES = [(1024, 128, 8), (8192, 128, 8), (32768, 32, 8), (131072, 8, 8), (131072, 32, 8), (1 << 20, 8, 8),
            (131072, 1, 1), (1 << 20, 1, 1)]


def correlated_indices(indices):
    """Every token of a row takes token 0's blocks (valid for the later tokens, which see at least as far)."""
    return indices[:, :1].expand_as(indices).contiguous()


def variants_ab(cases, variants, gen, rounds=2, index="bf16"):
    """Each named plan variant against the default plan, in ``rounds`` interleaved rounds, with dense in the same
    process: the whole step, and the attention alone where the variant changes it (on the plan's selection, and at
    S > 1 on a correlated one where every token takes token 0's blocks). Outputs are compared with the default's.
    ``index``: the index keys every plan scores (an :data:`INDEX_MODES` name)."""
    base = INDEX_MODES[index]
    ab = BenchTable("decode_ab")
    for N, B, S in cases:
        if cache_bytes(N, B) * 1.2 > torch.cuda.mem_get_info()[0]:
            print(f"A/B N={N} B={B} S={S}: skipped, the cache does not fit", flush=True)
            continue
        table, seqlens, k_pages, v_pages, k_idx_pages, q, q_idx = paged_cache(N, B, S, gen)
        fp8_keys = quantize_fp8(k_idx_pages) if base["index_fp8"] else (None, None)  # (codes, scales)
        keys, exact = mode_keys(base, k_idx_pages, *fp8_keys)
        step = lambda plan: run_plan(plan, q, q_idx, k_pages, v_pages, keys, exact)  # noqa: E731
        dense_ms, dense_name, _ = dense_decode_ms(q, k_pages, v_pages, N, 300)
        plans = {name: DecodePlan(table, seqlens, queries=S, heads=HQ, groups=G, head_dim=D, index_dim=DI,
                                  block_size=BK, topk=TOPK, **base, **options)
                 for name, options in [("default", {})] + [(v, AB_VARIANTS[v]) for v in variants]
                 if (S > 1 or not options.get("attention_config", {}).get("union"))  # union: draft tokens only
                 and B % options.get("waves", 1) == 0}
        want = step(plans["default"])
        selections = {"random": want[2]}
        if S > 1:
            selections["correlated"] = correlated_indices(want[2])
        for name, plan in plans.items():
            got = step(plan)
            same_indices = torch.equal(got[2], want[2])
            o_diff = (got[0].float() - want[0].float()).abs().max().item()
            for round_ in range(rounds):
                step_ms = graph_ms(lambda: step(plan), 300)
                row = dict(what="decode A/B", B=B, N=N, S=S, Hq=HQ, G=G, D=D, Bk=BK, k=TOPK, index_dtype=index,
                           variant=name, round=round_, step_us=step_ms * 1e3, dense_us=dense_ms * 1e3, dense_backend=dense_name,
                           step_speedup=dense_ms / step_ms, same_indices=same_indices, max_o_diff=o_diff,
                           splits=getattr(plan, "splits", None))
                attends = name == "default" or "attention_config" in AB_VARIANTS.get(name, {})
                for kind, chosen in selections.items():
                    if attends and plan.waves == 1:
                        row[f"attend_{kind}_us"] = graph_ms(lambda: plan.attend(q, k_pages, v_pages, chosen),
                                                            300) * 1e3
                ab.add(**row)
                attend = ", ".join(f"attention {k} {row[f'attend_{k}_us']:.1f} us" for k in selections
                                   if f"attend_{k}_us" in row)
                print(f"A/B N={N:8d} B={B:3d} S={S} {index} {name:12s} round {round_}: step {row['step_us']:7.1f} us "
                      f"({row['step_speedup']:.2f}x dense {row['dense_us']:.1f} us {dense_name}){'; ' + attend if attend else ''}"
                      f"; same indices {same_indices}, max |o - default| {o_diff:.2e}", flush=True)
        del plans, table, k_pages, v_pages, k_idx_pages, want, keys, exact, fp8_keys
        torch.cuda.empty_cache()
    print(f"wrote {ab.write_csv()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", choices=("paper", "grid", "all", "none"), default="paper")
    parser.add_argument("--scan-sweep", action="store_true")
    parser.add_argument("--fp8-quality", action="store_true", help="FP8 selection recall and output error, 128K, 1M")
    parser.add_argument("--radix", action="store_true", help="each index mode again with the radix-select top-k")
    parser.add_argument("--ab", nargs="+", metavar="VARIANT", choices=sorted(AB_VARIANTS),
                        help="plan variants timed against the default plan (steps, and the attention alone)")
    parser.add_argument("--ab-cases", nargs="+", metavar="NxBxS", help="the A/B's cases (default: AB_CASES)")
    parser.add_argument("--ab-index", choices=sorted(INDEX_MODES), default="bf16",
                        help="the index keys every plan of the A/B scores")
    args = parser.parse_args()
    modes = {**INDEX_MODES, **(RADIX_MODES if args.radix else {})}
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbs = copy_rate_gbs()
    table = BenchTable("decode")
    table.add(what="ceiling: device copy 1 GiB (read + write)", rate=copy_gbs, unit="GB/s")
    print(f"device copy: {copy_gbs:.0f} GB/s", flush=True)
    if args.ab:
        cases = [tuple(map(int, c.split("x"))) for c in args.ab_cases] if args.ab_cases else AB_CASES
        variants_ab(cases, args.ab, gen, index=args.ab_index)
    if args.scan_sweep:
        scan_sweep(copy_gbs, gen)
        select_sweep(gen)
    if args.cases in ("paper", "all"):
        for N, B, S in PAPER_CASES:
            bench_case(table, N, B, S, copy_gbs, gen, modes=modes)
    if args.cases in ("grid", "all"):  # the step and dense only: 40 rows
        for N, B, S in GRID_CASES:
            bench_case(table, N, B, S, copy_gbs, gen, stages=False, modes=modes)
    if args.fp8_quality:
        for N in (131072, 1 << 20):
            table.add(**fp8_quality(N, 8, gen))
    table.name = {"grid": "decode_grid"}.get(args.cases, "decode")
    print(f"wrote {table.write_csv()}")


if __name__ == "__main__":
    main()
