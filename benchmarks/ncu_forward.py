"""One main-branch forward at the paper shape, for Nsight Compute to profile its kernels.

    ncu --clock-control none --kernel-name regex:kv_outer --launch-count 1 \\
        --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,... \\
        python -m benchmarks.ncu_forward --seq-len 32768
"""

import argparse

import torch

from benchmarks.bench_main import BK, paper_inputs, realistic_selection
from msa_tl.index_topk import select_blocks
from msa_tl.kv_outer_attention import sparse_attention_forward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--selection", choices=("random", "realistic"), default="random")
    args = parser.parse_args(argv)
    q, k, v, q_idx, k_idx = paper_inputs(args.seq_len)
    idx = select_blocks(q_idx, k_idx, BK, 16) if args.selection == "random" else realistic_selection(args.seq_len)
    sparse_attention_forward(q, k, v, idx, BK)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
