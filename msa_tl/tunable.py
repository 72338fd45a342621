"""What the autotuner knows about one tunable TileLang program, declared beside its kernel.

Each kernel module holds its programs' :class:`TunableProgram` next to their defaults and knob grids (as a
Triton kernel carries its ``autotune`` configs), and :mod:`msa_tl.tuning.programs` collects them. The tuner's
spaces, defaults, compile units, cache keys and GPU objective are read from these descriptions.

``shape`` holds the problem's dims: groups, heads, head_dim, index_dim, block_size, topk, seq. ``config`` maps
each knob to one of its choices. This module imports neither kernels nor the tuner, so any kernel module can
import it.
"""

import math
from dataclasses import dataclass
from typing import Callable

MAX_REGS_PER_THREAD = 255


@dataclass(frozen=True)
class TunableProgram:
    """One program of ``msa-tl tune``.

    - ``dims``: the shape dims the program depends on, its cache key (seq is bucketed separately).
    - ``defaults``: the config a kernel runs without a tuned one, a dict or ``shape -> dict``.
    - ``knobs``: knob name -> tuple of choices, the grid the search samples.
    - ``reject(config, shape) -> str | None``: why ``config`` cannot work on Hopper at ``shape`` (shared memory,
      registers, tiling), checked before anything is compiled.
    - ``compile_units(shape, config) -> [(builder, kwargs)]``: the programs ``config`` compiles, with the
      arguments the runtime passes (bf16, batch 1).
    - ``gpu_trial(shape, check_seq) -> (check, timed)``: draws random inputs once; ``check(config)`` raises where
      the output at ``check_seq`` differs from the float64 reference, ``timed(config)`` returns the call that is
      timed at ``shape["seq"]``.
    """

    name: str
    dims: tuple
    defaults: "dict | Callable[[dict], dict]"
    knobs: dict
    reject: Callable[[dict, dict], "str | None"]
    compile_units: Callable[[dict, dict], list]
    gpu_trial: Callable[[dict, int], tuple]

    def default_config(self, shape: dict) -> dict:
        """A fresh copy of the defaults at ``shape``."""
        return dict(self.defaults(shape) if callable(self.defaults) else self.defaults)


def acc_regs(rows: int, cols: int, threads: int) -> int:
    """32-bit registers per thread for an fp32 [rows, cols] fragment spread over ``threads``."""
    return rows * cols // threads


ATTENTION_DIMS = ("groups", "heads", "head_dim", "block_size", "topk")  # the main branch's programs' cache key


def attention_program_args(shape: dict) -> dict:
    """The shape arguments the runtime passes to a main-branch attention program (forward or backward), bf16."""
    return dict(groups=shape["groups"], heads=shape["heads"], head_dim=shape["head_dim"],
                block_size=shape["block_size"], topk=shape["topk"], scale=1.0 / math.sqrt(shape["head_dim"]),
                dtype="bfloat16")


HOPPER_SMS = 132  # H100 SXM and H200: the SM count the decode programs' shape-picked defaults assume when tuning

# the decode programs' cache keys: the batch and the newest tokens a row (queries) as well as the layer's dims
DECODE_DIMS = dict(scan=("groups", "index_dim", "block_size", "batch", "queries"),
                   topk=("groups", "block_size", "topk", "batch", "queries"),
                   attention=("heads", "groups", "head_dim", "block_size", "topk", "batch", "queries"))


def decode_rows(shape: dict) -> int:
    """Query rows of a decode step's batch row: its newest tokens (``queries``, 1 unless given) x the KV groups."""
    return shape.get("queries", 1) * shape["groups"]
