"""Q-outer vs KV-outer main branch by sequence length (the dispatcher's crossover), and Q-outer stages.

    python -m benchmarks.bench_paths [--seq-lens 2048 4096 8192 16384 32768 131072]

Paper shape: B=1, Hq=64, G=4, D=128, Bk=128, k=16, bf16, random (index kernels on
random projections) and realistic selections. Writes ``main_paths.csv``.
"""

import argparse

import torch

from benchmarks.bench_main import B, BK, D, G, HQ, TOPK, main_branch_flops, paper_inputs, selections
from msa_tl.benchmark import BenchTable, time_ms
from msa_tl.attention.kv_outer import sparse_attention_forward
from msa_tl.attention.q_outer import q_outer_attention_forward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 131072])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--results-root", default=None)
    args = parser.parse_args(argv)
    table = BenchTable("main_paths")
    for N in args.seq_lens:
        row = dict(B=B, N=N, Hq=HQ, G=G, D=D, Bk=BK, k=TOPK, dtype="bf16")
        q, k, v, q_idx, k_idx = paper_inputs(N)
        o = torch.empty_like(q)
        for kind, idx in selections(q_idx, k_idx):
            flops = main_branch_flops(idx)
            runs = {"kv_outer": lambda: sparse_attention_forward(q, k, v, idx, BK, out=o)}
            for st in args.stages:
                runs[f"q_outer stages={st}"] = lambda st=st: q_outer_attention_forward(q, k, v, idx, BK, out=o,
                                                                                      num_stages=st)
            for what, fn in runs.items():
                ms = time_ms(fn, rep_ms=500)
                table.add(**row, what=what, selection=kind, ms=ms, tflops=flops / ms / 1e9)
                print(f"N={N:>7} {kind:<9} {what:<20} {ms:9.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s", flush=True)
        del q, k, v, q_idx, k_idx, o
        torch.cuda.empty_cache()
    print(table.markdown(["N", "selection", "what", "ms", "tflops"]))
    print("wrote", table.write_csv(args.results_root))


if __name__ == "__main__":
    main()
