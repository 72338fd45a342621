"""Which implementation runs each MSA stage on a given device.

A stage runs a TileLang kernel when one is registered for it and supports the
device; otherwise it runs the float64 reference (``msa_tl.reference``) and
says so once per (stage, device type) through the ``msa_tl`` logger at
WARNING level, so a slow path is never silent.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger("msa_tl")

STAGES = {
    "select_blocks": "index branch: block scoring + exp-free top-k",
    "sparse_attention": "main branch: attention over the chosen blocks",
    "kl_alignment_loss": "KL alignment loss of the index branch",
}

# stage -> (kernel, predicate on the device). Kernel modules register here as they land.
_KERNELS: dict[str, tuple[Callable, Callable[[torch.device], bool]]] = {}
_REPORTED: set[tuple[str, str]] = set()


def register_kernel(stage: str, kernel: Callable, supports: Callable[[torch.device], bool]) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {sorted(STAGES)}")
    _KERNELS[stage] = (kernel, supports)


def kernel_for(stage: str, device: torch.device) -> Callable | None:
    """The registered kernel for ``stage`` on ``device``, or None after logging (once) that the reference runs."""
    entry = _KERNELS.get(stage)
    if entry is not None and entry[1](device):
        return entry[0]
    key = (stage, device.type)
    if key not in _REPORTED:
        _REPORTED.add(key)
        logger.warning(
            "msa_tl: %s runs the float64 reference on %s (no TileLang kernel for this device); "
            "it costs O(N^2) time and is meant for checking and small problems",
            STAGES[stage],
            device.type,
        )
    return None


def kernel_status(device: torch.device) -> dict[str, str]:
    """stage -> 'tilelang' or 'reference' for ``device`` (for ``msa-tl info``; logs nothing)."""
    return {
        stage: "tilelang" if stage in _KERNELS and _KERNELS[stage][1](device) else "reference"
        for stage in STAGES
    }
