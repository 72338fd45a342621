"""Main branch and end-to-end MSA forward against fla's parallel_nsa and dense cuDNN, all timed in one process.

    python -m benchmarks.bench_main [--seq-lens 32768 131072 1048576] [--sweep 131072] [--small-items 131072]

Paper shape: B=1, Hq=64, G=4, D=Di=128, Bk=128, k=16, bf16. Selections:
"random" (the index kernels on random projections) and "realistic" (first
block, the three blocks before the local one, a stripe every 8 blocks).
Useful main-branch FLOPs: 4*D*Bk per (query, head, chosen block). Per stage
the bytes this design must move (Q gathers, K/V loads, partials written and
read back, O and LSE) are set against the copy bandwidth and the GEMM rate
measured in the same run, as % of the stage's floor. ``--sweep N`` also times
the attention and schedule knobs at N, each varied alone, in interleaved rounds
(median and spread; each variant's output against the default's). ``--small-items N`` times the attention kernel
alone at work items of 16-256 queries, per-item and persistent (what partials kept in the L2 would cost in items).
``--overlap N`` times each chunk's combine on a side stream beside the next chunk's attention, at
small chunks and several combine CTA counts, with and without the store warp, against today's path.
``--combine-warps N`` times each chunk merged inside the next chunk's attention kernel (rings, prefetch, chunks).
``--consumers N`` times three consumer warpgroups a CTA against today's two, whole main branch.
``--chunks N`` times the persistent store-warp kernel at query chunks of 2K-16K against today's path, and the
own blocks attended in the combine (``local_combine``).
``--attention-alone N`` times the attention kernel alone at 4K / 16K chunks with and without the store warp.
``--accumulate N`` sets the accumulators (:mod:`msa_tl.attention.accumulate`) at several chunks and item sizes
against the partials path at N, whole main branch, interleaved rounds, each output against the first's.
Writes ``main_branch.csv``.
"""

import argparse
import math
import statistics

import torch

from benchmarks.bench_dense import bench_ceilings, dense_cudnn_ms
from msa_tl.benchmark import BenchTable, time_ms
from msa_tl.index.select import select_blocks
from msa_tl.attention.kv_outer import (SCHEDULE_TUNABLES, attention_defaults, kv_outer_program, persistent_work,
                                       sparse_attention_forward, without_unfit_persistent)
from msa_tl.attention.combine import PERSISTENT_COMBINE_DEFAULTS, persistent_combine_program
from msa_tl.attention.scheduler import Schedule
from msa_tl.tl_compile import compiled_kernel, sm_count

B, HQ, G, D, BK, TOPK = 1, 64, 4, 128, 128, 16
R = HQ // G


def realistic_selection(N):
    """Per row: local block, block 0, the three blocks before the local one, then stripes (blocks = 5 mod 8) newest first."""
    local = (torch.arange(N, device="cuda") // BK)[:, None]
    newest_stripe = local - (local - 5) % 8
    cand = torch.cat([local, torch.zeros_like(local), local - 1, local - 2, local - 3,
                      newest_stripe - 8 * torch.arange(TOPK, device="cuda")[None]], 1)
    cand = torch.where((cand >= 0) & (cand <= local), cand, -1)
    dup = (cand[:, :, None] == cand[:, None, :]).triu(1).any(1) & (cand >= 0)
    cand = torch.where(dup, -1, cand)
    order = torch.sort((cand < 0).int(), dim=1, stable=True).indices
    sel = torch.gather(cand, 1, order)[:, :TOPK].int()
    return sel[None, :, None, :].expand(B, N, G, TOPK).contiguous()


def main_branch_flops(indices):
    """Useful main-branch FLOPs of a selection: 4 D Bk per (query, head, chosen block)."""
    return 4 * D * BK * (indices >= 0).sum().item() * (HQ // G)


def paper_inputs(N):
    """Random bf16 q [B, N, Hq, D], k, v [B, N, G, D], q_idx [B, N, G, D], k_idx [B, N, D] on the GPU."""
    shapes = [(B, N, HQ, D), (B, N, G, D), (B, N, G, D), (B, N, G, D), (B, N, D)]
    return [torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for shape in shapes]


def selections(q_idx, k_idx, kinds=("random", "realistic")):
    """("random", the index kernels' selection on random projections), then ("realistic", the fixed pattern), of
    those named in ``kinds``."""
    if "random" in kinds:
        yield "random", select_blocks(q_idx, k_idx, BK, TOPK)
    if "realistic" in kinds:
        yield "realistic", realistic_selection(q_idx.shape[1])


def fla_selected_attention():
    try:
        from fla.ops.nsa.parallel import ParallelNSAFunction
    except Exception as exc:  # the peer is optional
        print(f"  fla unavailable: {type(exc).__name__}: {exc}")
        return None
    return lambda q, k, v, idx: ParallelNSAFunction.apply(q, k, v, idx.clamp(min=0).long(), TOPK, BK, D ** -0.5, None)


def attention_stage(q, k, v, idx, chunk, item_queries=SCHEDULE_TUNABLES["item_queries"], persistent=None,
                    config=None, merged=0):
    """The KV-outer attention kernel alone over every query chunk of ``chunk`` queries, its schedules built once:
    (run, partials [B, chunk * G, k, R, D] bf16, LSE partials, the chunk starts, the schedules, their item count).
    ``persistent``: None takes the default (dropped where it does not fit), else as asked; ``config``: other knobs
    of the kernel. With ``combine_warps`` in it, each launch's combine warps merge ``merged`` queries' partials (of
    the one partials buffer: the bytes and arithmetic of a previous chunk's merge; its output is not read)."""
    N = q.shape[1]
    starts = list(range(0, N, chunk))
    nblk = math.ceil(N / BK)
    scheds = [Schedule(B, G, nblk, chunk, TOPK, item_queries, "cuda") for _ in starts]
    for sched, t0 in zip(scheds, starts):
        sched.build(idx, t0, min(chunk, N - t0))
    asked = {**({} if persistent is None else dict(persistent=persistent)), **(config or {})}
    config = without_unfit_persistent(dict(attention_defaults(R, 2), **asked), asked, R, D, BK, item_queries, 2)
    if config["persistent"]:
        config["ctas"] = sm_count("cuda")
    att = compiled_kernel(kv_outer_program, groups=G, heads=HQ, head_dim=D, block_size=BK, topk=TOPK,
                          scale=1.0 / math.sqrt(D), item_queries=item_queries, dtype="bfloat16",
                          partial_dtype="bfloat16", **config)
    work = persistent_work(config["ctas"], len(starts), "cuda") if config["persistent"] else None
    op = torch.empty(B, chunk * G, TOPK, HQ // G, D, device="cuda", dtype=torch.bfloat16)
    lp = torch.full((B, chunk * G, TOPK, HQ // G), float("-inf"), device="cuda")
    merge, last = (), ()
    if config.get("combine_warps"):
        o, lse = torch.empty_like(q), torch.empty(q.shape[:3], device="cuda")
        merge = (op.view(B, -1, D), lp.view(B, -1, R), o.view(B, -1, D), lse.view(B, -1))
        last = (0, merged)

    def run():
        if work is not None:
            work.zero_()  # the persistent kernel's item counters start at 0
        for c, (sched, t0) in enumerate(zip(scheds, starts)):
            att(q, k, v, sched.items, sched.item_count, sched.entries, op.view(B, -1, D), lp.view(B, -1), *merge,
                *([] if work is None else [work[c]]), t0, *last)

    items = sum(int(s.item_count.sum()) for s in scheds)
    return run, op, lp, starts, scheds, items


def stage_breakdown(q, k, v, idx, ceilings, chunk=SCHEDULE_TUNABLES["query_chunk"]):
    """Each forward stage of the KV-outer path timed over all query chunks (its default kernels; no shared tiles),
    with the bytes it must move and its floor."""
    N = q.shape[1]
    chunk = min(N, chunk)
    attention, op, lp, starts, scheds, items = attention_stage(q, k, v, idx, chunk)
    comb = compiled_kernel(persistent_combine_program, heads=HQ, head_dim=D, topk=TOPK, groups=G, dtype="bfloat16",
                           partial_dtype="bfloat16", **dict(PERSISTENT_COMBINE_DEFAULTS, ctas=sm_count("cuda")))
    o, lse = torch.empty_like(q), torch.empty(B, N, HQ, device="cuda")

    def combine():
        for t0 in starts:
            comb(op, lp, o.view(B, N * HQ, D), lse.view(B, N * HQ), t0)

    entries = (idx >= 0).sum().item()  # (query, group, slot) entries
    partial_bytes = entries * R * (D * 2 + 4)
    att_bytes = entries * R * D * 2 + items * 2 * BK * D * 2 + partial_bytes  # Q gathers, K/V, partials out
    comb_bytes = partial_bytes + B * N * HQ * (D * 2 + 4)
    flops = 4 * D * BK * entries * R
    bw, gemm = ceilings["GB/s"] * 1e6, ceilings["TFLOP/s"] * 1e9  # bytes / ms, FLOP / ms
    out = {}
    for name, fn, nbytes, nflops in (("scheduler", lambda: [s.build(idx, t0, min(chunk, N - t0)) for s, t0 in
                                                                zip(scheds, starts)], 0, 0),
                                     ("attention", attention, att_bytes, flops), ("combine", combine, comb_bytes, 0)):
        ms = time_ms(fn, rep_ms=1000)
        floor = max(nbytes / bw, nflops / gemm)
        out[name] = dict(ms=ms, gbytes=nbytes / 1e9, floor_ms=floor, pct_of_floor=100 * floor / ms if floor else None,
                         tbps=nbytes / ms / 1e9, tflops=nflops / ms / 1e9 if nflops else None)
    return out


def kernel_rounds(table, row, kind, runs, flops, rounds=3):
    """Each of ``runs`` ({label: (run, extra table columns)}) once a round, ``rounds`` interleaved rounds, so a drift
    of the GPU's clocks reaches all alike; each label's median and spread go into ``table`` and are printed."""
    times = {label: [] for label in runs}
    for _ in range(rounds):
        for label, (run, _) in runs.items():
            times[label].append(time_ms(run, rep_ms=500))
    for label, (_, columns) in runs.items():
        ms = statistics.median(times[label])
        table.add(**row, what=label, selection=kind, **columns, ms=ms, ms_min=min(times[label]),
                  ms_max=max(times[label]), rounds=rounds, tflops=flops / ms / 1e9)
        print(f"  {label:<60} {ms:8.2f} ms (rounds {min(times[label]):.2f}-{max(times[label]):.2f}) "
              f"{flops / ms / 1e9:.0f} TFLOP/s", flush=True)


def small_items(table, row, q, k, v, idx, kind, item_sizes=(16, 32, 64, 256), rounds=3):
    """The attention kernel alone over every chunk (the default chunk) with work items of ``item_sizes`` queries,
    per-item CTAs and persistent, in interleaved rounds: what a design whose items are a few queries of a block
    (partials kept in the L2: chunks of ~400-500 queries choose ~8-16 queries a block at 128K) would pay for them."""
    chunk = min(q.shape[1], SCHEDULE_TUNABLES["query_chunk"])
    runs = {}
    for iq in item_sizes:
        for persistent in (False, True):
            label = f"small items: attention alone, {iq} queries an item, {'persistent' if persistent else 'per-item'}"
            try:
                runs[label] = (attention_stage(q, k, v, idx, chunk, iq, persistent)[0], {})
            except ValueError as err:  # a build the kernel rejects (shared memory)
                print(f"  {label}: skipped: {err}", flush=True)
    kernel_rounds(table, row, kind, runs, main_branch_flops(idx), rounds)


# three consumer warpgroups a CTA: the store warp's per-item kernel without ping-pong, one O tile a consumer
THREE_CONSUMERS = dict(store_warp=True, consumers=3, pingpong=False, o_buffers=1)
ATTENTION_ALONE = {"default": dict(), "store warp": dict(store_warp=True),
                   "persistent, TMA gathers": dict(persistent=True, tma_gathers=True),
                   "persistent, store warp": dict(persistent=True, store_warp=True),
                   "store warp, combine warps merging nothing": dict(store_warp=True, combine_warps=True),
                   "three consumers, store warp": THREE_CONSUMERS}


def attention_alone(table, row, q, k, v, idx, kind, rounds=3):
    """The attention kernel alone over every chunk, at 4K and 16K chunks, per item or persistent, with and without
    the store warp (``ATTENTION_ALONE``), in interleaved rounds (at 4K chunks the kernel is bound by its tiles, not by
    DRAM: what the store warp and the persistent kernel's next item loaded under this one free)."""
    runs = {f"attention alone, {chunk}-query chunks, {name}":
            (attention_stage(q, k, v, idx, chunk, config=config)[0], dict(query_chunk=chunk))
            for chunk in (4096, 16384) for name, config in ATTENTION_ALONE.items()}
    # and merging a whole chunk's partials in every launch, as the forward's combine warps do
    warps = dict(store_warp=True, combine_warps=True)
    runs["attention alone, 4096-query chunks, store warp, combine warps merging a chunk"] = (
        attention_stage(q, k, v, idx, 4096, config=warps, merged=4096)[0], dict(query_chunk=4096))
    kernel_rounds(table, row, kind, runs, main_branch_flops(idx), rounds)


def attention(**config):
    """sparse_attention_forward keywords that set the attention kernel's knobs."""
    return dict(attention_config=config)


def sweep_variants():
    """(label, sparse_attention_forward keywords) of the sweep: the default first, then each knob varied alone."""
    variants = [dict()] + [dict(attention_config=dict(stages=s)) for s in (1, 3)]
    variants += [dict(attention_config=dict(persistent=False)), dict(attention_config=dict(store_eviction=""))]
    variants += [dict(item_queries=128), dict(query_chunk=2048), dict(query_chunk=16384)]
    variants += [dict(build_once=False), dict(shared_tiles=False), dict(persistent_combine=False)]
    return labelled(variants)


def labelled(variants):
    """(label, keywords) of each sparse_attention_forward keyword dict: "key=value, ..." or "defaults"."""
    return [(", ".join(f"{a}={b}" for a, b in kw.items()) or "defaults", kw) for kw in variants]


def accumulate_variants():
    """(label, sparse_attention_forward keywords) of ``--accumulate``: today's partials path first, then the
    accumulators at chunks whose accumulators fit the L2 (16-64 MB at the paper shape), item sizes and stages."""
    variants = [dict(accumulate=False)]
    variants += [dict(accumulate=True, accumulate_config=dict(query_chunk=c)) for c in (1024, 2048, 4096)]
    variants += [dict(accumulate=True, accumulate_config=dict(query_chunk=2048, item_queries=i)) for i in (128, 512)]
    variants += [dict(accumulate=True, accumulate_config=dict(query_chunk=2048, stages=1))]
    return labelled(variants)


def overlap_variants():
    """(label, sparse_attention_forward keywords) of ``--overlap``: today's path first, then small chunks (their Q
    stays in the L2) with each chunk's combine on a side stream of a few CTAs beside the next chunk's attention."""
    warp = dict(attention_config=dict(store_warp=True))
    persistent = dict(attention_config=dict(store_warp=True, persistent=True))
    variants = [dict(), dict(query_chunk=4096), warp, dict(query_chunk=4096, **warp),
                dict(query_chunk=4096, **persistent), dict(query_chunk=4096, combine_ctas=32)]
    variants += [dict(query_chunk=4096, combine_ctas=n, **warp) for n in (24, 32, 40)]
    variants += [dict(query_chunk=4096, combine_ctas=n, **persistent) for n in (24, 32)]
    variants += [dict(query_chunk=c, combine_ctas=32, **warp) for c in (2048, 8192)]
    return labelled(variants)


def consumers_variants():
    """(label, sparse_attention_forward keywords) of ``--consumers``: today's path, the store warp per item and the
    persistent kernel with it (the fastest measured, at 4K chunks), then three consumer warpgroups a CTA (the third
    one's GEMMs under the other two's softmax and epilogue) at 16K and 4K chunks."""
    # the same shared memory holds one Q stage a consumer and two O tiles instead of two and one
    three_one_stage = dict(THREE_CONSUMERS, stages=1, o_buffers=2)
    return labelled([dict(), attention(store_warp=True),
                     dict(query_chunk=4096, **attention(store_warp=True, persistent=True)),
                     attention(**THREE_CONSUMERS), dict(query_chunk=4096, **attention(**THREE_CONSUMERS)),
                     attention(**three_one_stage)])


def chunks_variants():
    """(label, sparse_attention_forward keywords) of ``--chunks``: today's path, then the persistent store-warp kernel
    at query chunks of 2K-16K. A chunk's Q stays in the L2 while it is small (16 MB a KV head at 4K), and each chunk
    re-reads every K/V block its queries chose (~N / 128 blocks a KV head at random): the best chunk shrinks the
    two together, and moves with N (NOTES.md, session 28). Then the own blocks attended in the combine
    (``local_combine``: no partial for them) with today's path and with the persistent store warp at 4K-16K chunks,
    and at 4K with a ring of 2 pieces and rings of 6 and 7 half-size pieces (96 and 112 KB); last, the index rows'
    bookkeeping in one launch (``fused_prep``) at 4K, with and without the local combine, and with the local
    combine's O through shared memory (``tma_o``), then with programmatic dependent launches between the chunks'
    attention and local combine (``pdl``); chunks of 33 and 132 key blocks, whose local combine (a CTA a key block
    and KV head) fills the H100's 132 SMs in one wave and in four; the shared tiles on a side stream from the start
    (``tiles_stream``); the row prep a warp a query tile (``fused_prep="warps"``); last, the shared tiles' kernel
    a CTA every (tile, KV head), not only those listed as shared (``tile_config=dict(listed=False)``)."""
    persistent = attention(store_warp=True, persistent=True)
    return labelled([dict()] + [dict(query_chunk=c, **persistent) for c in (2048, 4096, 6144, 8192, 16384)]
                    + [dict(local_combine=True)]
                    + [dict(query_chunk=c, local_combine=True, **persistent) for c in (4096, 6144, 8192, 16384)]
                    + [dict(query_chunk=4096, local_combine=True, local_combine_config=c, **persistent)
                       for c in (dict(stages=2), dict(stages=6, slots_per_piece=1), dict(stages=7, slots_per_piece=1))]
                    + [dict(query_chunk=4096, fused_prep=True, **persistent),
                       dict(query_chunk=4096, local_combine=True, fused_prep=True, **persistent),
                       dict(query_chunk=4096, local_combine=True, fused_prep=True,
                            local_combine_config=dict(tma_o=True), **persistent),
                       dict(query_chunk=4096, local_combine=True, fused_prep=True,
                            local_combine_config=dict(tma_o=True, pdl=True),
                            **attention(store_warp=True, persistent=True, pdl=True))]
                    + [dict(query_chunk=c, local_combine=True, fused_prep=True, local_combine_config=dict(tma_o=True),
                            **persistent) for c in (4224, 16896)]
                    + [dict(query_chunk=4096, local_combine=True, fused_prep=True, tiles_stream=True, **persistent),
                       dict(query_chunk=4096, local_combine=True, fused_prep="warps", **persistent)]
                    + [dict(query_chunk=4096, local_combine=True, fused_prep=True, tile_config=dict(listed=False),
                            **persistent)])


def combine_warps_variants():
    """(label, sparse_attention_forward keywords) of ``--combine-warps``: today's path and the best schedule of
    ``--overlap`` first, then each chunk's partials merged by the next chunk's attention kernel (its combine warps)
    at small chunks, with rings of 4 to 14 slot boxes, and L2 prefetches ahead of the ring."""
    variants = [dict(), dict(query_chunk=4096, **attention(store_warp=True, persistent=True))]
    variants += [dict(query_chunk=c, **attention(store_warp=True, combine_warps=True)) for c in (4096, 2048, 8192)]
    variants += [dict(query_chunk=4096, **attention(store_warp=True, combine_warps=True, combine_stages=4))]
    variants += [dict(query_chunk=4096, **attention(store_warp=True, combine_warps=True, combine_prefetch=p))
                 for p in (8, 16)]
    # one O tile a consumer frees 32 KB: a ring of 14 slot boxes (56 KB in flight instead of 24), or a third Q stage
    variants += [dict(query_chunk=4096, **attention(store_warp=True, combine_warps=True, o_buffers=1,
                                                    combine_stages=14)),
                 dict(query_chunk=4096, **attention(store_warp=True, combine_warps=True, o_buffers=1, stages=3))]
    return labelled(variants)


def max_abs_diff(gpu: torch.Tensor, host: torch.Tensor, rows: int = 16384) -> float:
    """max |gpu - host| over dim 1 in slices of ``rows`` (no full-size float copy of either on the GPU)."""
    return max((gpu[:, i:i + rows].float() - host[:, i:i + rows].to(gpu.device).float()).abs().max().item()
               for i in range(0, gpu.shape[1], rows))


def sweep(table, row, q, k, v, idx, kind, rounds=3, variants=None):
    """Attention and schedule knobs at one length, one selection, the main branch timed whole: every variant once a
    round, ``rounds`` rounds interleaved, so a drift of the GPU's clocks over the run reaches all of them alike; the
    median of the rounds is reported with its spread. Each variant's output is checked against the default's."""
    o = torch.empty_like(q)
    # the default's output waits in host memory: at 1M a second and third O on the GPU (16 GiB each) do not fit
    ref_o, ref_lse = (t.cpu() for t in sparse_attention_forward(q, k, v, idx, BK, out=o))
    runs = {}
    for label, kw in variants or sweep_variants():
        try:
            out, lse = sparse_attention_forward(q, k, v, idx, BK, out=o, **kw)
        except ValueError as err:  # a config the kernels reject at this shape (e.g. shared memory)
            print(f"  sweep {label:<40} skipped: {err}", flush=True)
            continue
        diff = max_abs_diff(out, ref_o)
        lse = lse.cpu()
        runs[label] = (kw, diff, (lse - ref_lse).abs().max().item(), [])
        print(f"  sweep {label:<40} built, max|o - default| {diff:.2g}", flush=True)
    for round_ in range(rounds):
        for label, (kw, _, _, times) in runs.items():
            times.append(time_ms(lambda: sparse_attention_forward(q, k, v, idx, BK, out=o, **kw), rep_ms=500))
        print(f"  sweep round {round_ + 1}/{rounds}: " + ", ".join(f"{t[-1]:.2f}" for *_, t in runs.values()),
              flush=True)
    for label, (kw, diff, ldiff, times) in runs.items():
        ms = statistics.median(times)
        table.add(**row, what=f"sweep: main branch with {label}", selection=kind, ms=ms, ms_min=min(times),
                  ms_max=max(times), rounds=rounds, max_abs_diff_o=diff, max_abs_diff_lse=ldiff)
        print(f"  sweep {label:<40} {ms:8.2f} ms (rounds {min(times):.2f}-{max(times):.2f}) "
              f"max|o - default| {diff:.2g}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072, 1048576])
    parser.add_argument("--sweep", type=int, nargs="*", default=[], help="lengths at which to sweep the knobs")
    parser.add_argument("--small-items", type=int, nargs="*", default=[],
                        help="lengths at which to time the attention alone at small work items")
    parser.add_argument("--accumulate", type=int, nargs="*", default=[],
                        help="lengths at which to set the accumulators against the partials path (interleaved)")
    parser.add_argument("--overlap", type=int, nargs="*", default=[],
                        help="lengths at which to time the combine overlapped with the next chunk's attention")
    parser.add_argument("--combine-warps", type=int, nargs="*", default=[],
                        help="lengths at which to time the previous chunk merged inside the attention kernel")
    parser.add_argument("--consumers", type=int, nargs="*", default=[],
                        help="lengths at which to time three consumer warpgroups a CTA against today's two")
    parser.add_argument("--chunks", type=int, nargs="*", default=[],
                        help="lengths at which to sweep the persistent store-warp kernel's query chunk")
    parser.add_argument("--attention-alone", type=int, nargs="*", default=[],
                        help="lengths at which to time the attention kernel alone with and without the store warp")
    parser.add_argument("--selections", nargs="+", default=["random", "realistic"],
                        choices=["random", "realistic"])
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    parser.add_argument("--stage-chunks", type=int, nargs="+", default=[SCHEDULE_TUNABLES["query_chunk"]],
                        help="query chunks at which to break the forward into its stages")
    parser.add_argument("--no-dense", action="store_true", help="skip dense cuDNN (its 1M forward takes ~40 s)")
    parser.add_argument("--no-fla", action="store_true", help="skip fla's parallel_nsa (its JIT takes ~30 s)")
    parser.add_argument("--variants", type=int, nargs="+", default=None,
                        help="indices (from 0) of the variants a sweep runs, in its own order; default all")
    parser.add_argument("--results-root", default=None)
    args = parser.parse_args(argv)
    table = BenchTable("main_branch")
    ceil_table = BenchTable("ceilings")
    bench_ceilings(ceil_table)
    ceilings = {r["unit"]: r["rate"] for r in ceil_table.rows}
    for r in ceil_table.rows:
        table.add(what=f"ceiling: {r['what']}", ms=r["ms"], rate=r["rate"], unit=r["unit"])
    fla = None if args.no_fla else fla_selected_attention()
    pick = (lambda variants: variants) if args.variants is None else \
        (lambda variants: [variants[i] for i in args.variants if i < len(variants)])
    for N in args.seq_lens:
        row = dict(B=B, N=N, Hq=HQ, G=G, D=D, Bk=BK, k=TOPK, dtype="bf16")
        q, k, v, q_idx, k_idx = paper_inputs(N)
        o = torch.empty_like(q)
        for kind, idx in selections(q_idx, k_idx, args.selections):
            flops = main_branch_flops(idx)
            ms = time_ms(lambda: sparse_attention_forward(q, k, v, idx, BK, out=o), rep_ms=2000)
            table.add(**row, what="main branch (ours, KV-outer)", selection=kind, ms=ms, tflops=flops / ms / 1e9)
            line = f"N={N:>8} {kind:<9} main branch {ms:9.2f} ms  {flops / ms / 1e9:6.1f} TFLOP/s"
            if fla is not None and N <= 131072:
                ms_fla = time_ms(lambda: fla(q, k, v, idx), rep_ms=2000)
                table.add(**row, what="fla parallel_nsa (selected attention)", selection=kind, ms=ms_fla,
                          tflops=flops / ms_fla / 1e9, speedup=ms_fla / ms)
                line += f" | fla {ms_fla:9.2f} ms -> ours {ms_fla / ms:.2f}x"
            print(line, flush=True)
            if N <= 131072 and not args.no_stages:
                for chunk in args.stage_chunks:
                    for stage, r in stage_breakdown(q, k, v, idx, ceilings, chunk).items():
                        table.add(**row, what=f"stage: {stage}", selection=kind, query_chunk=chunk, **r)
                        print(f"    {stage:<10} chunk {chunk:>6} {r['ms']:8.2f} ms  {r['gbytes']:6.1f} GB  "
                              f"{r['tbps']:5.2f} TB/s  floor {r['floor_ms']:6.2f} ms ({r['pct_of_floor'] or 0:.0f}%)",
                              flush=True)
            if N in args.sweep:
                sweep(table, row, q, k, v, idx, kind, variants=pick(sweep_variants()))
            if N in args.accumulate:
                sweep(table, row, q, k, v, idx, kind, variants=pick(accumulate_variants()))
            if N in args.attention_alone:
                attention_alone(table, row, q, k, v, idx, kind)
            if N in args.overlap:
                sweep(table, row, q, k, v, idx, kind, variants=pick(overlap_variants()))
            if N in args.combine_warps:
                sweep(table, row, q, k, v, idx, kind, variants=pick(combine_warps_variants()))
            if N in args.consumers:
                sweep(table, row, q, k, v, idx, kind, variants=pick(consumers_variants()))
            if N in args.chunks:
                sweep(table, row, q, k, v, idx, kind, variants=pick(chunks_variants()))
            if N in args.small_items:
                small_items(table, row, q, k, v, idx, kind)
        msa = lambda: sparse_attention_forward(q, k, v, select_blocks(q_idx, k_idx, BK, TOPK), BK, out=o)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        msa()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms_e2e = time_ms(msa, rep_ms=2000)
        del q, k, v, q_idx, k_idx, o
        torch.cuda.empty_cache()
        dense = float("nan") if args.no_dense else dense_cudnn_ms(N)
        dense_flops = 4 * HQ * D * N * N / 2
        msa_flops = 2 * G * D * N * N / 2 + 4 * HQ * D * BK * TOPK * N
        table.add(**row, what="MSA forward end to end (index + main)", selection="random", ms=ms_e2e,
                  dense_cudnn_ms=dense, speedup=dense / ms_e2e, compute_ratio_limit=dense_flops / msa_flops,
                  peak_extra_gib=peak, note="dense timed with Hq/4, Hkv/4 and scaled x4" if N > 262144 else "")
        print(f"N={N:>8} end to end {ms_e2e:9.2f} ms, dense cuDNN {dense:.1f} ms -> {dense / ms_e2e:.2f}x "
              f"(limit {dense_flops / msa_flops:.1f}x), peak extra {peak:.2f} GiB", flush=True)
        torch.cuda.empty_cache()
    cols = ["N", "what", "selection", "ms", "tflops", "speedup", "pct_of_floor", "dense_cudnn_ms"]
    frame = table.frame()
    print(table.markdown([c for c in cols if c in frame.columns]))
    print("wrote", table.write_csv(args.results_root))


if __name__ == "__main__":
    main()
