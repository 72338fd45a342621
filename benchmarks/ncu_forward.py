"""One main-branch forward at the paper shape (``--train``: then its backward and the KL pass), for Nsight
Compute to profile the kernels.

    ncu --clock-control none --kernel-name regex:kv_outer --launch-count 1 \\
        --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,... \\
        python -m benchmarks.ncu_forward --seq-len 32768

At ``--seq-len 16384`` each pipelined kernel (attention, backward, KL) launches once; ``--query-chunk 4096
--store-warp`` profiles the attention as session 24's design runs it; ``--combine-warps`` (with the store warp) as
design 8 does (its second launch onwards merge the previous chunk: ``--launch-skip 1``).
"""

import argparse
import math

import torch

from benchmarks.bench_main import BK, D, paper_inputs, realistic_selection
from msa_tl.index.select import select_blocks
from msa_tl.kl_loss import kl_alignment_loss_forward
from msa_tl.attention.kv_outer import sparse_attention_forward
from msa_tl.attention.backward import sparse_attention_backward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--selection", choices=("random", "realistic"), default="random")
    parser.add_argument("--train", action="store_true", help="also the backward and the KL pass (with gradients)")
    parser.add_argument("--query-chunk", type=int, default=None, help="the forward's query chunk (default: tuned)")
    parser.add_argument("--store-warp", action="store_true", help="the attention's partial stores by a store warp")
    parser.add_argument("--combine-warps", action="store_true",
                        help="the previous chunk merged by the attention's combine warps (with the store warp)")
    args = parser.parse_args(argv)
    q, k, v, q_idx, k_idx = paper_inputs(args.seq_len)
    idx = select_blocks(q_idx, k_idx, BK, 16) if args.selection == "random" else realistic_selection(args.seq_len)
    config = dict(store_warp=True) if args.store_warp or args.combine_warps else {}
    if args.combine_warps:
        config["combine_warps"] = True
    o, lse = sparse_attention_forward(q, k, v, idx, BK, query_chunk=args.query_chunk, attention_config=config or None)
    if args.train:
        sparse_attention_backward(torch.randn_like(q), None, q, k, v, idx, o, lse, BK)
        kl_alignment_loss_forward(q, k, q_idx, k_idx, idx, BK, 1.0 / math.sqrt(D), 1.0 / math.sqrt(D), lse,
                                  with_grads=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
