"""The ``msa-tl`` command: ``info``, ``demo`` and ``tune``."""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch

from msa_tl.checks import relative_error

def _tilelang_status() -> str:
    try:
        import tilelang
    except Exception as exc:  # a broken install should be reported, not crash `info`
        return f"not importable ({type(exc).__name__}: {exc})"
    return tilelang.__version__


def cmd_info(args: argparse.Namespace) -> int:
    import msa_tl
    from msa_tl.ops.dispatch import STAGES, kernel_status

    print(f"msa-tl     {msa_tl.__version__}")
    print(f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"tilelang   {_tilelang_status()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hopper = "yes" if props.major == 9 else "no"
        print(f"GPU        {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.1f} GiB; Hopper: {hopper}")
        device = torch.device("cuda")
    else:
        print("GPU        none (CPU only: every stage runs the float64 reference)")
        device = torch.device("cpu")
    print(f"stages on {device.type}:")
    for stage, path in kernel_status(device).items():
        print(f"  {stage:<26} {path:<10} {STAGES[stage]}")
    from msa_tl.tuning.cache import user_cache
    from msa_tl.tuning.tune import cached_entries

    entries = cached_entries()
    print(f"tuned configs: {len(entries)} (user cache {user_cache().path}; shipped with the package)")
    for source, gpu, key, entry in entries:
        timing = f", {entry['ms']:.4g} ms vs default {entry.get('default_ms', float('nan')):.4g} ms" if "ms" in entry else ""
        print(f"  [{source}] {gpu} | {key} -> {entry['config']}{timing}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from msa_tl.benchmark import markdown_table
    from msa_tl.tuning.tune import tune

    shape = {k: getattr(args, k) for k in ("groups", "heads", "head_dim", "index_dim", "block_size", "topk", "batch",
                                           "queries")}
    try:
        table = tune(args.programs, args.seq_lens, shape=shape, trials=args.trials, timeout=args.timeout,
                     jobs=args.jobs, objective=args.objective, storage=args.storage, save=not args.no_save)
    except RuntimeError as exc:
        print(f"msa-tl tune: {exc}", file=sys.stderr)
        return 2
    table = table.assign(config=table.config.map(lambda c: " ".join(f"{k}={v}" for k, v in c.items())))
    print(markdown_table(table))
    if args.objective == "gpu" and not args.no_save:
        from msa_tl.tuning.cache import user_cache

        print(f"saved the tuned configs to {user_cache().path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from msa_tl.ops import MSAAttention
    from msa_tl.ops.dispatch import kernel_status

    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    tolerance = 2e-2 if on_gpu else 1e-4
    B, N, hidden, Hq, G, D, Bk, topk = 1, args.seq_len, 256, 8, 2, 32, 64, 4
    torch.manual_seed(args.seed)
    paths = kernel_status(device)
    print(f"device {device.type} ({torch.cuda.get_device_name() if on_gpu else 'no GPU used'}), dtype {str(dtype)[6:]}")
    print("paths: " + ", ".join(f"{stage}={path}" for stage, path in paths.items()))
    print(f"layer: hidden {hidden}, Hq={Hq}, G={G}, D=Di={D}, block {Bk}, topk {topk}; input [B={B}, N={N}]")

    layer = MSAAttention(hidden, Hq, G, D, D, block_size=Bk, topk=topk).to(device, dtype).train()
    x = torch.randn(B, N, hidden, device=device, dtype=dtype)
    start = time.perf_counter()
    out = layer(x)
    lm_loss = out.output.float().square().mean()
    (lm_loss + out.kl_loss).backward()
    if on_gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    main_grad = layer.q_proj.weight.grad.float().norm().item()
    index_grad = layer.index_q_proj.weight.grad.float().norm().item()
    print(f"sparse forward+backward: {elapsed * 1e3:.0f} ms; KL loss {out.kl_loss.item():.4f}; "
          f"|grad q_proj| {main_grad:.3g}, |grad index_q_proj| {index_grad:.3g}")

    with torch.no_grad():
        dense_layer = copy.deepcopy(layer)
        dense_layer.set_mode("warmup")
        y_dense = dense_layer(x, compute_kl=False).output.double()
        full_layer = copy.deepcopy(layer)
        full_layer.topk = math.ceil(N / Bk)  # k*Bk >= N: MSA must equal dense attention
        y_full = full_layer(x, compute_kl=False).output.double()
        y_sparse = layer(x, compute_kl=False).output.double()
    err_full = relative_error(y_full, y_dense)
    diff_sparse = relative_error(y_sparse, y_dense)
    ok = err_full <= tolerance and math.isfinite(diff_sparse)
    print(f"MSA with topk*block >= N vs dense SDPA: rel err {err_full:.2e} (tolerance {tolerance:.0e}) "
          f"{'OK' if ok else 'FAIL'}")
    print(f"MSA with topk*block = {topk * Bk} of N = {N} vs dense: rel diff {diff_sparse:.3f} "
          "(sparse attention sees fewer keys, so it differs)")
    return 0 if ok else 1


def _at_least(low: int):
    """argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msa-tl", description="MiniMax Sparse Attention in TileLang")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="GPU, versions, which stages have kernels, tuned configs").set_defaults(run=cmd_info)
    demo = commands.add_parser("demo", help="run the MSA layer forward and backward on a small problem")
    demo.add_argument("--seq-len", type=_at_least(1), default=1024, help="sequence length N (default 1024)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    demo.set_defaults(run=cmd_demo)
    from msa_tl.ops.kernels import INDEX_BLOCK_SIZES
    from msa_tl.ops.validation import MAX_TOPK
    from msa_tl.tuning.objective import PAPER_SHAPE, PROGRAMS

    tune_cmd = commands.add_parser("tune", help="search tile/stage/chunk sizes on this GPU and cache the winners")
    tune_cmd.add_argument("--programs", nargs="+", choices=PROGRAMS, default=list(PROGRAMS), metavar="P",
                          help=f"programs to tune (default all: {' '.join(PROGRAMS)})")
    tune_cmd.add_argument("--seq-lens", type=_at_least(1), nargs="+", default=[PAPER_SHAPE["seq"]], metavar="N")
    tune_cmd.add_argument("--trials", type=_at_least(1), default=30,
                          help="finished trials per (program, N), default 30")
    tune_cmd.add_argument("--timeout", type=_positive_float, default=None, help="seconds per (program, N)")
    tune_cmd.add_argument("--jobs", type=_at_least(1), default=4,
                          help="configs compiled in parallel on the CPU (default 4)")
    tune_cmd.add_argument("--objective", choices=("gpu", "lowering"), default="gpu",
                          help="gpu: check then time each config (default); lowering: CPU-only dry run of the search")
    tune_cmd.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite under the cache dir)")
    tune_cmd.add_argument("--no-save", action="store_true", help="do not write the winners to the user cache")
    for dim in ("groups", "heads", "head_dim", "index_dim", "batch", "queries"):
        tune_cmd.add_argument(f"--{dim.replace('_', '-')}", dest=dim, type=_at_least(1), default=PAPER_SHAPE[dim],
                              help=f"default {PAPER_SHAPE[dim]}")
    tune_cmd.add_argument("--block-size", dest="block_size", type=int, choices=INDEX_BLOCK_SIZES,
                          default=PAPER_SHAPE["block_size"],
                          help=f"one of the kernels' block sizes (default {PAPER_SHAPE['block_size']})")
    tune_cmd.add_argument("--topk", type=_at_least(1), default=PAPER_SHAPE["topk"],
                          help=f"1 to {MAX_TOPK} (default {PAPER_SHAPE['topk']})")
    tune_cmd.set_defaults(run=cmd_tune)
    args = parser.parse_args(argv)
    if args.command == "tune":
        if args.topk > MAX_TOPK:
            parser.error(f"argument --topk: at most {MAX_TOPK}, got {args.topk}")
        if args.heads % args.groups:
            parser.error(f"--heads ({args.heads}) must be a multiple of --groups ({args.groups})")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
