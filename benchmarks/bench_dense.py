"""Dense causal GQA attention baselines and the GPU's own ceilings.

    python -m benchmarks.bench_dense [--seq-lens 8192 32768 131072]
    python -m benchmarks.bench_dense --scaled 131072 1048576   # fewer heads, scaled

Times torch SDPA (cuDNN and flash backends), forward and forward+backward, at
the paper's layer shape (B=1, Hq=64, Hkv=4, D=128, bf16), plus a bf16 GEMM and
a device-to-device copy as the compute and bandwidth ceilings that later
stages are measured against. Writes ``dense_baselines.csv`` and
``ceilings.csv`` under ``benchmarks/results/<gpu>/`` and prints markdown tables.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from msa_tl.benchmark import BenchTable, time_ms

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def causal_attention_flops(batch: int, seq: int, heads: int, dim: int) -> float:
    """Forward FLOPs of causal attention: QK^T and PV over the N^2/2 visible pairs."""
    return 4.0 * batch * heads * dim * seq * seq / 2


def _sdpa_step(backend: SDPBackend, q, k, v, grad_out, gqa_native: bool):
    def step():
        with sdpa_kernel(backend):
            o = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa_native)
            if grad_out is not None:
                o.backward(grad_out)
        return o

    return step


def bench_sdpa(table: BenchTable, seq: int, backend_name: str, backward: bool, B=1, Hq=64, G=4, D=128) -> None:
    dtype = torch.bfloat16
    # SDPA takes [B, H, N, D]; transposed views of bshd tensors, as a bshd caller would pass them
    q = torch.randn(B, seq, Hq, D, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(B, seq, G, D, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(B, seq, G, D, device="cuda", dtype=dtype).transpose(1, 2)
    grad_out = torch.randn_like(q) if backward else None
    gqa = "native"
    step = None
    for native in (True, False):
        if not native:  # the backend refused enable_gqa: expand K/V once, outside the timed region
            gqa = "expanded"
            k, v = (t.repeat_interleave(Hq // G, dim=1) for t in (k, v))
        leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
        step = _sdpa_step(BACKENDS[backend_name], *leaves, grad_out, native)
        try:
            step()
            torch.cuda.synchronize()
            break
        except RuntimeError as exc:
            error = str(exc).splitlines()[0][:120]
            step = None
    row = {"op": "sdpa_causal", "backend": backend_name, "pass": "fwd+bwd" if backward else "fwd", "B": B, "N": seq,
           "Hq": Hq, "Hkv": G, "D": D, "dtype": "bf16", "gqa": gqa}
    if step is None:
        table.add(**row, ms=float("nan"), tflops=float("nan"), note=f"unsupported: {error}")
        return
    ms = time_ms(step, warmup_ms=300, rep_ms=2000, grad_to_none=leaves if backward else None)
    flops = causal_attention_flops(B, seq, Hq, D) * (3.5 if backward else 1.0)  # backward = 2.5x forward
    table.add(**row, ms=ms, tflops=flops / ms / 1e9, note="")
    print(f"  sdpa {backend_name:<5} {row['pass']:<7} N={seq:>7}: {ms:9.2f} ms  {flops / ms / 1e9:6.1f} TFLOP/s ({gqa} GQA)", flush=True)


def bench_ceilings(table: BenchTable) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b)
    table.add(what="bf16 GEMM 8192^3 (torch.matmul)", ms=ms, rate=2 * 8192**3 / ms / 1e9, unit="TFLOP/s")
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    table.add(what="device copy 2 GiB (read + write)", ms=ms, rate=2 * src.numel() * 2 / ms / 1e6, unit="GB/s")
    for row in table.rows:
        print(f"  {row['what']}: {row['rate']:.0f} {row['unit']}", flush=True)


def dense_cudnn_ms(seq: int, backward: bool = False, B=1, Hq=64, G=4, D=128, full_width_max=262144) -> float:
    """Dense causal cuDNN SDPA at the paper shape, timed now (so ratios come from one process).

    Past ``full_width_max`` tokens one forward takes seconds: it is timed with Hq/4 query heads over
    G/4 KV heads (the same GQA ratio) and scaled x4, as :func:`bench_scaled_forward` does.
    """
    table = BenchTable("dense")
    if seq > full_width_max and not backward and G % 4 == 0:
        bench_scaled_forward(table, seq, heads=Hq // 4, kv_heads=G // 4, D=D, full_heads=Hq)
        return table.rows[-1]["ms"] * 4
    bench_sdpa(table, seq, "cudnn", backward, B=B, Hq=Hq, G=G, D=D)
    return table.rows[-1]["ms"]


def bench_scaled_forward(table: BenchTable, seq: int, heads: int, kv_heads: int, D=128, full_heads=64, runs=3) -> None:
    """cuDNN forward with fewer heads (same GQA ratio), scaled by full_heads / heads to the paper shape.

    For lengths where one call takes seconds: CUDA events, one warm-up, the median of ``runs``.
    """
    q = torch.randn(1, heads, seq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, seq, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def step():
        with sdpa_kernel(BACKENDS["cudnn"]):
            return scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    step()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times)[len(times) // 2]
    scale = full_heads / heads
    flops = causal_attention_flops(1, seq, heads, D)
    table.add(op="sdpa_causal", backend="cudnn", **{"pass": "fwd"}, B=1, N=seq, Hq=heads, Hkv=kv_heads, D=D,
              dtype="bf16", gqa="native", ms=ms, tflops=flops / ms / 1e9,
              note=f"timed with {heads} heads, scaled x{scale:g} to Hq={full_heads}: {ms * scale:.1f} ms")
    print(f"  sdpa cudnn fwd N={seq:>8} Hq={heads} Hkv={kv_heads}: {ms:9.1f} ms ({flops / ms / 1e9:.0f} TFLOP/s)"
          f" -> x{scale:g} = {ms * scale:.1f} ms at Hq={full_heads}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--results-root", default=None, help="write CSVs under ROOT/<gpu>/ (default benchmarks/results)")
    parser.add_argument("--scaled", type=int, nargs="*", default=None, metavar="N",
                        help="only time cuDNN forward at these lengths with Hq=16, Hkv=1 and scale to Hq=64 "
                             "(writes dense_scaled.csv)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_dense needs a CUDA GPU")
    if args.scaled:
        scaled = BenchTable("dense_scaled")
        for seq in args.scaled:
            bench_scaled_forward(scaled, seq, heads=16, kv_heads=1)
        print(scaled.markdown(["N", "Hq", "Hkv", "ms", "tflops", "note"]))
        print("wrote", scaled.write_csv(args.results_root))
        return

    ceilings = BenchTable("ceilings")
    bench_ceilings(ceilings)
    dense = BenchTable("dense_baselines")
    for seq in args.seq_lens:
        for backend in BACKENDS:
            for backward in (False, True):
                bench_sdpa(dense, seq, backend, backward)
                torch.cuda.empty_cache()
    print(f"\n{dense.env['gpu']}, torch {dense.env['torch']}, {dense.env['date']}")
    print(ceilings.markdown(["what", "ms", "rate", "unit"]))
    print()
    print(dense.markdown(["backend", "pass", "N", "gqa", "ms", "tflops", "note"]))
    for table in (ceilings, dense):
        path = table.write_csv(args.results_root)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
