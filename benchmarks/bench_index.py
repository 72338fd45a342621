"""Index branch on the GPU: scoring throughput, top-k against torch.topk, fused vs two-pass, memory.

    python -m benchmarks.bench_index [--seq-lens 8192 32768 131072 524288] [--fp8]

Paper shape: B=1, G=4, Di=128, Bk=128, k=16, bf16. Useful scoring FLOPs are
2*G*Di*N^2/2 (causal half). The top-k floor is reading the visible block
scores once: 4 bytes * G * sum_t (t // Bk). Writes ``index_branch.csv``.
"""

import argparse
import math

import torch

from msa_tl.benchmark import BenchTable, time_ms
from msa_tl.index.scores import block_scores
from msa_tl.index.select import TOPK_DEFAULTS, select_blocks, topk_program
from msa_tl.tl_compile import compiled_kernel


def visible_score_bytes(N, G, Bk):
    """fp32 bytes of the non-local visible block scores: sum over t of t // Bk, per group."""
    return 4 * G * sum(blk * min(Bk, N - blk * Bk) for blk in range(math.ceil(N / Bk)))


def bench_length(table, N, *, G=4, Di=128, Bk=128, topk=16, gemm_tflops, copy_gbs):
    q_idx = torch.randn(1, N, G, Di, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(1, N, Di, device="cuda", dtype=torch.bfloat16)
    nblk = math.ceil(N / Bk)
    flops = 2 * G * Di * N * N / 2
    score_bytes = visible_score_bytes(N, G, Bk)
    row = dict(N=N, G=G, Di=Di, Bk=Bk, k=topk, dtype="bf16")

    def record(stage, ms, peak_bytes, **extra):
        table.add(**row, stage=stage, ms=ms, peak_extra_gib=peak_bytes / 2**30, **extra)
        print(f"  N={N:>7} {stage:<22} {ms:9.3f} ms  " + "  ".join(f"{k}={v:.3g}" for k, v in extra.items()), flush=True)

    def peak_of(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    # pipelined (producer + two consumers) and fused (one warpgroup): scores never leave the chip
    pipelined = lambda: select_blocks(q_idx, k_idx, Bk, topk, method="pipelined")
    fused = lambda: select_blocks(q_idx, k_idx, Bk, topk, method="fused")
    same = torch.equal(pipelined(), fused())
    ms_pipelined = time_ms(pipelined)
    record("pipelined select", ms_pipelined, peak_of(pipelined), tflops=flops / ms_pipelined / 1e9,
           identical_to_fused=float(same))
    ms_fused = time_ms(fused)
    record("fused select", ms_fused, peak_of(fused), tflops=flops / ms_fused / 1e9)

    # two-pass: scoring into a chunk buffer, then the standalone top-k
    chunk = min(N, 131072)
    buffer = torch.full((chunk * G * nblk,), float("-inf"), device="cuda")
    indices = torch.empty(1, N * G, topk, device="cuda", dtype=torch.int32)
    topk_kernel = compiled_kernel(topk_program, groups=G, block_size=Bk, topk=topk, **TOPK_DEFAULTS)
    chunks = [(t0, min(chunk, N - t0)) for t0 in range(0, N, chunk)]

    def score_all():
        for t0, count in chunks:
            block_scores(q_idx, k_idx, Bk, None, t0, count, out=buffer)

    def topk_all():  # top-k of the last-scored chunk's buffer, timed per chunk and summed
        for t0, count in chunks:
            topk_kernel(buffer[: count * G * nblk].view(1, count * G, nblk), indices, t0)

    score_all()
    ms_score = time_ms(score_all)
    record("scoring (max-pool)", ms_score, chunk * G * nblk * 4, tflops=flops / ms_score / 1e9,
           pct_gemm=100 * flops / ms_score / 1e9 / gemm_tflops)
    ms_topk = time_ms(topk_all)
    record("top-k kernel", ms_topk, 0, floor_ms=score_bytes / copy_gbs / 1e6,
           pct_floor=100 * score_bytes / copy_gbs / 1e6 / ms_topk)
    two_pass = lambda: select_blocks(q_idx, k_idx, Bk, topk, method="two_pass", query_chunk=chunk)
    record("two-pass select", time_ms(two_pass), peak_of(two_pass))
    # the second measurement of each, in the other order, shows the run-to-run spread
    ms_fused = time_ms(fused)
    record("fused select (again)", ms_fused, peak_of(fused), tflops=flops / ms_fused / 1e9)
    ms_pipelined = time_ms(pipelined)
    record("pipelined select (again)", ms_pipelined, peak_of(pipelined), tflops=flops / ms_pipelined / 1e9)

    if N <= 131072:  # torch.topk over the full fp32 score matrix [G, N, nblk] (future blocks -inf)
        S = torch.full((N * G * nblk,), float("-inf"), device="cuda")
        block_scores(q_idx, k_idx, Bk, None, 0, N, out=S)
        S = S.view(N, G, nblk).transpose(0, 1).contiguous()
        ms_torch = time_ms(lambda: torch.topk(S, topk, dim=-1))
        record("torch.topk (fp32)", ms_torch, 0, speedup_of_topk_kernel=ms_torch / ms_topk)
        del S
    del buffer, indices
    torch.cuda.empty_cache()


def bench_fp8(table, N, *, G=4, Di=128, Bk=128, topk=16):
    """The pipelined select with bf16 and with FP8 operands (the launcher's per-row quantisation included) in one
    process, and the FP8 selection's recall of the bf16 one's blocks (random inputs)."""
    from msa_tl.index.select import select_blocks_fp8

    q_idx = torch.randn(1, N, G, Di, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(1, N, Di, device="cuda", dtype=torch.bfloat16)
    bf16_ms = time_ms(lambda: select_blocks(q_idx, k_idx, Bk, topk, method="pipelined"))
    fp8_ms = time_ms(lambda: select_blocks_fp8(q_idx, k_idx, Bk, topk))
    want = select_blocks(q_idx, k_idx, Bk, topk, method="pipelined")
    got = select_blocks_fp8(q_idx, k_idx, Bk, topk)
    recall = ((got[..., :, None] == want[..., None, :]).any(-2) & (want >= 0)).sum() / (want >= 0).sum()
    table.add(N=N, stage="select bf16 vs FP8 (pipelined)", ms=fp8_ms, bf16_ms=bf16_ms, fp8_speedup=bf16_ms / fp8_ms,
              fp8_recall=recall.item())
    print(f"N={N}: select bf16 {bf16_ms:.2f} ms, FP8 {fp8_ms:.2f} ms -> {bf16_ms / fp8_ms:.2f}x; FP8 recall of the "
          f"bf16 blocks {recall.item():.4f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072, 524288])
    parser.add_argument("--gemm-tflops", type=float, default=760.0, help="bf16 GEMM ceiling for the %% column")
    parser.add_argument("--copy-gbs", type=float, default=3020.0, help="device copy bandwidth (read + write) GB/s")
    parser.add_argument("--results-root", default=None)
    parser.add_argument("--fp8", action="store_true", help="only the bf16 vs FP8 select (writes index_fp8.csv)")
    args = parser.parse_args(argv)
    if args.fp8:
        table = BenchTable("index_fp8")
        for N in args.seq_lens:
            bench_fp8(table, N)
        print("wrote", table.write_csv(args.results_root))
        return
    table = BenchTable("index_branch")
    for N in args.seq_lens:
        bench_length(table, N, gemm_tflops=args.gemm_tflops, copy_gbs=args.copy_gbs)
    print(table.markdown(["N", "stage", "ms", "tflops", "pct_gemm", "floor_ms", "pct_floor",
                          "speedup_of_topk_kernel", "peak_extra_gib"]))
    print("wrote", table.write_csv(args.results_root))


if __name__ == "__main__":
    main()
