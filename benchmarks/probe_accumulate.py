"""Where the accumulating forward's time goes: each of its launches timed alone, and its sends ablated.

    python -m benchmarks.probe_accumulate [--seq-len 131072] [--chunks 2048 4096]

Paper shape, random selection (the index kernels on random projections). For each query chunk size: the local
launches over every chunk, the blocks launches (sending reductions as shipped; plain bulk stores of the same bytes;
nothing at all: timing only, wrong outputs), the finalize launches and the schedule build, each summed over the
chunks, in interleaved rounds (median). Set against the L2 reduction floor (8 KB a (query, KV head, non-own block)
at the rate ``probe_l2_reduce`` measures).
"""

import argparse
import math
import statistics

import torch

from benchmarks.bench_main import BK, D, G, HQ, TOPK, paper_inputs
from msa_tl.attention.accumulate import accumulate_program, finalize_program, split_own_block
from msa_tl.attention.scheduler import Schedule
from msa_tl.benchmark import environment, time_ms
from msa_tl.index.select import select_blocks
from msa_tl.tl_compile import compiled_kernel

R = HQ // G


def stages_of(q, k, v, indices, chunk, item_queries=256, stages=2):
    """{name: run} of the accumulating forward's launches over every chunk of ``chunk`` queries."""
    B, N = q.shape[:2]
    scale = 1.0 / math.sqrt(D)
    args = dict(groups=G, heads=HQ, head_dim=D, block_size=BK, topk=TOPK, scale=scale, stages=stages,
                dtype="bfloat16")
    local = compiled_kernel(accumulate_program, **args, init=True)
    sends = {s: compiled_kernel(accumulate_program, **args, item_queries=item_queries,
                                **({} if s == "reduce" else dict(send=s))) for s in ("reduce", "store", "none")}
    finalize = compiled_kernel(finalize_program, heads=HQ, head_dim=D, groups=G, dtype="bfloat16", scale=scale)
    starts = list(range(0, N, chunk))
    schedule = Schedule(B, G, math.ceil(N / BK), chunk, TOPK, item_queries, q.device, chunks=len(starts))
    others, own_chosen = split_own_block(indices, BK)
    schedule.build(others, 0, N)
    acc = torch.zeros(B, chunk * G, R, D, device=q.device)
    lacc = torch.ones(B, chunk * G, R, device=q.device)
    mref = torch.zeros(B, chunk * G, R, device=q.device)
    flags = torch.zeros(B, N, G, device=q.device, dtype=torch.int32)
    chosen = (indices >= 0).any(dim=3).int()
    o, lse = torch.empty_like(q), torch.empty(B, N, HQ, device=q.device)

    def each(fn):
        return lambda: [fn(c, t0, min(N, t0 + chunk)) for c, t0 in enumerate(starts)]

    runs = {"local": each(lambda c, t0, t1: local(q, k, v, own_chosen, acc, lacc, mref, t0, t1))}
    for s, kernel in sends.items():
        runs[f"blocks ({s})"] = each(lambda c, t0, t1, kernel=kernel: kernel(q, k, v, *schedule.part(c), acc, lacc,
                                                                           mref, flags, t0))
    runs["finalize"] = each(lambda c, t0, t1: finalize(acc, lacc, mref, chosen, o, lse, flags, t0, t1))
    runs["schedule"] = lambda: schedule.build(others, 0, N)
    return runs, (others >= 0).sum().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--chunks", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--reduce-tbps", type=float, default=3.0, help="L2 fp32 reduction rate (probe_l2_reduce)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(environment())
    q, k, v, q_idx, k_idx = paper_inputs(args.seq_len)
    indices = select_blocks(q_idx, k_idx, BK, TOPK)
    for chunk in args.chunks:
        runs, entries = stages_of(q, k, v, indices, chunk)
        floor = entries * R * D * 4 / (args.reduce_tbps * 1e9)
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                times[name].append(time_ms(run, rep_ms=500))
        print(f"N={args.seq_len} chunk={chunk}: {entries} (query, KV head, non-own block) entries, reduction floor "
              f"{floor:.2f} ms at {args.reduce_tbps} TB/s", flush=True)
        for name, ts in times.items():
            print(f"  {name:<16} {statistics.median(ts):8.2f} ms (rounds {min(ts):.2f}-{max(ts):.2f})", flush=True)


if __name__ == "__main__":
    main()
