"""Packed documents against the same tokens as one sequence: MSA forward and a training step, and dense varlen.

    python -m benchmarks.bench_varlen [--total 131072] [--min-doc 1024] [--max-doc 32768]

Paper shape (Hq=64, G=4, D=Di=128, Bk=128, k=16, bf16). Document lengths are drawn log-uniformly between
``--min-doc`` and ``--max-doc`` (seeded) until they fill ``--total`` tokens, packed with flash-attn's
``cu_seqlens``. Timed in one process: ``msa_attention`` forward and the forward + backward of the main branch and
the KL through the public ops, packed and as one sequence of the same tokens (which attends across the documents'
borders: the work issue 15 says packing must not exceed), and torch's FlashAttention varlen (dense, per document)
for scale. Writes ``varlen.csv``.
"""

from __future__ import annotations

import argparse
import math

import torch

import msa_tl
from msa_tl.benchmark import BenchTable, time_ms
from msa_tl.ops.varlen import dense_packed

HQ, G, D, DI, BK, TOPK = 64, 4, 128, 128, 128, 16


def document_lengths(total: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """Log-uniform lengths in [shortest, longest] summing to ``total`` (the last one cut to fit)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        draw = math.exp(math.log(shortest) + torch.rand((), generator=generator).item()
                        * (math.log(longest) - math.log(shortest)))
        lengths.append(min(int(draw), total - sum(lengths)))
    return lengths


def step(q, k, v, q_idx, k_idx, do, **packing):
    """Select, attend, KL, and the backward of both losses through the public ops."""
    q, k, v, q_idx, k_idx = (t.detach().requires_grad_(True) for t in (q, k, v, q_idx, k_idx))
    o, lse, indices = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=BK, topk=TOPK, return_lse=True,
                                           return_indices=True, **packing)
    kl = msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=BK, lse=lse, **packing)
    torch.autograd.backward([o, kl], [do, torch.ones_like(kl)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=int, default=131072)
    parser.add_argument("--min-doc", type=int, default=1024)
    parser.add_argument("--max-doc", type=int, default=32768)
    parser.add_argument("--results-root", default=None)
    args = parser.parse_args(argv)
    lengths = document_lengths(args.total, args.min_doc, args.max_doc)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    N = args.total
    q = torch.randn(1, N, HQ, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, N, G, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q_idx = torch.randn(1, N, G, DI, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(1, N, DI, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    row = dict(total=N, docs=len(lengths), longest=max(lengths), Hq=HQ, G=G, D=D, Bk=BK, k=TOPK, dtype="bf16")
    table = BenchTable("varlen")
    runs = {
        "msa fwd, packed": lambda: msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=BK, topk=TOPK,
                                                        cu_seqlens=cu_seqlens),
        "msa fwd, one sequence": lambda: msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=BK, topk=TOPK),
        "msa step, packed": lambda: step(q, k, v, q_idx, k_idx, do, cu_seqlens=cu_seqlens),
        "msa step, one sequence": lambda: step(q, k, v, q_idx, k_idx, do),
    }
    runs["dense varlen fwd (flash)"] = lambda: dense_packed(q, k, v, cu_seqlens, max(lengths), None)
    times = {}
    for what, fn in runs.items():
        times[what] = time_ms(fn, rep_ms=1000)
        table.add(**row, what=what, ms=times[what])
        print(f"{what:<26} {times[what]:9.3f} ms", flush=True)
    for kind in ("fwd", "step"):
        ratio = times[f"msa {kind}, one sequence"] / times[f"msa {kind}, packed"]
        print(f"packed {kind}: {ratio:.2f}x the one-sequence speed ({len(lengths)} documents, longest {max(lengths)})")
    print(table.markdown(["what", "ms"]))
    print("wrote", table.write_csv(args.results_root))


if __name__ == "__main__":
    main()
