"""Where the main-branch forward's time goes between and around its kernels: a torch.profiler trace of
``sparse_attention_forward``, summed by kernel name, with the GPU's idle time inside the forward's span.

    python -m benchmarks.profile_forward                                   # 128K, random selection, defaults
    python -m benchmarks.profile_forward --query-chunk 4096 --persistent-store-warp
    python -m benchmarks.profile_forward --queued 3       # the steady state: three forwards enqueued back to back

The stage breakdown of ``bench_main`` times each stage alone (the schedule built one chunk at a time, the attention
over every chunk, the combine over every chunk); this is the forward as it runs: one schedule build for every
chunk, then each chunk's LSE fill, attention and combine. What the kernels do not cover of the span (launch gaps,
host waits) is printed as idle.

Paper shape (Hq = 64, G = 4, D = 128, Bk = 128, k = 16, bf16, B = 1); the selection is uniform over each query's
visible blocks with its own block forced, canonical (the "random" selection's statistics without the index branch).
"""

import argparse
import time
from collections import defaultdict

import torch

from msa_tl.attention.kv_outer import sparse_attention_forward

HQ, G, D, BK, TOPK = 64, 4, 128, 128, 16


def random_selection(N: int, device) -> torch.Tensor:
    """[1, N, G, TOPK] int32: each query's own block, then distinct random visible blocks, descending, -1 padded."""
    n_blocks = -(-N // BK)
    own = torch.arange(N, device=device) // BK
    score = torch.rand(N, G, n_blocks, device=device)
    visible = torch.arange(n_blocks, device=device)[None, None, :] <= own[:, None, None]
    score = torch.where(visible, score, -1.0)
    score.scatter_(2, own[:, None, None].expand(N, G, 1), 2.0)  # the own block first
    top = score.topk(min(TOPK, n_blocks), dim=2)
    idx = torch.full((N, G, TOPK), -1, device=device, dtype=torch.int64)
    idx[..., : top.indices.shape[2]] = torch.where(top.values >= 0, top.indices, -1)
    return idx.sort(dim=2, descending=True).values.int()[None].contiguous()


def kernel_intervals(prof) -> list:
    """(name, start us, end us) of every CUDA kernel and memset/memcpy the profiler saw, by start."""
    spans = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.elapsed_us() > 0:
            spans.append((event.name, event.time_range.start, event.time_range.end))
    return sorted(spans, key=lambda s: s[1])


def print_gaps(spans: list, top: int):
    """The idle time between consecutive kernels, summed by the pair of kernel names around it, and the ``top``
    longest gaps with their place in the trace (a host wait shows as one long gap, launch latency as many short)."""
    gaps, by_pair = [], defaultdict(lambda: [0, 0.0])
    covered_to = spans[0][2]
    for i in range(1, len(spans)):
        name, s, e = spans[i]
        if s > covered_to:
            pair = (spans[i - 1][0][:40], name[:40])
            gaps.append((s - covered_to, i, pair))
            by_pair[pair][0] += 1
            by_pair[pair][1] += s - covered_to
        covered_to = max(covered_to, e)
    print(f"  gaps between kernels (the whole trace): {len(gaps)}, {sum(g for g, *_ in gaps) / 1e3:.3f} ms")
    for (before, after), (count, us) in sorted(by_pair.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"    {us / 1e3:7.3f} ms {count:4d} x  {before} -> {after}")
    for us, i, (before, after) in sorted(gaps, reverse=True)[:top]:
        print(f"    longest: {us:8.1f} us before kernel {i}: {before} -> {after}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--query-chunk", type=int, default=None, help="default: the tuned / default schedule's")
    parser.add_argument("--persistent-store-warp", action="store_true",
                        help="attention_config=dict(store_warp=True, persistent=True)")
    parser.add_argument("--local-combine", action="store_true", help="local_combine=True")
    parser.add_argument("--fused-prep", action="store_true", help="fused_prep=True")
    parser.add_argument("--queued", type=int, default=1,
                        help="forwards enqueued back to back in each trace (the steady state a training loop or "
                             "do_bench sees: the host runs ahead), its figures a forward")
    parser.add_argument("--gaps", type=int, default=8, help="the longest gaps between kernels to list")
    parser.add_argument("--runs", type=int, default=3, help="forwards traced after two warm-up ones")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    N = args.seq_len
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, N, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, N, G, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, N, G, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    idx = random_selection(N, "cuda")
    kw = dict(query_chunk=args.query_chunk)
    if args.persistent_store_warp:
        kw["attention_config"] = dict(store_warp=True, persistent=True)
    if args.local_combine:
        kw["local_combine"] = True
    if args.fused_prep:
        kw["fused_prep"] = True
    o = torch.empty_like(q)
    forward = lambda: sparse_attention_forward(q, k, v, idx, BK, out=o, **kw)  # noqa: E731
    for _ in range(2):
        forward()
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}  N={N}  {kw}", flush=True)
    for run in range(args.runs):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            enqueue = time.perf_counter()
            for _ in range(args.queued):
                forward()
            enqueue = time.perf_counter() - enqueue
            torch.cuda.synchronize()
        spans = kernel_intervals(prof)
        if not spans:
            print("no CUDA events recorded")
            return 1
        start, end = spans[0][1], max(s[2] for s in spans)
        by_name = defaultdict(lambda: [0, 0.0, []])
        busy, covered_to = 0.0, start
        for name, s, e in spans:
            by_name[name][0] += 1
            by_name[name][1] += e - s
            by_name[name][2].append(e - s)
            busy += max(0.0, e - max(s, covered_to))  # the union of the intervals (kernels may overlap)
            covered_to = max(covered_to, e)
        span, n = end - start, args.queued
        print(f"run {run + 1}: span {span / 1e3 / n:8.3f} ms, kernels cover {busy / 1e3 / n:8.3f} ms, "
              f"idle {(span - busy) / 1e3 / n:6.3f} ms a forward; the host queued a forward in {enqueue * 1e3 / n:.3f} ms",
              flush=True)
        if run == args.runs - 1:
            for name, (count, us, each) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
                spread = f" ({min(each):.0f}-{max(each):.0f} us each)" if count > 1 else ""
                print(f"  {us / 1e3 / n:8.3f} ms  {count // n:5d} x  {name[:80]}{spread}")
            print_gaps(spans, args.gaps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
