"""Search spaces of the TileLang programs, with constraints that reject impossible configs before compiling.

Each program has a grid of choices (``SPACES[program].params``: the knob grids its
kernel module declares beside its defaults, e.g. ``kv_outer_attention.ATTENTION_KNOBS``)
and a ``reject(config, shape)`` that returns why a config cannot work on Hopper at
that shape (shared memory over the per-block limit, accumulators over the
register file, tiles that break the kernel's layout assumptions), or None.
``shape`` holds the problem's dims: groups, heads, head_dim, index_dim,
block_size, topk, seq.
"""

import itertools
from dataclasses import dataclass, field
from typing import Callable

from msa_tl.attention import backward as kv_outer_backward
from msa_tl.attention import combine as lse_combine
from msa_tl.attention import kv_outer as kv_outer_attention
from msa_tl.attention import q_outer as q_outer_attention
from msa_tl.index import scores as index_scores
from msa_tl.index import select as index_topk
from msa_tl.tl_compile import SMEM_LIMIT
from msa_tl.tuning.cache import PROGRAM_DIMS

REG_FILE = 64 * 1024  # 32-bit registers per SM
MAX_REGS_PER_THREAD = 255
MAX_ITEM_QUERIES = max(kv_outer_attention.SCHEDULE_KNOBS["item_queries"])  # the schedule space's largest work item


@dataclass(frozen=True)
class Space:
    params: dict = field(default_factory=dict)  # name -> tuple of choices
    reject: Callable[[dict, dict], "str | None"] = lambda config, shape: None
    dims: tuple = ()  # the shape dims the program depends on (its cache key; seq is bucketed separately)

    def grid(self):
        names = list(self.params)
        for values in itertools.product(*(self.params[n] for n in names)):
            yield dict(zip(names, values))

    def feasible(self, shape: dict):
        """Every config of the grid that passes the constraints at ``shape``."""
        return [c for c in self.grid() if self.reject(c, shape) is None]


def _acc_regs(rows: int, cols: int, threads: int) -> int:
    """32-bit registers per thread for an fp32 [rows, cols] fragment spread over ``threads``."""
    return rows * cols // threads


def _reject_index(config, shape, *, stored_scores: bool):
    rows, Bk, Di = config["block_M"], shape["block_size"], shape["index_dim"]
    if rows > shape["groups"] * Bk:
        return f"block_M {rows} spans more tokens than one key block ({shape['groups']} x {Bk} rows)"
    if rows < 64:
        return "block_M below 64 rows cannot use wgmma"
    smem = 2 * (rows * Di + config["num_stages"] * Bk * Di) + (0 if stored_scores else 4 * rows)
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    regs = _acc_regs(rows, Bk, config["threads"]) + (0 if stored_scores else 2 * shape["topk"])
    if regs > MAX_REGS_PER_THREAD - 40:
        return f"about {regs} accumulator registers per thread leave too few for the rest"
    if not stored_scores and config["threads"] < rows:
        return "the fused select gives each row its own thread: threads must be >= block_M"
    return None


def _reject_pipelined_select(config, shape):
    rows = index_topk.pipelined_rows(shape["groups"], shape["block_size"])
    Bk, Di = shape["block_size"], shape["index_dim"]
    if not rows:
        return "fewer than 2 x 64 rows per key block: a consumer needs one wgmma M tile"
    smem = 2 * (2 * rows * Di + config["stages"] * Bk * Di) + 8 * rows
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    if _acc_regs(rows, Bk, 128) > 232 - 40:
        return "a consumer's accumulator leaves too few of its 232 registers for the rest"
    return None


def _reject_topk(config, shape):
    smem = 4 * config["block_M"] * (config["col_tile"] + 1)
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    if config["block_M"] > shape["groups"] * shape["block_size"]:
        return "block_M spans more tokens than one key block"
    return None


def _reject_attention(config, shape):
    R = shape["heads"] // shape["groups"]
    if 64 % R:
        return f"{R} heads per group do not tile a consumer's 64 rows"
    if config["tma_stores"] and R < kv_outer_attention.TMA_MIN_HEADS:
        return f"{R} heads per group: a TMA box a query is too small (TMA_MIN_HEADS)"
    if config.get("store_eviction") and not config["tma_stores"]:
        return "an L2 policy for the partial stores needs TMA stores"
    if config.get("tma_gathers") and (R < kv_outer_attention.TMA_MIN_HEADS or config.get("persistent", False)):
        return f"TMA gathers need >= {kv_outer_attention.TMA_MIN_HEADS} heads per group and per-item CTAs"
    if config.get("direct_stores") and (config["tma_stores"] or config.get("persistent", False)):
        return "direct stores replace the O tile: per-item CTAs with thread stores only"
    if config.get("direct_stores") and shape["head_dim"] % 32:
        return "direct stores need a head dim that is a multiple of 32"
    if config.get("consumers", 2) == 1 and not (config.get("tma_gathers") and config.get("direct_stores")
                                                and not config["pingpong"]):
        return "one consumer a CTA needs TMA gathers, direct stores and no ping-pong"
    D, Bk = shape["head_dim"], shape["block_size"]
    if config.get("persistent", False):  # the kernel's own count, at the schedule's default item size
        item_queries = kv_outer_attention.SCHEDULE_TUNABLES["item_queries"]
        smem = kv_outer_attention.persistent_shared_bytes(R, D, Bk, item_queries, config["stages"], config["tma_stores"])
    else:  # at the largest item the schedule space allows
        consumers = config.get("consumers", 2)
        smem = kv_outer_attention.item_shared_bytes(D, Bk, MAX_ITEM_QUERIES, config["stages"], config["tma_stores"],
                                                    config.get("o_buffers", 2), config.get("direct_stores", False),
                                                    consumers)
        if consumers == 1 and smem > kv_outer_attention.TWO_CTA_SMEM:
            return f"shared memory {smem} B > {kv_outer_attention.TWO_CTA_SMEM} B: two CTAs would not fit an SM"
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    return None


def _reject_q_outer(config, shape):
    R = shape["heads"] // shape["groups"]
    rows, D, Bk = max(R, 16), shape["head_dim"], shape["block_size"]
    # Q, O, P (bf16) and S (fp32) once; K and V once per pipeline stage
    smem = 2 * 2 * rows * D + 6 * rows * Bk + config["num_stages"] * 2 * 2 * Bk * D
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    if Bk % (config["threads"] // 32 * 8):
        return f"{config['threads'] // 32} warps cannot split {Bk} keys into 8-wide MMA columns"
    return None


def _reject_backward(config, shape):
    R, D, Bk = shape["heads"] // shape["groups"], shape["head_dim"], shape["block_size"]
    if 64 % R or Bk % 64:
        return f"tiles of 64 rows need whole queries ({R} heads) and 64-key consumers (Bk {Bk})"
    smem = kv_outer_backward.backward_shared_bytes(R, D, Bk, config["stages"])
    if smem > SMEM_LIMIT:
        return f"shared memory {smem} B > {SMEM_LIMIT} B"
    return None


def _reject_combine(config, shape):
    if config["rows"] * shape["head_dim"] // config["threads"] > 128:
        return "too many accumulator registers per thread"
    return None


def _reject_schedule(config, shape):
    partial_bytes = config["query_chunk"] * shape["heads"] * shape["topk"] * shape["head_dim"] * 2
    if partial_bytes > 8 * 2**30:
        return f"partials of one chunk take {partial_bytes / 2**30:.0f} GiB > 8 GiB"
    return None


_KNOBS_AND_RULES = {  # program -> (its knob grid, declared beside the kernel; the constraints on it)
    "index_block_scores": (index_scores.KNOBS, lambda c, s: _reject_index(c, s, stored_scores=True)),
    "index_select_pipelined": (index_topk.PIPELINED_KNOBS, _reject_pipelined_select),
    "index_select_fused": (index_topk.FUSED_KNOBS, lambda c, s: _reject_index(c, s, stored_scores=False)),
    "index_topk": (index_topk.TOPK_KNOBS, _reject_topk),
    "kv_outer_attention": (kv_outer_attention.ATTENTION_KNOBS, _reject_attention),
    "q_outer_attention": (q_outer_attention.Q_OUTER_KNOBS, _reject_q_outer),
    "kv_outer_backward": (kv_outer_backward.BACKWARD_KNOBS, _reject_backward),
    "lse_combine": (lse_combine.COMBINE_KNOBS, _reject_combine),
    "schedule": (kv_outer_attention.SCHEDULE_KNOBS, _reject_schedule),
}
SPACES = {name: Space(knobs, reject, PROGRAM_DIMS[name]) for name, (knobs, reject) in _KNOBS_AND_RULES.items()}
