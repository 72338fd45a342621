"""One MSA decode step over a paged cache on the GPU: index scan -> top-k (-> rescore) -> split attention -> LSE combine.

    q [B, S, Hq, D], q_idx [B, S, G, Di]                    the newest S tokens of each row (already appended)
    k_pages / v_pages [num_pages, Bk, G, D], k_idx_pages [num_pages, Bk, Di], block_table [B, max_pages] int32,
    seqlens [B] int32                                        the cache (pages of one block)
    k_idx_exact [num_pages, Bk, Di]                          with FP8 index keys and ``rescore_candidates``: the
                                                             exact keys that rank the FP8 stage's best blocks again
    -> o [B, S, Hq, D], lse [B, S, Hq] fp32, indices [B, S, G, topk] int32

:class:`DecodePlan` splits the step as serving stacks do: what depends only on the batch (the block table, the
row lengths, the four compiled kernels, the split count and the scratch buffers) is built once per step;
:meth:`DecodePlan.run` then launches the four kernels for one layer with no host sync and grids fixed by the
cache's maxima, so a whole step (every layer) can be captured in one CUDA graph and replayed while ``seqlens``
and the pages change in place.

With ``waves`` > 1 the rows go in waves: the index scan of each wave runs on the caller's stream, and the top-k,
attention and combine of a wave run on a second, high-priority stream as soon as its scan ends, under the next
wave's scan. The scan streams the index keys at the copy rate; what follows it is latency-bound (~20 us whatever
the rows), so only the last wave's is left after the scan (NOTES.md: the floor of 12x with FP8 keys at 1M, B = 8).
"""

from __future__ import annotations

import math

import torch

from msa_tl.decode.attention import attention_defaults, attention_kernel, attention_splits, decode_combine_program
from msa_tl.decode.rescore import rescore_kernels
from msa_tl.decode.scores import scan_kernel
from msa_tl.decode.topk import topk_kernel
from msa_tl.tl_compile import compiled_kernel, sm_count, tl_dtype
from msa_tl.tuning.cache import tuned_config


class DecodePlan:
    """The launches of one decode step for every layer that shares its batch: rows, lengths, shapes.

    Args:
        block_table: [B, max_pages] int32, the pages of each row (read at run time; update it in place).
        seqlens: [B] int32, tokens cached per row including the S new ones (read at run time; in place).
        queries: S, the newest tokens of each row that attend.
        heads, groups, head_dim, index_dim: Hq, G, D, Di.
        block_size, topk: the MSA block (= the page size) and the blocks each query attends to.
        local_blocks: the newest blocks each query is given (its own and the ones before it).
        scale, index_scale: softmax and index-score scales (default 1/sqrt(D), 1/sqrt(Di)).
        dtype: q's dtype (bf16 / fp16).
        index_fp8: the index keys are float8_e4m3fn codes with a scale per token (the scan quantises each query row
            to FP8 too and scores with FP8 wgmma); else they have ``dtype``.
        rescore_candidates: with ``index_fp8``, > 0 makes the selection two-stage (:mod:`msa_tl.decode.rescore`):
            the FP8 top-k keeps this many blocks beside the forced ones, and the exact index keys rank them again.
        splits: CTAs that share each (token, group)'s slots, or with ``attention_config`` ``union`` each chunk of
            tokens' union of blocks (default :func:`msa_tl.decode.attention.attention_splits`).
        pdl: programmatic dependent launch: each kernel lets the next one launch when it ends its work and the next
            waits (``griddepcontrol``) before it reads, so a launch's latency hides under the kernel before it.
            Built, not yet run on a GPU: off by default.
        waves: rows in this many waves (B a multiple of it), each wave's selection and attention on a high-priority
            second stream under the next wave's scan (module docstring; graph capture keeps the fork and join,
            though not the stream priority). Only :meth:`run` runs such a plan. Built, not yet run: default 1.
        scores_config, topk_config, attention_config: knob overrides of each kernel's config: the tuned one for this
            GPU and shape (``msa-tl tune --programs decode_scan decode_topk ...``; batch, queries and the context
            max_pages * block_size are part of its key), else the defaults.
    """

    def __init__(self, block_table: torch.Tensor, seqlens: torch.Tensor, *, queries: int, heads: int, groups: int,
                 head_dim: int, index_dim: int, block_size: int = 128, topk: int = 16, scale: float | None = None,
                 index_scale: float | None = None, dtype: torch.dtype = torch.bfloat16, index_fp8: bool = False,
                 local_blocks: int = 1, rescore_candidates: int = 0, splits: int | None = None, pdl: bool = False,
                 scores_config: dict | None = None, topk_config: dict | None = None,
                 attention_config: dict | None = None, waves: int = 1):
        B, max_pages = block_table.shape
        device = block_table.device
        self.block_table, self.seqlens = block_table, seqlens
        self.shape = dict(batch=B, queries=queries, heads=heads, groups=groups, head_dim=head_dim,
                          index_dim=index_dim, block_size=block_size, topk=topk)
        if not isinstance(waves, int) or waves < 1 or B % waves:
            raise ValueError(f"waves must divide the batch ({B} rows), got {waves!r}")
        self.waves = waves
        if waves > 1:  # a plan per wave, over views of the block table and lengths: the kernels are shared
            rows = B // waves
            self._wave_plans = [
                DecodePlan(block_table[w * rows:(w + 1) * rows], seqlens[w * rows:(w + 1) * rows], queries=queries,
                           heads=heads, groups=groups, head_dim=head_dim, index_dim=index_dim, block_size=block_size,
                           topk=topk, scale=scale, index_scale=index_scale, dtype=dtype, index_fp8=index_fp8,
                           local_blocks=local_blocks, rescore_candidates=rescore_candidates, splits=splits, pdl=pdl,
                           scores_config=scores_config, topk_config=topk_config, attention_config=attention_config)
                for w in range(waves)]
            self._side = torch.cuda.Stream(device, priority=torch.cuda.Stream.priority_range()[1])  # the highest
            self.index_fp8, self.rescore_candidates = index_fp8, rescore_candidates
            return
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        index_scale = 1.0 / math.sqrt(index_dim) if index_scale is None else float(index_scale)
        tl = tl_dtype(dtype)
        self.index_fp8 = index_fp8
        if rescore_candidates and not (index_fp8 and rescore_candidates >= topk - local_blocks):
            raise ValueError(f"rescore_candidates ({rescore_candidates}) rank FP8 candidates again: they need FP8 index "
                             f"keys and at least topk - local_blocks = {topk - local_blocks} of them")
        self.rescore_candidates = rescore_candidates
        slots = local_blocks + rescore_candidates if rescore_candidates else topk  # what the top-k kernel keeps
        tuning = dict(self.shape, seq=max_pages * block_size)
        launch = dict(pdl=True) if pdl else {}  # the default builds as they were compiled and run
        scores_config = {**tuned_config("decode_scan_fp8" if index_fp8 else "decode_scan", tuning, {}, device),
                         **launch, **(scores_config or {})}
        topk_config = {**tuned_config("decode_topk", dict(tuning, topk=slots), {}, device), **launch,
                       **(topk_config or {})}
        defaults = attention_defaults(tuning, sm_count(device))
        attention_config = {**tuned_config("decode_attention", tuning, defaults, device), **launch,
                            **(attention_config or {})}
        self.splits = splits or attention_splits(B, queries, groups, head_dim, block_size, topk, device,
                                                 **attention_config)
        self._scores = scan_kernel(n_rows=queries * groups, batch=B, max_pages=max_pages, groups=groups,
                                   index_dim=index_dim, block_size=block_size, index_scale=index_scale, dtype=tl,
                                   fp8=index_fp8, device=device, **scores_config)
        self._topk = topk_kernel(groups=groups, block_size=block_size, topk=slots, max_pages=max_pages,
                                 **({} if local_blocks == 1 else dict(local_blocks=local_blocks)), **topk_config)
        self._attend = attention_kernel(queries=queries, groups=groups, heads=heads, head_dim=head_dim,
                                        block_size=block_size, topk=topk, scale=scale, splits=self.splits, dtype=tl,
                                        **attention_config)
        self._combine = compiled_kernel(decode_combine_program, heads=heads, groups=groups, head_dim=head_dim,
                                        splits=self.splits, dtype=tl, **launch)
        rows, R = queries * groups, heads // groups
        if rescore_candidates:
            self._rescore, self._rescore_select = rescore_kernels(
                groups=groups, index_dim=index_dim, block_size=block_size, topk=topk, candidates=rescore_candidates,
                scale=index_scale, local_blocks=local_blocks, dtype=tl, pdl=pdl)
            self._candidates = torch.empty((B, rows, slots), device=device, dtype=torch.int32)  # [B, S*G, L + c]
            self._rescored = torch.empty((B, rows, rescore_candidates), device=device, dtype=torch.float32)
        self._block_scores = torch.empty((B, rows, max_pages), device=device, dtype=torch.float32)  # [B, S*G, pages]
        self._o_part = torch.empty((B, rows, self.splits, R, head_dim), device=device, dtype=torch.float32)
        self._l_part = torch.empty((B, rows, self.splits, R), device=device, dtype=torch.float32)

    def _stages_only_whole(self):
        if self.waves > 1:
            raise ValueError("a plan in waves runs whole steps only: run()")

    def index_scores(self, q_idx: torch.Tensor, k_idx_pages: torch.Tensor,
                     k_idx_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Block scores [B, S*G, max_pages] fp32 of q_idx [B, S, G, Di] over the index-key pages (and their
        [num_pages, Bk] scales when FP8); the plan's buffer, overwritten by the next call."""
        self._stages_only_whole()
        B, S, G = q_idx.shape[:3]
        if (k_idx_scale is not None) != self.index_fp8:
            raise ValueError("FP8 index keys come with k_idx_scale, bf16 / fp16 ones without; this plan was built for "
                             + ("FP8" if self.index_fp8 else "bf16 / fp16") + " keys")
        scales = () if k_idx_scale is None else (k_idx_scale,)
        self._scores(q_idx.view(B, S * G, -1), k_idx_pages, *scales, self.block_table, self.seqlens,
                     self._block_scores)
        return self._block_scores

    def select(self, block_scores: torch.Tensor, q_idx: torch.Tensor | None = None,
               k_idx_exact: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """indices [B, S, G, topk] int32 (slots 0 .. local_blocks - 1 the newest blocks; into ``out`` if given) from
        :meth:`index_scores`'s scores; a rescoring plan also takes q_idx [B, S, G, Di] and the exact index-key pages
        [num_pages, Bk, Di]."""
        self._stages_only_whole()
        s = self.shape
        B, S, G = s["batch"], s["queries"], s["groups"]
        indices = torch.empty((B, S, G, s["topk"]), device=block_scores.device, dtype=torch.int32) if out is None \
            else out
        if not self.rescore_candidates:
            self._topk(block_scores, self.seqlens, indices.view(B, S * G, -1))
            return indices
        if q_idx is None or k_idx_exact is None:
            raise ValueError("this plan rescores FP8 candidates: select needs q_idx and the exact index keys")
        self._topk(block_scores, self.seqlens, self._candidates)
        self._rescore(q_idx.view(B, S * G, -1), k_idx_exact, self.block_table, self._candidates, self._rescored)
        self._rescore_select(self._candidates, self._rescored, indices.view(B, S * G, -1))
        return indices

    def attend(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, indices: torch.Tensor,
               out: tuple | None = None):
        """o [B, S, Hq, D] (q's dtype), lse [B, S, Hq] fp32 of q over the chosen blocks (into ``out`` = (o, lse) if
        given): split attention, then the LSE combine of the splits."""
        self._stages_only_whole()
        B, S, Hq, D = q.shape
        o, lse = (torch.empty_like(q), torch.empty((B, S, Hq), device=q.device, dtype=torch.float32)) \
            if out is None else out
        self._attend(q, k_pages, v_pages, self.block_table, self.seqlens, indices, self._o_part, self._l_part)
        G = self.shape["groups"]
        self._combine(self._o_part, self._l_part, o.view(B, S * G, Hq // G, D), lse.view(B, S * G, Hq // G))
        return o, lse

    def run(self, q: torch.Tensor, q_idx: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
            k_idx_pages: torch.Tensor, k_idx_scale: torch.Tensor | None = None,
            k_idx_exact: torch.Tensor | None = None):
        """One layer's step: q [B, S, Hq, D], q_idx [B, S, G, Di] and its cache pages (with the index keys' scales
        when FP8, and their exact pages when the plan rescores) -> (o [B, S, Hq, D], lse [B, S, Hq] fp32, indices
        [B, S, G, topk] int32), fresh tensors each call."""
        s = self.shape
        B, S, Hq, D, G = s["batch"], s["queries"], s["heads"], s["head_dim"], s["groups"]
        if q.shape != (B, S, Hq, D) or q_idx.shape != (B, S, G, s["index_dim"]):
            raise ValueError(f"this plan runs q [{B}, {S}, {Hq}, {D}] and q_idx [{B}, {S}, {G}, {s['index_dim']}], "
                             f"got {tuple(q.shape)} and {tuple(q_idx.shape)}")
        if self.waves > 1:
            return self._run_waves(q, q_idx, k_pages, v_pages, k_idx_pages, k_idx_scale, k_idx_exact)
        indices = self.select(self.index_scores(q_idx, k_idx_pages, k_idx_scale), q_idx, k_idx_exact)
        o, lse = self.attend(q, k_pages, v_pages, indices)
        return o, lse, indices

    def _run_waves(self, q, q_idx, k_pages, v_pages, k_idx_pages, k_idx_scale, k_idx_exact):
        """:meth:`run` in waves: scans on the caller's stream, each wave's selection and attention on the side
        stream once its scan has ended; the outputs are allocated on the caller's stream, which waits for the side
        stream before returning (so they, the inputs and the plans' buffers are safe to use and reuse there)."""
        s = self.shape
        B, S, Hq, G = s["batch"], s["queries"], s["heads"], s["groups"]
        o, lse = torch.empty_like(q), torch.empty((B, S, Hq), device=q.device, dtype=torch.float32)
        indices = torch.empty((B, S, G, s["topk"]), device=q.device, dtype=torch.int32)
        main = torch.cuda.current_stream(q.device)
        self._side.wait_stream(main)  # the inputs are ready
        rows = B // self.waves
        for w, plan in enumerate(self._wave_plans):
            part = slice(w * rows, (w + 1) * rows)  # the wave's rows: contiguous views of every [B, ...] tensor
            scores = plan.index_scores(q_idx[part], k_idx_pages, k_idx_scale)
            scanned = torch.cuda.Event()
            scanned.record(main)
            with torch.cuda.stream(self._side):
                self._side.wait_event(scanned)
                plan.select(scores, q_idx[part], k_idx_exact, out=indices[part])
                plan.attend(q[part], k_pages, v_pages, indices[part], out=(o[part], lse[part]))
        main.wait_stream(self._side)
        return o, lse, indices


def decode_trial(stage: str, shape: dict, check_seq: int, fp8: bool = False) -> tuple:
    """(check, timed) of the tuner's trial of one decode kernel, ``stage`` "scores", "topk" or "attention", at
    ``shape`` (seq: the context; batch and queries 1 unless given; FP8 index keys with ``fp8``), random inputs in
    shuffled pages. ``check(config)`` runs a whole step at a context of ``check_seq`` tokens with ``config`` on that
    kernel against the float64 reference: the selection up to bf16 ties, outputs and LSE over the kernel's selection.
    ``timed(config)`` is that kernel alone at ``shape["seq"]``."""
    from msa_tl import reference as R
    from msa_tl.checks import LSE_ATOL, OUTPUT_RTOL, assert_decode_selection_up_to_ties, relative_error
    from msa_tl.ops.cache import MSACache

    B, S = shape.get("batch", 1), shape.get("queries", 1)
    G, Hq, D, Di, Bk, topk = (shape[k] for k in ("groups", "heads", "head_dim", "index_dim", "block_size", "topk"))

    def step_inputs(seq):
        def rand(*dims):
            return torch.randn(*dims, device="cuda", dtype=torch.bfloat16)

        pages = -(-seq // Bk)
        cache = MSACache.paged(B, seq, G, D, Di, page_size=Bk, dtype=torch.bfloat16, device="cuda",
                               index_dtype=torch.float8_e4m3fn if fp8 else None,
                               block_table=torch.randperm(B * pages, device="cuda").view(B, pages).int())
        cache.append(rand(B, seq, G, D), rand(B, seq, G, D), rand(B, seq, Di))
        return cache, rand(B, S, Hq, D), rand(B, S, G, Di)

    def plan_for(cache, config):
        return cache.plan(queries=S, heads=Hq, block_size=Bk, topk=topk, **{f"{stage}_config": config})

    def check(config):
        cache, q, q_idx = step_inputs(check_seq)
        o, lse, idx = plan_for(cache, config).run(q, q_idx, cache.k, cache.v, cache.k_idx, cache.k_idx_scale)
        assert_decode_selection_up_to_ties(idx, q_idx, cache, Bk, topk)
        ref_o, ref_lse, _ = R.msa_decode(q, q_idx, cache.k, cache.v, cache.index_keys(), cache.block_table,
                                         cache.lengths, Bk, topk, indices=idx)
        assert relative_error(o, ref_o) <= OUTPUT_RTOL, "decode output"
        assert (lse.double() - ref_lse).abs().max().item() <= LSE_ATOL, "decode LSE"

    cache, q, q_idx = step_inputs(shape["seq"])
    keys = (cache.k_idx, *(() if cache.k_idx_scale is None else (cache.k_idx_scale,)))

    def timed(config):
        plan = plan_for(cache, config)
        if stage == "scores":
            return lambda: plan.index_scores(q_idx, *keys)
        scores = plan.index_scores(q_idx, *keys).clone()
        if stage == "topk":
            return lambda: plan.select(scores)
        indices = plan.select(scores)
        return lambda: plan.attend(q, cache.k, cache.v, indices)

    return check, timed
