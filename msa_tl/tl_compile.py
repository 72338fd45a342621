"""Building TileLang programs: the Hopper target, CPU-side lowering, and a per-config compile cache.

Programs are built by plain Python functions of their compile-time parameters
(``builder(**config) -> T.prim_func``); sequence length and batch are symbolic,
so one compiled kernel serves every N. A builder may carry TileLang pass configs
(``builder.pass_configs``, a dict); every path below (lowering, compiling, the
tuner's precompile) applies them, so what is tested is what runs.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from typing import Callable

SM90_ARCH = "sm_90a"
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one Hopper CTA may use
_TL_DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}


def tl_dtype(torch_dtype) -> str:
    """TileLang's name for a torch dtype (bf16, fp16, fp32)."""
    return _TL_DTYPES[str(torch_dtype)]


def sm_count(device) -> int:
    """SMs of ``device``: the persistent kernels' default CTA count (one an SM)."""
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


def sm90_target():
    """The Hopper target, built from a dict so it also works on a machine without a GPU."""
    from tilelang import tvm

    return tvm.target.Target({"kind": "cuda", "arch": SM90_ARCH})


def pass_configs(builder: Callable) -> dict:
    """The TileLang pass configs ``builder``'s programs are compiled with (usually none)."""
    return dict(getattr(builder, "pass_configs", None) or {})


def lower_to_cuda(builder: Callable, **config) -> str:
    """CUDA source of ``builder(**config)`` for sm_90a; needs no GPU (used by the CI compile tests)."""
    import tilelang
    from tilelang import tvm

    target = sm90_target()
    with tvm.transform.PassContext(opt_level=3, config=pass_configs(builder)), target:
        return tilelang.lower(builder(**config), target=target).kernel_source


def compile_program(builder: Callable, config: dict, target="cuda"):
    """``tilelang.compile`` of ``builder(**config)`` with the builder's pass configs."""
    import tilelang

    return tilelang.compile(builder(**config), target=target, pass_configs=pass_configs(builder) or None)


@functools.lru_cache(maxsize=None)
def _compiled(builder: Callable, items: tuple):
    log = os.environ.get("MSA_TL_KERNEL_LOG")
    if log:  # one JSON line per distinct kernel, so a CPU machine can compile the same set ahead
        with open(log, "a") as f:
            f.write(json.dumps({"builder": f"{builder.__module__}:{builder.__name__}", "config": dict(items)}) + "\n")
    return compile_program(builder, dict(items))


def builder_by_name(name: str) -> Callable:
    """The builder ``"module:function"`` (as the kernel log writes it)."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def compiled_kernel(builder: Callable, **config):
    """The compiled kernel of ``builder(**config)`` for the current GPU, compiled once per config."""
    return _compiled(builder, tuple(sorted(config.items())))
