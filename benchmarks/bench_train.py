"""Training step cost on the GPU: MSA forward + backward against dense cuDNN and fla's parallel_nsa.

    python -m benchmarks.bench_train [--seq-lens 32768 131072]

Paper shape: B=1, Hq=64, G=4, D=Di=128, Bk=128, k=16, bf16. One training step of
the attention layer is: the index branch selects (no gradient), the main branch
runs forward and backward, and the KL alignment loss runs its one pass, which gives the
value and the gradients for q_idx, k_idx (the autograd backward only scales them). Every stage is timed on its own kernels, and the
whole step once more through the public autograd ops (selection included);
the main branch alone is compared with fla's ``parallel_nsa`` forward+backward
on the same selection, the whole step with dense cuDNN SDPA forward+backward
timed in the same run. Useful FLOPs of the main-branch backward:
2.5x the forward's (dS, dP, dQ, dK, dV: 5 GEMMs against 2).
Writes ``train_step.csv``.
"""

import argparse
import math

import torch

import msa_tl
from benchmarks.bench_dense import dense_cudnn_ms
from benchmarks.bench_main import BK, D, G, HQ, TOPK, fla_selected_attention, main_branch_flops, paper_inputs, selections
from msa_tl.benchmark import BenchTable, time_ms
from msa_tl.index.select import select_blocks
from msa_tl.kl_loss import kl_alignment_loss_backward, kl_alignment_loss_forward
from msa_tl.attention.kv_outer import sparse_attention_forward
from msa_tl.attention.backward import sparse_attention_backward


def autograd_step(q, k, v, q_idx, k_idx, do):
    """One layer step on the public ops: select, attend, KL, and the backward of both losses."""
    q, k, v, q_idx, k_idx = (t.detach().requires_grad_(True) for t in (q, k, v, q_idx, k_idx))
    with torch.no_grad():
        indices = msa_tl.select_blocks(q_idx, k_idx, block_size=BK, topk=TOPK)
    o, lse = msa_tl.sparse_attention(q, k, v, indices, block_size=BK, return_lse=True)
    kl = msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=BK, lse=lse)
    torch.autograd.backward([o, kl], [do, torch.ones_like(kl)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--results-root", default=None)
    args = parser.parse_args(argv)
    table = BenchTable("train_step")
    fla = fla_selected_attention()
    scale = index_scale = 1.0 / math.sqrt(D)  # as the layer computes it, so the same kernels serve both
    for N in args.seq_lens:
        row = dict(B=1, N=N, Hq=HQ, G=G, D=D, Bk=BK, k=TOPK, dtype="bf16")
        q, k, v, q_idx, k_idx = paper_inputs(N)
        do = torch.randn_like(q)
        main_ms, chosen = {}, {}
        for kind, idx in selections(q_idx, k_idx):
            fwd_flops = main_branch_flops(idx)
            o, lse = sparse_attention_forward(q, k, v, idx, BK, scale)
            chosen[kind] = idx, lse
            fwd = time_ms(lambda: sparse_attention_forward(q, k, v, idx, BK, scale), rep_ms=1000)
            bwd = time_ms(lambda: sparse_attention_backward(do, None, q, k, v, idx, o, lse, BK, scale), rep_ms=1000)
            main_ms[kind] = (fwd, bwd)
            table.add(**row, what="main branch fwd (ours)", selection=kind, ms=fwd, tflops=fwd_flops / fwd / 1e9)
            table.add(**row, what="main branch bwd (ours)", selection=kind, ms=bwd, tflops=2.5 * fwd_flops / bwd / 1e9)
            line = f"N={N:>7} {kind:<9} main fwd {fwd:8.2f} ms, bwd {bwd:8.2f} ms ({2.5 * fwd_flops / bwd / 1e9:.0f} TFLOP/s)"
            if fla is not None:
                qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
                fla_ms = time_ms(lambda: fla(qg, kg, vg, idx).backward(do), rep_ms=1000, grad_to_none=[qg, kg, vg])
                table.add(**row, what="fla parallel_nsa fwd+bwd", selection=kind, ms=fla_ms,
                          tflops=3.5 * fwd_flops / fla_ms / 1e9, speedup=fla_ms / (fwd + bwd))
                line += f"; fla fwd+bwd {fla_ms:8.2f} ms -> ours {fla_ms / (fwd + bwd):.2f}x"
            print(line, flush=True)
        # the index kernels' selection; its main-branch times are the loop's. The KL gets the main forward's
        # lse and, as the layer's autograd op does, computes its gradients in the forward's pass (the backward
        # only scales them); "KL bwd" alone is what a backward without that pass costs.
        idx, lse = chosen["random"]
        _, lse_student = kl_alignment_loss_forward(q, k, q_idx, k_idx, idx, BK, scale, index_scale, lse)
        kl_bwd = time_ms(lambda: kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, idx, BK, scale, index_scale, lse,
                                                            lse_student), rep_ms=1000)
        table.add(**row, what="KL bwd alone (not in the step)", selection="random", ms=kl_bwd)
        stages = {
            "index select (fused score+top-k)": time_ms(lambda: select_blocks(q_idx, k_idx, BK, TOPK), rep_ms=1000),
            "main fwd": main_ms["random"][0],
            "main bwd": main_ms["random"][1],
            "KL fwd + grads (one pass)": time_ms(lambda: kl_alignment_loss_forward(
                q, k, q_idx, k_idx, idx, BK, scale, index_scale, lse, with_grads=True), rep_ms=1000),
        }
        for stage, ms in stages.items():
            table.add(**row, what=f"stage: {stage}", selection="random", ms=ms)
        total = sum(stages.values())
        dense = dense_cudnn_ms(N, backward=True)
        table.add(**row, what="MSA training step (index + main fwd/bwd + KL one pass)", selection="random",
                  ms=total, dense_cudnn_ms=dense, speedup=dense / total)
        step = time_ms(lambda: autograd_step(q, k, v, q_idx, k_idx, do), rep_ms=1000)
        table.add(**row, what="MSA training step through the autograd ops (measured whole)", selection="random",
                  ms=step, dense_cudnn_ms=dense, speedup=dense / step)
        print(f"N={N:>7} step {total:8.1f} ms (whole, autograd ops: {step:.1f} ms), dense cuDNN fwd+bwd {dense:.0f} ms"
              f" -> {dense / total:.2f}x; stages " + ", ".join(f"{s} {m:.1f}" for s, m in stages.items()), flush=True)
        torch.cuda.empty_cache()
    cols = ["N", "what", "selection", "ms", "tflops", "speedup", "dense_cudnn_ms"]
    frame = table.frame()
    print(table.markdown([c for c in cols if c in frame.columns]))
    print("wrote", table.write_csv(args.results_root))


if __name__ == "__main__":
    main()
