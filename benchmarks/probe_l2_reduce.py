"""Probe of the accumulate-in-L2 forward (NOTES.md, session 23): how fast can SMs add fp32 boxes into the L2?

    python -m benchmarks.probe_l2_reduce [--gbytes 8] [--rows 2048 4096 8192 524288]

The KV-outer forward writes a bf16 partial (R x D, 4 KB at the paper's shape) per (query, KV head, chosen
block) to DRAM and the combine reads it back: 69 of the ~108 GB it moves at 128K. The design this probes adds
each block's unnormalised fp32 P V box (8 KB) into a per-(query, KV head) accumulator instead, with TMA bulk
reductions (``cp.reduce.async.bulk.global.shared::cta.add.f32``), in query chunks small enough that the
accumulators stay in the L2. Its floor depends on the L2's fp32 reduction rate, which no datasheet gives.

Each CTA (128 threads, 32 KB of shared memory: four 8 KB boxes) has each of its four warps' lane 0 send one box a
round to a pseudo-random row of ``acc [rows, 2048]`` fp32, with at most ``depth`` bulk groups in flight a warp.
Modes: ``reduce`` (f32 add), ``store`` (plain bulk store of the same 8 KB), ``store_bf16`` (a 4 KB box: today's
partial stores) and ``reduce_512`` (the 8 KB as 16 reductions of one 512-byte row each, as the accumulating kernel
sends them). ``rows`` 2048-8192 keep the target in the L2 (16-64 MB); 524288 (4 GB) sends it to DRAM. Prints
GB/s of boxes sent for each (mode, rows).
"""

import argparse

import tilelang.language as T
import torch

from msa_tl.benchmark import environment, time_ms
from msa_tl.tl_compile import compiled_kernel

BOX = 2048  # fp32 elements of one box: R x D = 16 x 128

PROBE_CUDA = r"""
__device__ __forceinline__ unsigned msa_probe_hash(unsigned x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
  return x;
}

// one lane a warp: `rounds` boxes of `bytes` from its shared slot to pseudo-random rows of acc (row pitch 8 KB)
template <int kMode, int kDepth>
__device__ __forceinline__ void msa_probe_send(float *smem, float *acc, int rows, int rounds) {
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) != 0) return;
  const unsigned src = static_cast<unsigned>(__cvta_generic_to_shared(smem + warp * 2048));
  const int bytes = kMode == 2 ? 4096 : 8192;
  for (int r = 0; r < rounds; ++r) {
    const unsigned row = msa_probe_hash((blockIdx.x * 4 + warp) * 1000003u + r) % static_cast<unsigned>(rows);
    float *dst = acc + static_cast<long long>(row) * 2048;
    if (kMode == 3) {  // the same 8 KB as 16 reductions of 512 bytes (one per O row)
      #pragma unroll
      for (int h = 0; h < 16; ++h) {
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                     :: "l"(dst + h * 128), "r"(src + h * 512), "r"(512) : "memory");
      }
    } else if (kMode == 0) {
      asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                   :: "l"(dst), "r"(src), "r"(bytes) : "memory");
    } else {
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                   :: "l"(dst), "r"(src), "r"(bytes) : "memory");
    }
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    asm volatile("cp.async.bulk.wait_group.read %0;" :: "n"(kDepth) : "memory");
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
"""


def l2_reduce_probe_program(mode: int, depth: int = 4):
    """acc [rows, 2048] fp32 += (mode 0, 3: in 512-byte rows) or := (1: fp32, 2: 4 KB) boxes from shared memory;
    ``rounds`` a warp."""
    rows = T.dynamic("rows")

    @T.prim_func
    def l2_reduce_probe(Acc: T.Tensor((rows, BOX), "float32"), rounds: T.int32):
        with T.Kernel(T.int32(132 * 4), threads=128, prelude=PROBE_CUDA) as bx:
            box = T.alloc_shared((4, BOX), "float32")  # [warps, R * D]
            for w, i in T.Parallel(4, BOX):
                box[w, i] = 1.0 / (1 + i % 7 + w)
            T.fence_proxy_async()
            T.sync_threads()
            T.call_extern("handle", f"msa_probe_send<{mode}, {depth}>", T.address_of(box[0, 0]),
                          T.address_of(Acc[0, 0]), rows, rounds)

    return l2_reduce_probe


MODES = {"reduce": 0, "store": 1, "store_bf16": 2, "reduce_512": 3}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gbytes", type=float, default=8.0, help="box bytes a launch sends")
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 4096, 8192, 524288])
    parser.add_argument("--depth", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    print(environment())
    ctas = 132 * 4
    print("mode,depth,rows,target_MB,box_bytes,ms,GB_per_s")
    for rows in args.rows:
        acc = torch.zeros(rows, BOX, device="cuda", dtype=torch.float32)
        for name, mode in MODES.items():
            for depth in args.depth:
                kernel = compiled_kernel(l2_reduce_probe_program, mode=mode, depth=depth)
                box_bytes = 4096 if mode == 2 else 8192
                rounds = max(1, int(args.gbytes * 1e9 / (ctas * 4 * box_bytes)))
                ms = time_ms(lambda: kernel(acc, rounds))
                sent = ctas * 4 * rounds * box_bytes
                print(f"{name},{depth},{rows},{rows * BOX * 4 / 2**20:.0f},{box_bytes},{ms:.3f},{sent / ms / 1e6:.0f}",
                      flush=True)
        if rows <= 8192:  # the reductions really added: every element of acc gained sum of boxes sent to its row
            acc.zero_()
            kernel = compiled_kernel(l2_reduce_probe_program, mode=0, depth=4)
            kernel(acc, 3)
            torch.cuda.synchronize()
            assert torch.isfinite(acc).all() and acc.sum() > 0, "the reductions left acc unchanged"


if __name__ == "__main__":
    main()
