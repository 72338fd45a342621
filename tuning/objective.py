"""What one tuning trial of a program costs, and what it compiles.

- :func:`gpu_objective` ``(program, shape) -> objective(config) -> ms``. It first runs the config at
  a short length (``check_seq``) and checks the output against the float64 reference. A wrong
  result raises, and the search records a failed trial. Then it times the config at ``shape["seq"]``
  with ``do_bench`` (median). Inputs are random and drawn once per objective.
- :func:`lowering_cost` ``(program, shape) -> objective(config) -> s``: seconds to lower for
  sm_90a. It needs no GPU; the CPU tests and ``msa-tl tune --objective lowering`` use it.
- :func:`compile_units` ``(program, shape, config)``: the ``(builder, args)`` pairs that a config
  compiles. :func:`msa_tl.tuning.search.precompile` builds them on several CPU cores before the GPU
  times them.

Each is read from the program's :class:`~msa_tl.tunable.TunableProgram` (:mod:`msa_tl.tuning.programs`).
``shape`` holds groups, heads, head_dim, index_dim, block_size, topk and seq, as in
:mod:`msa_tl.tuning.spaces`. Programs run in bf16 with a batch of 1.
"""

import time

from msa_tl.tuning.programs import PROGRAMS, tunable

# batch and queries (the newest tokens a row) key the decode programs only
PAPER_SHAPE = dict(groups=4, heads=64, head_dim=128, index_dim=128, block_size=128, topk=16, seq=131072, batch=1,
                   queries=1)


def defaults(program: str, shape: dict = PAPER_SHAPE) -> dict:
    """The documented default config of ``program`` at ``shape`` (what a kernel runs without a tuned config)."""
    return tunable(program).default_config(shape)


def compile_units(program: str, shape: dict, config: dict) -> list:
    """[(builder, kwargs)] compiled by ``config``, with the same arguments the runtime passes."""
    return tunable(program).compile_units(shape, config)


def lowering_cost(program: str, shape: dict):
    """A real, GPU-free objective: seconds to lower the config's programs for sm_90a."""
    from msa_tl.tl_compile import lower_to_cuda

    def objective(config):
        start = time.perf_counter()
        for builder, args in compile_units(program, shape, config):
            lower_to_cuda(builder, **args)
        return time.perf_counter() - start

    return objective


def gpu_objective(program: str, shape: dict, *, check_seq: int = 2125, rep_ms: float = 300):
    """objective(config) -> median ms of ``program`` at ``shape["seq"]``, after a reference check at ``check_seq``.

    What is timed is the program's ``gpu_trial``: the whole index branch for ``index_select_pipelined`` and
    ``index_select_fused``. The kernel alone on the last (heaviest) query chunk for ``index_block_scores``,
    ``index_topk``, ``kv_outer_attention`` and ``lse_combine``. The whole main branch for ``q_outer_attention``
    and ``schedule``, the whole backward for ``kv_outer_backward``.
    """
    import torch

    from msa_tl.benchmark import time_ms

    if not torch.cuda.is_available():
        raise RuntimeError("the GPU objective needs a CUDA GPU (use lowering_cost for a CPU-only search)")
    if program not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}; one of {PROGRAMS}")
    check, timed = tunable(program).gpu_trial(shape, check_seq)

    def objective(config):
        check(config)
        return time_ms(timed(config), rep_ms=rep_ms)

    return objective
