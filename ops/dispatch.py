"""Which implementation runs each MSA stage on a given device.

A stage runs a TileLang kernel when one is registered for it and supports the
device; otherwise it runs the float64 reference (``msa_tl.reference``) and
says so, with the limit the call hit, once per (stage, device type, limit)
through the ``msa_tl`` logger at WARNING level, so a slow path is never silent.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger("msa_tl")

PAPER_SHAPE = dict(dtype=torch.bfloat16, heads=64, groups=4, head_dim=128, index_dim=128, block_size=128, topk=16)

STAGES = {
    "select_blocks": "index branch: block scoring + exp-free top-k",
    "sparse_attention": "main branch: attention over the chosen blocks",
    "sparse_attention_backward": "main branch backward: dq, dk, dv",
    "kl_alignment_loss": "KL alignment loss of the index branch",
    "kl_alignment_loss_backward": "KL alignment loss backward: dq_idx, dk_idx",
    "msa_decode": "decode over a paged cache: index scores, top-k and attention for the newest tokens",
}

# stage -> (kernel, limit on the device and the call's shape). Kernel modules register here.
_KERNELS: dict[str, tuple[Callable, Callable[..., str | None]]] = {}
_REPORTED: set[tuple[str, str, str]] = set()


def register_kernel(stage: str, kernel: Callable, limit: Callable[..., str | None]) -> None:
    """``limit(device, **shape)`` says which of ``kernel``'s limits a call hits (a string), None if it runs it."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {sorted(STAGES)}")
    _KERNELS[stage] = (kernel, limit)


def kernel_for(stage: str, device: torch.device, **shape) -> Callable | None:
    """The registered kernel for ``stage`` on ``device`` and ``shape``, or None after logging (once per limit)
    that the reference runs and why."""
    entry = _KERNELS.get(stage)
    hit = "no TileLang kernel is registered" if entry is None else entry[1](device, **shape)
    if hit is None:
        return entry[0]
    key = (stage, device.type, hit)
    if key not in _REPORTED:
        _REPORTED.add(key)
        logger.warning(
            "msa_tl: %s runs the float64 reference on %s (the kernel's limit: %s); "
            "it costs O(N^2) time and is meant for checking and small problems",
            STAGES[stage],
            device.type,
            hit,
        )
    return None


def kernel_status(device: torch.device) -> dict[str, str]:
    """stage -> 'tilelang' or 'reference' for ``device`` at the paper's shape (for ``msa-tl info``; logs nothing)."""
    return {
        stage: "tilelang" if stage in _KERNELS and _KERNELS[stage][1](device, **PAPER_SHAPE) is None else "reference"
        for stage in STAGES
    }
