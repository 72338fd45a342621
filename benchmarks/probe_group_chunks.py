"""Probe of the next random-selection design (NOTES.md, session 12): partials that stay in the L2.

    python -m benchmarks.probe_group_chunks [--seq-len 131072] [--chunks 256 512 1024 16384]

Today's KV-outer forward writes every partial to DRAM and reads it back (70 of the ~108 GB it moves at 128K). Run
one KV group at a time in query chunks of C: a chunk's partials are C * (Hq / G) * topk * D * 2 bytes (32 MB at
C = 512, paper shape), small enough for the combine to read them from the L2, at the price of K/V read once per
chunk. This probe builds that schedule from today's kernels (the forward called per group, shared tiles off), so
it times the design's byte side before a kernel is written for it: the per-group forward at each chunk size, its
sum over groups, and the same launches replayed from a CUDA graph (without the ~1000 launches' host cost), against
the whole forward in the same process. Each variant's output is checked against the whole forward's.
"""

import argparse
import statistics

import torch

from benchmarks.bench_main import BK, D, G, HQ, TOPK, paper_inputs
from msa_tl.benchmark import environment, time_ms
from msa_tl.index.select import select_blocks
from msa_tl.attention.kv_outer import sparse_attention_forward

R = HQ // G


def per_group_forward(qs, ks, vs, idxs, chunk, out, lse):
    """The forward one KV group at a time: qs [G][B, N, R, D], ks / vs [G][B, N, 1, D], idxs [G][B, N, 1, topk]
    (contiguous copies of each group's slice) into out [G][B, N, R, D] and lse [G][B, N, R]."""
    for g in range(G):
        sparse_attention_forward(qs[g], ks[g], vs[g], idxs[g], BK, query_chunk=chunk, shared_tiles=False,
                                 out=out[g], lse_out=lse[g])


def graphed(fn):
    """fn replayed from a CUDA graph (captured after a warm-up run), or None where it cannot be captured."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # the probe reports it and times the eager launches only
        print(f"  graph capture failed: {type(exc).__name__}: {exc}")
        return None
    return graph.replay


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 16384])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print("#", environment(), f"N={args.seq_len} Hq={HQ} G={G} D={D} Bk={BK} k={TOPK} bf16, random selection")
    q, k, v, q_idx, k_idx = paper_inputs(args.seq_len)
    idx = select_blocks(q_idx, k_idx, BK, TOPK)
    whole_o, _ = sparse_attention_forward(q, k, v, idx, BK, shared_tiles=False)
    qs = [q[:, :, g * R:(g + 1) * R].contiguous() for g in range(G)]
    ks = [k[:, :, g:g + 1].contiguous() for g in range(G)]
    vs = [v[:, :, g:g + 1].contiguous() for g in range(G)]
    idxs = [idx[:, :, g:g + 1].contiguous() for g in range(G)]
    out = [torch.empty_like(x) for x in qs]
    lse = [torch.empty(x.shape[:3], device="cuda") for x in qs]
    variants = {"whole forward": lambda: sparse_attention_forward(q, k, v, idx, BK, shared_tiles=False)}
    for chunk in args.chunks:
        run = (lambda c=chunk: per_group_forward(qs, ks, vs, idxs, c, out, lse))
        run()
        err = max((out[g].float() - whole_o[:, :, g * R:(g + 1) * R].float()).abs().max().item() for g in range(G))
        print(f"  chunk {chunk}: max|o - whole forward| {err:.3g}")
        variants[f"per group, chunk {chunk}"] = run
        replay = graphed(run)
        if replay is not None:
            variants[f"per group, chunk {chunk}, graph"] = replay
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(time_ms(fn))
    for name, ts in times.items():
        print(f"{name:36s} {statistics.median(ts):9.3f} ms ({min(ts):.3f}-{max(ts):.3f})")


if __name__ == "__main__":
    main()
