"""Benchmark harness: time with ``triton.testing.do_bench`` (median), collect rows, print, write CSV.

Every row carries the environment (GPU, date, torch / tilelang / CUDA
versions) next to its shape, so a CSV under ``benchmarks/results/<gpu>/``
says on its own what was measured where.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

RESULTS_ROOT = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def gpu_slug(device_name: str) -> str:
    """Folder name for a GPU: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200'."""
    known = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device_name.upper().replace("NVIDIA", ""))
    if known:
        return known.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def environment() -> dict[str, str]:
    """Who measured: device name, compute capability, versions, UTC date."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu, cc = props.name, f"{props.major}.{props.minor}"
    else:
        gpu, cc = "cpu", ""
    return {
        "gpu": gpu,
        "capability": cc,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "tilelang": _version("tilelang"),
    }


def time_ms(fn: Callable[[], object], *, warmup_ms: float = 200, rep_ms: float = 1000, grad_to_none=None) -> float:
    """Median milliseconds of ``fn`` on the GPU (events, L2 flushed between runs by do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))


def markdown_table(frame: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    cells = [[float_format.format(x) if isinstance(x, float) else str(x) for x in row] for row in frame.itertuples(index=False)]
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


@dataclass
class BenchTable:
    """Rows of one benchmark; each row gets the environment columns appended."""

    name: str
    rows: list[dict] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=environment)

    def add(self, **row) -> dict:
        self.rows.append({**row, **self.env})
        return self.rows[-1]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def markdown(self, columns: list[str] | None = None) -> str:
        frame = self.frame()
        return markdown_table(frame[columns] if columns else frame)

    def write_csv(self, root: Path | str | None = None) -> Path:
        """Write ``<root>/<gpu slug>/<name>.csv`` (root None: :data:`RESULTS_ROOT`) and return its path."""
        path = Path(root or RESULTS_ROOT) / gpu_slug(self.env["gpu"]) / f"{self.name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.frame().to_csv(path, index=False)
        return path


def end_spawned_rank() -> None:
    """Leave a ``torch.multiprocessing.spawn`` rank of a ``torch.distributed`` group whose work is done: a barrier (a
    rank that tears down while another still talks to it aborts the other at exit under gloo), the group destroyed,
    output flushed, and ``os._exit(0)``. The interpreter's own teardown in a spawned child sometimes ends in
    "terminate called without an active exception" from a leftover communication thread (about 1 run in 40 under
    pytest), which would fail a rank whose every check passed."""
    import os
    import sys

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
