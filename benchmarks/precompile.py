"""Compile TileLang kernels for sm_90a on a machine without a GPU, into TileLang's kernel cache.

    MSA_TL_KERNEL_LOG=kernels.jsonl pytest -m gpu ...      # on the GPU machine: log what runs
    python -m benchmarks.precompile kernels.jsonl --jobs 2  # here: compile the same set ahead

The cache key is the program, the target (sm_90a, as TileLang detects it on a Hopper GPU) and the
TileLang build, so kernels compiled here are cache hits there (`TILELANG_CACHE_DIR` names the
cache on both sides). Lowering is single-threaded; ``--jobs`` compiles that many in parallel.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import time


def _compile(line: str) -> tuple[str, float, str]:
    from msa_tl.tl_compile import builder_by_name, compile_program, sm90_target

    entry = json.loads(line)
    start = time.time()
    try:
        compile_program(builder_by_name(entry["builder"]), entry["config"], target=sm90_target())
        error = ""
    except Exception as exc:  # report and go on: one bad entry must not stop the others
        error = f"{type(exc).__name__}: {exc}"[:300]
    return entry["builder"], time.time() - start, error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="kernel logs (JSON lines of builder and config)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    lines = list(dict.fromkeys(line.strip() for path in args.logs for line in open(path) if line.strip()))
    print(f"{len(lines)} kernels, {args.jobs} at a time", flush=True)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        for i, (name, seconds, error) in enumerate(pool.map(_compile, lines), 1):
            print(f"[{i}/{len(lines)}] {name} {seconds:.0f} s {error}", flush=True)


if __name__ == "__main__":
    main()
