"""Main branch and end-to-end MSA forward on the GPU, against fla's parallel_nsa and dense cuDNN attention.

    python -m benchmarks.bench_main [--seq-lens 32768 131072 524288 1048576]

Paper shape: B=1, Hq=64, G=4, D=Di=128, Bk=128, k=16, bf16. Selections:
"random" (the index kernels on random projections) and "realistic" (first
block, the three blocks before the local one, a stripe every 8 blocks).
Useful main-branch FLOPs: 4*D*Bk per (query, head, chosen block).
Writes ``main_branch.csv``.
"""

import argparse
import math

import pandas as pd
import torch

from msa_tl.benchmark import RESULTS_ROOT, BenchTable, gpu_slug, time_ms
from msa_tl.index_topk import select_blocks
from msa_tl.kv_outer_attention import ATTENTION_DEFAULTS, kv_outer_program, sparse_attention_forward
from msa_tl.lse_combine import COMBINE_DEFAULTS, combine_program
from msa_tl.scheduler import DEFAULTS as SCHEDULE_DEFAULTS, Schedule
from msa_tl.tl_compile import compiled_kernel

B, HQ, G, D, BK, TOPK, CHUNK = 1, 64, 4, 128, 128, 16, 16384


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


def selections(q_idx, k_idx):
    """("random", the index kernels' selection on random projections), then ("realistic", the fixed pattern)."""
    yield "random", select_blocks(q_idx, k_idx, BK, TOPK)
    yield "realistic", realistic_selection(q_idx.shape[1])


def fla_selected_attention():
    try:
        from fla.ops.nsa.parallel import ParallelNSAFunction
    except Exception as exc:  # the peer is optional
        print(f"  fla unavailable: {type(exc).__name__}: {exc}")
        return None
    return lambda q, k, v, idx: ParallelNSAFunction.apply(q, k, v, idx.clamp(min=0).long(), TOPK, BK, D ** -0.5, None)


def dense_cudnn_ms(N, pass_name="fwd"):
    """Dense cuDNN SDPA time at N from this GPU's ``dense_baselines.csv`` (``pass_name`` "fwd" or "fwd+bwd")."""
    path = RESULTS_ROOT / gpu_slug(torch.cuda.get_device_name()) / "dense_baselines.csv"
    if not path.exists():
        return float("nan")
    rows = pd.read_csv(path)
    hit = rows[(rows.backend == "cudnn") & (rows["pass"] == pass_name) & (rows.N == N)]
    return float(hit.ms.iloc[0]) if len(hit) else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--results-root", default=None)
    args = parser.parse_args(argv)
    table = BenchTable("main_branch")
    fla = fla_selected_attention()
    for N in args.seq_lens:
        row = dict(B=B, N=N, Hq=HQ, G=G, D=D, Bk=BK, k=TOPK, dtype="bf16")
        q, k, v, q_idx, k_idx = paper_inputs(N)
        o = torch.empty_like(q)
        for kind, idx in selections(q_idx, k_idx):
            flops = main_branch_flops(idx)
            ms = time_ms(lambda: sparse_attention_forward(q, k, v, idx, BK, out=o), rep_ms=2000)
            table.add(**row, what="main branch (ours, KV-outer)", selection=kind, ms=ms, tflops=flops / ms / 1e9)
            print(f"N={N:>8} {kind:<9} main branch {ms:9.2f} ms  {flops / ms / 1e9:6.1f} TFLOP/s", flush=True)
            if fla is not None and N <= 131072:
                ms_fla = time_ms(lambda: fla(q, k, v, idx), rep_ms=2000)
                table.add(**row, what="fla parallel_nsa (selected attention)", selection=kind, ms=ms_fla,
                          tflops=flops / ms_fla / 1e9, speedup=ms_fla / ms)
                print(f"N={N:>8} {kind:<9} fla parallel_nsa {ms_fla:9.2f} ms  -> ours {ms_fla / ms:.2f}x", flush=True)
        # per-stage breakdown of one 16K-query chunk (the last one), random selection
        idx = select_blocks(q_idx, k_idx, BK, TOPK)
        chunk = min(N, CHUNK)
        sched = Schedule(B, G, math.ceil(N / BK), chunk, TOPK, SCHEDULE_DEFAULTS["item_queries"], "cuda")
        att = compiled_kernel(kv_outer_program, groups=G, heads=HQ, head_dim=D, block_size=BK, topk=TOPK,
                              scale=D ** -0.5, dtype="bfloat16", partial_dtype="bfloat16", **ATTENTION_DEFAULTS)
        comb = compiled_kernel(combine_program, heads=HQ, head_dim=D, topk=TOPK, dtype="bfloat16",
                               partial_dtype="bfloat16", **COMBINE_DEFAULTS)
        op = torch.empty(B, chunk, HQ, TOPK, D, device="cuda", dtype=torch.bfloat16)
        lp = torch.full((B, chunk, HQ, TOPK), float("-inf"), device="cuda")
        lse = torch.empty(B, N, HQ, device="cuda")
        t0, n_chunks = N - chunk, math.ceil(N / chunk)
        stages = {
            "index (fused score+top-k)": time_ms(lambda: select_blocks(q_idx, k_idx, BK, TOPK), rep_ms=2000),
            "scheduler": n_chunks * time_ms(lambda: sched.build(idx, t0, chunk)),
            "attention": n_chunks * time_ms(lambda: att(q, k, v, sched.items, sched.item_count, sched.entries, op, lp, t0)),
            "combine": n_chunks * time_ms(lambda: comb(op.view(B, chunk * HQ, TOPK, D), lp.view(B, chunk * HQ, TOPK),
                                                       o.view(B, N * HQ, D), lse.view(B, N * HQ), t0)),
        }
        for stage, ms in stages.items():
            table.add(**row, what=f"stage: {stage} (per-chunk time x {n_chunks} chunks)", selection="random", ms=ms)
        msa = lambda: sparse_attention_forward(q, k, v, select_blocks(q_idx, k_idx, BK, TOPK), BK, out=o)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        msa()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms_e2e = time_ms(msa, rep_ms=2000)
        dense = dense_cudnn_ms(N)
        dense_flops = 4 * HQ * D * N * N / 2
        msa_flops = 2 * G * D * N * N / 2 + 4 * HQ * D * BK * TOPK * N
        table.add(**row, what="MSA forward end to end (index + main)", selection="random", ms=ms_e2e,
                  dense_cudnn_ms=dense, speedup=dense / ms_e2e, compute_ratio_limit=dense_flops / msa_flops,
                  peak_extra_gib=peak)
        print(f"N={N:>8} end to end {ms_e2e:9.2f} ms, dense cuDNN {dense:.1f} ms -> {dense / ms_e2e:.2f}x "
              f"(limit {dense_flops / msa_flops:.1f}x), peak extra {peak:.2f} GiB; stages "
              + ", ".join(f"{s} {m:.1f}" for s, m in stages.items()), flush=True)
        del q, k, v, q_idx, k_idx, o, op, lp, lse, sched
        torch.cuda.empty_cache()
    cols = ["N", "what", "selection", "ms", "tflops", "speedup", "dense_cudnn_ms", "compute_ratio_limit", "peak_extra_gib"]
    frame = table.frame()
    print(table.markdown([c for c in cols if c in frame.columns]))
    print("wrote", table.write_csv(args.results_root))


if __name__ == "__main__":
    main()
