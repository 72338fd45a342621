"""The registry of tunable programs: the :class:`~msa_tl.tunable.TunableProgram` each kernel module declares.

The tuner's spaces (:mod:`msa_tl.tuning.spaces`), defaults, compile units and GPU objective
(:mod:`msa_tl.tuning.objective`) and cache keys (:mod:`msa_tl.tuning.cache`) are all read from here.
"""

import functools
import importlib

# program -> (kernel module, attribute) of its description, in ``msa-tl tune``'s default order. Loaded on first
# use: the CLI reads the names without importing TileLang, and the kernel modules import the cache.
DECLARED = {
    "index_select_pipelined": ("msa_tl.index.select", "PIPELINED_TUNING"),
    "index_select_fused": ("msa_tl.index.select", "FUSED_TUNING"),
    "index_block_scores": ("msa_tl.index.scores", "TUNING"),
    "index_topk": ("msa_tl.index.select", "TOPK_TUNING"),
    "kv_outer_attention": ("msa_tl.attention.kv_outer", "ATTENTION_TUNING"),
    "q_outer_attention": ("msa_tl.attention.q_outer", "Q_OUTER_TUNING"),
    "lse_combine": ("msa_tl.attention.combine", "COMBINE_TUNING"),
    "schedule": ("msa_tl.attention.kv_outer", "SCHEDULE_TUNING"),
    "kv_outer_backward": ("msa_tl.attention.backward", "BACKWARD_TUNING"),
    "decode_scan": ("msa_tl.decode.scores", "DECODE_SCAN_TUNING"),
    "decode_scan_fp8": ("msa_tl.decode.scores", "DECODE_SCAN_FP8_TUNING"),
    "decode_topk": ("msa_tl.decode.topk", "DECODE_TOPK_TUNING"),
    "decode_attention": ("msa_tl.decode.attention", "DECODE_ATTENTION_TUNING"),
}
PROGRAMS = tuple(DECLARED)


@functools.cache  # the descriptions are constants; cache keys read them on every kernel call
def tunable(program: str):
    """The :class:`~msa_tl.tunable.TunableProgram` named ``program`` (KeyError for any other name)."""
    module, attribute = DECLARED[program]
    description = getattr(importlib.import_module(module), attribute)
    assert description.name == program, f"{module}.{attribute} describes {description.name!r}, not {program!r}"
    return description


def tunable_programs() -> dict:
    """program -> its TunableProgram, for every program of :data:`PROGRAMS`."""
    return {name: tunable(name) for name in PROGRAMS}
