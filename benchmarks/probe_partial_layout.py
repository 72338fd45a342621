"""What DRAM gives the partials' traffic patterns: rows of 4 KB (one query's R x D bf16 partial box at the paper
shape) copied between two 2 GiB buffers, contiguous or at random rows on either side, against the plain copy.

    python -m benchmarks.probe_partial_layout

The attention kernel writes each (query, KV head, slot) box to its query's home (scattered 4 KB writes) and reads
Q boxes from the L2 (the "hot" rows: a 16 MiB region, a 4K-query chunk's Q of one KV group); the combine reads
each query's 16 boxes as one 64 KB run. If scattered 4 KB writes run well below the copy rate, the partials
should be written in the order the items make them (contiguous) and gathered by the combine instead. Rates count
bytes read plus bytes written, except from hot rows (L2 reads: the bytes written only); "hot -> hot" is the L2's
own read + write rate.
"""

import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench


@triton.jit
def _move_rows(src, dst, src_rows, dst_rows, ROW: tl.constexpr):
    """dst[dst_rows[i]] = src[src_rows[i]], one ROW-element row a program."""
    i = tl.program_id(0)
    s = tl.load(src_rows + i).to(tl.int64)
    d = tl.load(dst_rows + i).to(tl.int64)
    cols = tl.arange(0, ROW)
    tl.store(dst + d * ROW + cols, tl.load(src + s * ROW + cols))


@triton.jit
def _write_rows(dst, dst_rows, ROW: tl.constexpr):
    """dst[dst_rows[i]] = i (writes only)."""
    i = tl.program_id(0)
    d = tl.load(dst_rows + i).to(tl.int64)
    cols = tl.arange(0, ROW)
    tl.store(dst + d * ROW + cols, (cols * 0 + i).to(dst.dtype.element_ty))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="size of each buffer")
    parser.add_argument("--row-bytes", type=int, nargs="+", default=[4096, 16384, 65536])
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    total = int(args.gib * 2**30)
    src = torch.randn(total // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    print(f"torch copy                         {ms:7.3f} ms  {2 * total / ms / 1e9:6.2f} TB/s")
    for row_bytes in args.row_bytes:
        ROW = row_bytes // 2
        warps = 4 if ROW <= 2048 else 8
        n = total // row_bytes
        ident = torch.arange(n, device="cuda", dtype=torch.int32)
        perm = torch.randperm(n, device="cuda").int()
        perm2 = torch.randperm(n, device="cuda").int()
        # the attention's Q side: a 4K-query chunk's Q rows of one KV group, 16 MiB read again and again (L2-resident)
        hot = torch.randint(0, min(n, 2**24 // row_bytes), (n,), device="cuda", dtype=torch.int32)
        hot2 = torch.randint(0, min(n, 2**24 // row_bytes), (n,), device="cuda", dtype=torch.int32)
        cases = (("contiguous -> contiguous", ident, ident, 2), ("contiguous -> random rows", ident, perm, 2),
                 ("random rows -> contiguous", perm, ident, 2), ("random rows -> random rows", perm, perm2, 2),
                 ("hot 16 MiB rows -> random rows", hot, perm, 1), ("hot 16 MiB rows -> contiguous", hot, ident, 1),
                 ("hot 16 MiB rows -> hot 16 MiB rows (the L2)", hot, hot2, 2))
        for name, s, d, sides in cases:
            ms = do_bench(lambda: _move_rows[(n,)](src, dst, s, d, ROW=ROW, num_warps=warps), return_mode="median")
            print(f"{row_bytes // 1024:3d} KB rows, {name:32s} {ms:7.3f} ms  {sides * total / ms / 1e9:6.2f} TB/s")
        for name, d in (("write-only contiguous", ident), ("write-only random rows", perm)):
            ms = do_bench(lambda: _write_rows[(n,)](dst, d, ROW=ROW, num_warps=warps), return_mode="median")
            print(f"{row_bytes // 1024:3d} KB rows, {name:32s} {ms:7.3f} ms  {total / ms / 1e9:6.2f} TB/s")


if __name__ == "__main__":
    main()
