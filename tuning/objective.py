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

``shape`` holds groups, heads, head_dim, index_dim, block_size, topk and seq, as in
:mod:`msa_tl.tuning.spaces`. Programs run in bf16 with a batch of 1.
"""

import math
import time

PROGRAMS = ("index_select_pipelined", "index_select_fused", "index_block_scores", "index_topk", "kv_outer_attention",
            "q_outer_attention", "lse_combine", "schedule", "kv_outer_backward")
PAPER_SHAPE = dict(groups=4, heads=64, head_dim=128, index_dim=128, block_size=128, topk=16, seq=131072)


def defaults(program: str, shape: dict = PAPER_SHAPE) -> dict:
    """The documented default config of ``program`` at ``shape`` (what a kernel runs without a tuned config)."""
    from msa_tl.attention import backward as kv_outer_backward
    from msa_tl.attention import combine as lse_combine
    from msa_tl.attention import kv_outer as kv_outer_attention
    from msa_tl.attention import q_outer as q_outer_attention
    from msa_tl.index import scores as index_scores
    from msa_tl.index import select as index_topk

    return dict({
        "kv_outer_backward": kv_outer_backward.BACKWARD_DEFAULTS,
        "index_select_pipelined": index_topk.PIPELINED_DEFAULTS,
        "index_select_fused": index_topk.FUSED_DEFAULTS,
        "index_block_scores": index_scores.DEFAULTS,
        "index_topk": index_topk.TOPK_DEFAULTS,
        "kv_outer_attention": kv_outer_attention.attention_defaults(shape["heads"] // shape["groups"]),
        "q_outer_attention": q_outer_attention.Q_OUTER_DEFAULTS,
        "lse_combine": lse_combine.COMBINE_DEFAULTS,
        "schedule": kv_outer_attention.SCHEDULE_TUNABLES,
    }[program])


def compile_units(program: str, shape: dict, config: dict) -> list:
    """[(builder, kwargs)] compiled by ``config``, with the same arguments the runtime passes."""
    from msa_tl.attention import backward as kv_outer_backward
    from msa_tl.attention import combine as lse_combine
    from msa_tl.attention import kv_outer as kv_outer_attention
    from msa_tl.attention import q_outer as q_outer_attention
    from msa_tl.attention import scheduler
    from msa_tl.index import scores as index_scores
    from msa_tl.index import select as index_topk

    G, Hq, D, Di = shape["groups"], shape["heads"], shape["head_dim"], shape["index_dim"]
    Bk, topk, bf16 = shape["block_size"], shape["topk"], "bfloat16"
    attention = dict(groups=G, heads=Hq, head_dim=D, block_size=Bk, topk=topk, scale=1.0 / math.sqrt(D), dtype=bf16)
    return {
        "index_select_pipelined": lambda: [(index_topk.pipelined_select_program,
                                            dict(groups=G, index_dim=Di, block_size=Bk, topk=topk, dtype=bf16,
                                                 **config))],
        "index_select_fused": lambda: [(index_topk.fused_select_program,
                                        dict(groups=G, index_dim=Di, block_size=Bk, topk=topk, dtype=bf16, **config))],
        "index_block_scores": lambda: [(index_scores.block_scores_program,
                                        dict(groups=G, index_dim=Di, block_size=Bk, scale=1.0 / math.sqrt(Di),
                                             dtype=bf16, **config))],
        "index_topk": lambda: [(index_topk.topk_program, dict(groups=G, block_size=Bk, topk=topk, **config))],
        "kv_outer_attention": lambda: [(kv_outer_attention.kv_outer_program,
                                        dict(attention, partial_dtype=bf16, item_queries=defaults("schedule", shape)[
                                            "item_queries"], **config))],
        "q_outer_attention": lambda: [(q_outer_attention.q_outer_program, dict(attention, **config))],
        "kv_outer_backward": lambda: [(kv_outer_backward.kv_outer_backward_program,
                                       dict(attention, item_queries=kv_outer_backward.BACKWARD_ITEM_QUERIES, **config))]
        + ([(kv_outer_backward.dq_reduce_program, dict(groups=G, heads=Hq, head_dim=D, topk=topk, dtype=bf16,
                                                      **kv_outer_backward.REDUCE_DEFAULTS))]
           if config["dq_partials"] else []),
        "lse_combine": lambda: [(lse_combine.combine_program,
                                 dict(heads=Hq, head_dim=D, topk=topk, groups=G, dtype=bf16, partial_dtype=bf16,
                                      **config))],
        "schedule": lambda: [(scheduler.plan_program, dict(item_queries=config["item_queries"]))],
    }[program]()


def lowering_cost(program: str, shape: dict):
    """A real, GPU-free objective: seconds to lower the config's programs for sm_90a."""
    from msa_tl.tl_compile import lower_to_cuda

    def objective(config):
        start = time.perf_counter()
        for builder, args in compile_units(program, shape, config):
            lower_to_cuda(builder, **args)
        return time.perf_counter() - start

    return objective


def _index_inputs(shape, seq):
    import torch

    return (torch.randn(1, seq, shape["groups"], shape["index_dim"], device="cuda", dtype=torch.bfloat16),
            torch.randn(1, seq, shape["index_dim"], device="cuda", dtype=torch.bfloat16))


def _attention_inputs(shape, seq):
    """q, k, v and a valid selection from the index kernels (random projections), on the GPU."""
    import torch

    from msa_tl.index.select import select_blocks

    q = torch.randn(1, seq, shape["heads"], shape["head_dim"], device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, seq, shape["groups"], shape["head_dim"], device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    indices = select_blocks(*_index_inputs(shape, seq), shape["block_size"], shape["topk"])
    return q, k, v, indices


def _check_selection(shape, seq, select):
    import torch

    from msa_tl.checks import POISON_INDEX, assert_same_selection_up_to_ties

    q_idx, k_idx = _index_inputs(shape, seq)
    out = torch.full((1, seq, shape["groups"], shape["topk"]), POISON_INDEX, device="cuda", dtype=torch.int32)
    select(q_idx, k_idx, out)
    assert_same_selection_up_to_ties(out, q_idx, k_idx, shape["block_size"], shape["topk"])


def _check_attention(shape, seq, forward):
    import torch

    from msa_tl.checks import assert_attention_matches_reference

    q, k, v, indices = _attention_inputs(shape, seq)
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    forward(q, k, v, indices, o, lse)
    assert_attention_matches_reference(o, lse, q, k, v, indices, shape["block_size"])


def _check_block_scores(shape, seq, config):
    import torch

    from msa_tl import reference as R
    from msa_tl.index.scores import block_scores

    q_idx, k_idx = _index_inputs(shape, seq)
    Bk = shape["block_size"]
    nblk = math.ceil(seq / Bk)
    S = block_scores(q_idx, k_idx, Bk, out=torch.full((seq * shape["groups"] * nblk,), float("nan"),
                                                        device="cuda"), **config)
    ref = R.block_scores(q_idx.cpu(), k_idx.cpu(), Bk).permute(0, 2, 1, 3)  # [1, N, G, nblk]
    visible = (torch.arange(nblk)[None, :] <= (torch.arange(seq) // Bk)[:, None])[None, :, None, :].expand_as(ref)
    torch.testing.assert_close(S.cpu().double()[visible], ref[visible], rtol=1e-4, atol=1e-4)


def gpu_objective(program: str, shape: dict, *, check_seq: int = 2125, rep_ms: float = 300):
    """objective(config) -> median ms of ``program`` at ``shape["seq"]``, after a reference check at ``check_seq``.

    What is timed: the whole index branch for ``index_select_pipelined`` and ``index_select_fused``. The
    kernel alone on the last (heaviest) query chunk for ``index_block_scores``, ``index_topk``,
    ``kv_outer_attention`` and ``lse_combine``. The whole main branch for ``q_outer_attention`` and ``schedule``.
    """
    import torch

    from msa_tl.attention.combine import combine_program
    from msa_tl.attention.kv_outer import kv_outer_program, persistent_work, sparse_attention_forward
    from msa_tl.attention.q_outer import q_outer_attention_forward
    from msa_tl.attention.scheduler import Schedule
    from msa_tl.benchmark import time_ms
    from msa_tl.index.scores import block_scores
    from msa_tl.index.select import TOPK_DEFAULTS, select_blocks, topk_program
    from msa_tl.tl_compile import compiled_kernel, sm_count

    if not torch.cuda.is_available():
        raise RuntimeError("the GPU objective needs a CUDA GPU (use lowering_cost for a CPU-only search)")
    N, Bk, topk, G, Hq = shape["seq"], shape["block_size"], shape["topk"], shape["groups"], shape["heads"]
    chunk = min(N, 16384)
    t0 = N - chunk
    D = shape["head_dim"]

    if program in ("index_select_pipelined", "index_select_fused"):
        q_idx, k_idx = _index_inputs(shape, N)
        method = program.removeprefix("index_select_")

        def check(config):
            _check_selection(shape, check_seq, lambda q, k, out: select_blocks(q, k, Bk, topk, method=method,
                                                                               config=config, out=out))

        def timed(config):
            return lambda: select_blocks(q_idx, k_idx, Bk, topk, method=method, config=config)
    elif program == "index_block_scores":
        q_idx, k_idx = _index_inputs(shape, N)
        buffer = torch.empty(chunk * G * math.ceil(N / Bk), device="cuda")

        def check(config):
            _check_block_scores(shape, check_seq, config)

        def timed(config):
            return lambda: block_scores(q_idx, k_idx, Bk, None, t0, chunk, out=buffer, **config)
    elif program == "index_topk":
        q_idx, k_idx = _index_inputs(shape, N)
        scores = block_scores(q_idx, k_idx, Bk, None, t0, chunk).view(1, chunk * G, -1)
        out = torch.empty(1, N * G, topk, device="cuda", dtype=torch.int32)

        def check(config):
            _check_selection(shape, check_seq,
                             lambda q, k, o: select_blocks(q, k, Bk, topk, method="two_pass", query_chunk=1024,
                                                           config=config, out=o))

        def timed(config):
            kernel = compiled_kernel(topk_program, groups=G, block_size=Bk, topk=topk, **{**TOPK_DEFAULTS, **config})
            return lambda: kernel(scores, out, t0)
    elif program in ("kv_outer_attention", "lse_combine", "schedule", "q_outer_attention"):
        q, k, v, indices = _attention_inputs(shape, N)
        o = torch.empty_like(q)
        if program == "q_outer_attention":
            def forward(config):
                return lambda q_, k_, v_, i_, o_, l_: q_outer_attention_forward(q_, k_, v_, i_, Bk, out=o_, lse_out=l_,
                                                                                **config)
        elif program == "schedule":
            def forward(config):
                return lambda q_, k_, v_, i_, o_, l_: sparse_attention_forward(q_, k_, v_, i_, Bk, out=o_, lse_out=l_,
                                                                               **config)
        else:
            key = "attention_config" if program == "kv_outer_attention" else "combine_config"

            def forward(config):
                return lambda q_, k_, v_, i_, o_, l_: sparse_attention_forward(q_, k_, v_, i_, Bk, out=o_, lse_out=l_,
                                                                               **{key: config})

        def check(config):
            _check_attention(shape, check_seq, forward(config))

        if program in ("q_outer_attention", "schedule"):
            def timed(config):
                run = forward(config)
                lse = torch.empty(q.shape[:3], device="cuda")
                return lambda: run(q, k, v, indices, o, lse)
        else:
            sched = Schedule(1, G, math.ceil(N / Bk), chunk, topk, defaults("schedule")["item_queries"], "cuda")
            sched.build(indices, t0, chunk)
            o_part = torch.randn(1, chunk * G, topk, Hq // G, D, device="cuda", dtype=torch.bfloat16)
            l_part = torch.full((1, chunk * G, topk, Hq // G), float("-inf"), device="cuda")
            lse = torch.empty(1, N, Hq, device="cuda")

            def timed(config):
                if program == "kv_outer_attention":
                    unit = compile_units(program, shape, config)[0][1]
                    args = (q, k, v, sched.items, sched.item_count, sched.entries, o_part.view(1, -1, D),
                            l_part.view(1, -1))
                    if not unit.get("persistent"):
                        kernel = compiled_kernel(kv_outer_program, **unit)
                        return lambda: kernel(*args, t0)
                    unit = dict(unit, ctas=unit.get("ctas") or sm_count(q.device))  # as the driver launches it
                    kernel = compiled_kernel(kv_outer_program, **unit)
                    work = persistent_work(unit["ctas"], 1, q.device)[0]
                    return lambda: (work.zero_(), kernel(*args, work, t0))  # its item counter starts at zero
                kernel = compiled_kernel(combine_program, **compile_units(program, shape, config)[0][1])
                l_part.copy_(torch.randn_like(l_part))  # finite LSEs: every slot is merged
                return lambda: kernel(o_part, l_part, o.view(1, N * Hq, D), lse.view(1, N * Hq), t0)
    elif program == "kv_outer_backward":
        from msa_tl.attention.backward import sparse_attention_backward

        q, k, v, indices = _attention_inputs(shape, N)
        o, lse = sparse_attention_forward(q, k, v, indices, Bk)
        do = torch.randn_like(q)

        def check(config):
            from msa_tl import reference as R
            from msa_tl.checks import relative_error

            qc, kc, vc, ic = _attention_inputs(shape, check_seq)
            oc, lc = sparse_attention_forward(qc, kc, vc, ic, Bk)
            doc = torch.randn_like(qc)
            grads = sparse_attention_backward(doc, None, qc, kc, vc, ic, oc, lc, Bk, config=config)
            for got, ref in zip(grads, R.sparse_attention_backward(doc, None, qc, kc, vc, ic, Bk)):
                rel = relative_error(got, ref)
                assert rel <= 2e-2, f"gradient rel err {rel:.2e}"

        def timed(config):
            return lambda: sparse_attention_backward(do, None, q, k, v, indices, o, lse, Bk, config=config)
    else:
        raise ValueError(f"unknown program {program!r}; one of {PROGRAMS}")

    def objective(config):
        check(config)
        return time_ms(timed(config), rep_ms=rep_ms)

    return objective
