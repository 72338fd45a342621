"""Compile TileLang kernels for sm_90a on a machine without a GPU, into TileLang's kernel cache.

    MSA_TL_KERNEL_LOG=kernels.jsonl pytest -m gpu ...      # on the GPU machine: log what runs
    python -m benchmarks.precompile kernels.jsonl --jobs 2  # here: compile the same set ahead

Or list them here: launch code run under :func:`collect_kernels` (CPU tensors, a Hopper GPU's name and SM count
pretended) records each kernel it would compile instead of compiling it.

The cache key is the program, the target (sm_90a, as TileLang detects it on a Hopper GPU) and the
TileLang build, so kernels compiled here are cache hits there (`TILELANG_CACHE_DIR` names the
cache on both sides). Lowering is single-threaded; ``--jobs`` compiles that many in parallel.
"""

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import time
import types
from unittest import mock


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


class _Uncompiled:
    """Stands in for a compiled kernel while :func:`collect_kernels` records: launching it does nothing."""

    def __call__(self, *args, **kwargs):
        return None


@contextlib.contextmanager
def collect_kernels(path: str, gpu: str = "NVIDIA H200", sms: int = 132, capability=(9, 0)):
    """Within the block, ``compiled_kernel`` appends each distinct kernel to the JSON-lines file ``path`` (as
    ``MSA_TL_KERNEL_LOG`` does on the GPU) and returns a kernel that does nothing; the CUDA device reads as ``gpu``
    with ``sms`` SMs, so tuned configs and split counts resolve as they would there. Run launch code on CPU tensors."""
    from msa_tl import tl_compile

    seen = set()

    def record(builder, items):
        entry = json.dumps({"builder": f"{builder.__module__}:{builder.__name__}", "config": dict(items)})
        if entry not in seen:
            seen.add(entry)
            with open(path, "a") as f:
                f.write(entry + "\n")
        return _Uncompiled()

    props = types.SimpleNamespace(name=gpu, major=capability[0], minor=capability[1], multi_processor_count=sms)
    with mock.patch.object(tl_compile, "_compiled", record), \
            mock.patch("torch.cuda.get_device_properties", lambda device=None: props):
        yield


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
