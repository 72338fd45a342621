"""The functional MSA API on ``[batch, seq, heads, dim]`` tensors.

Each function validates its inputs, resolves default scales and calls the stage's custom op
(:mod:`msa_tl.ops.custom_ops`). The op runs the TileLang kernel where one is registered for the
device (:mod:`msa_tl.ops.dispatch`), otherwise the float64 reference cast back to the input dtype
(LSE and the loss stay float32). The ops carry their own backward and trace under ``torch.compile``.
"""

from __future__ import annotations

import math

import torch

from msa_tl import reference
from msa_tl.ops.cache import MSACache, default_candidates
from msa_tl.ops.custom_ops import kl_alignment_loss_op, select_blocks_op, sparse_attention_op
from msa_tl.ops.dispatch import kernel_for
from msa_tl.ops.varlen import checked_layout, dense_packed, max_document_length, varlen_lse_available
from msa_tl.ops.validation import (
    canonical_indices,
    check_attention_inputs,
    check_decode_inputs,
    check_index_inputs,
    check_indices,
    check_lse,
    check_options,
    check_query_start,
)


def _default_scale(scale: float | None, dim: int) -> float:
    return 1.0 / math.sqrt(dim) if scale is None else float(scale)


def select_blocks(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    *,
    block_size: int = 128,
    topk: int = 16,
    index_scale: float | None = None,
    local_blocks: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    index_fp8: bool = False,
    query_start: int = 0,
) -> torch.Tensor:
    """The index branch: which key blocks each (query, group) attends to.

    Args:
        q_idx: [B, N, G, Di] index queries, one head per KV group.
        k_idx: [B, N, Di] (or [B, N, 1, Di]) index keys, shared by all groups.
        block_size: key block size Bk.
        topk: blocks chosen per (query, group), the local blocks included.
        index_scale: score scale, default 1/sqrt(Di).
        local_blocks: the newest visible blocks every query is given (its own block t // Bk and the
            ``local_blocks - 1`` before it; MiniMax-M3's ``index_local_blocks``); the rest are ranked.
        cu_seqlens: [num_docs + 1] int32, documents packed into one row (B = 1; flash-attn's convention): each
            query selects within its document, block ids counting from the document's first token
            (:mod:`msa_tl.ops.varlen`).
        index_fp8: score with FP8 (e4m3) operands, each q_idx / k_idx row quantised with its own scale (twice the
            tensor-core rate of bf16; the selection is that of the quantised values, close to but not the bf16 one).
        query_start: the position of q_idx's first query. q_idx [B, C, G, Di] then holds queries
            ``query_start .. query_start + C - 1`` and k_idx [B, query_start + C, Di] the tokens up to the last of
            them (a chunk of a longer sequence: chunked prefill, context parallelism). Not with ``cu_seqlens``.

    Returns:
        indices [B, N, G, topk] int32: chosen block ids, -1 in unused slots
        (query t sees t // Bk + 1 blocks; with fewer than topk all are chosen).
        Slot order is not part of the contract.
    """
    check_options(block_size=block_size, topk=topk, local_blocks=local_blocks, index_scale=index_scale)
    _check_offset(query_start, cu_seqlens)
    k_idx = check_index_inputs(q_idx, k_idx, query_start=query_start)
    index_scale = _default_scale(index_scale, q_idx.shape[3])
    if cu_seqlens is None:
        return select_blocks_op(q_idx, k_idx, block_size, topk, index_scale, local_blocks, None, index_fp8, query_start)
    layout = checked_layout(cu_seqlens, batch=q_idx.shape[0], total=q_idx.shape[1], device=q_idx.device,
                            block_size=block_size)
    return layout.from_aligned(_select_aligned(layout, q_idx, k_idx, topk, index_scale, local_blocks, index_fp8))


def _check_offset(query_start, cu_seqlens) -> None:
    check_query_start(query_start)
    if query_start and cu_seqlens is not None:
        raise ValueError("query_start and cu_seqlens do not mix: packed documents start at their own offsets")


def _select_aligned(layout, q_idx, k_idx, topk, index_scale, local_blocks, index_fp8=False):
    """The selection in the block-aligned row of ``layout`` from packed q_idx / k_idx [1, total, ...]: [1, length,
    G, topk], -1 in rows with no token."""
    indices = select_blocks_op(layout.pack(q_idx), layout.pack(k_idx), layout.block_size, topk, index_scale,
                               local_blocks, layout.block_start, index_fp8)
    return layout.only_real(indices)


def _attend_aligned(layout, q, k, v, aligned, block_size, scale):
    """(o [1, total, Hq, D], lse [1, total, Hq]) of packed q / k / v [1, total, ...] over ``aligned`` indices of the
    block-aligned row (canonical, -1 in rows with no token)."""
    o, lse = _sparse_attention(layout.pack(q), layout.pack(k), layout.pack(v), aligned, block_size, scale,
                               return_lse=True)
    return layout.unpack(o), layout.unpack(lse)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    return_lse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    query_start: int = 0,
):
    """The main branch: exact causal attention over the chosen key blocks.

    Args:
        q: [B, N, Hq, D]; k, v: [B, N, G, D] with Hq a multiple of G (head h uses group h // (Hq / G)).
        indices: [B, N, G, topk] int32 block ids from :func:`select_blocks` (-1 = unused slot). Any ids
            are safe: each query attends to the set of its chosen blocks it can see (ids in its future or
            past the last block are ignored, repeats count once; :func:`canonical_indices`). A query with
            no visible block gets o = 0 and lse = -inf.
        block_size: key block size Bk the indices refer to.
        scale: softmax scale, default 1/sqrt(D).
        return_lse: also return the log-sum-exp.
        cu_seqlens: [num_docs + 1] int32, documents packed into one row (B = 1): ``indices`` count blocks from
            each query's document start, and a query sees only its own document.
        query_start: the position of q's first query: q and indices hold C queries from there, k and v the
            ``query_start + C`` tokens up to the last of them (:func:`select_blocks`).

    Returns:
        o [B, N, Hq, D] in q's dtype, and lse [B, N, Hq] float32 (natural log) if ``return_lse``.
    """
    check_options(block_size=block_size, scale=scale)
    _check_offset(query_start, cu_seqlens)
    check_attention_inputs(q, k, v, query_start)
    B, N, _, _ = q.shape
    check_indices(indices, batch=B, seq=N, groups=k.shape[2], device=q.device)
    if cu_seqlens is None:
        return _sparse_attention(q, k, v, canonical_indices(indices, block_size, query_start), block_size, scale,
                                 return_lse, query_start)
    layout = checked_layout(cu_seqlens, batch=B, total=N, device=q.device, block_size=block_size)
    o, lse = _attend_aligned(layout, q, k, v, layout.to_aligned(indices), block_size, scale)
    return (o, lse) if return_lse else o


def _sparse_attention(q, k, v, indices, block_size, scale, return_lse, query_start=0):
    """:func:`sparse_attention` on checked inputs and canonical indices (the index kernels' own selection)."""
    o, lse = sparse_attention_op(q, k, v, indices, block_size, _default_scale(scale, q.shape[3]), query_start)
    return (o, lse) if return_lse else o


def kl_alignment_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    indices: torch.Tensor | None,
    *,
    block_size: int = 128,
    scale: float | None = None,
    index_scale: float | None = None,
    lse: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    query_start: int = 0,
) -> torch.Tensor:
    """KL(teacher || student) that trains the index projections; a float32 scalar.

    Teacher: the main branch's attention probabilities over the chosen tokens,
    averaged over each group's Hq / G heads, detached. Student: softmax of the
    index scores over the same tokens. Averaged over queries and groups.
    ``indices`` None means all causally visible tokens (warmup). Gradients
    reach q_idx and k_idx only. Shapes as in :func:`msa_attention`.

    ``lse`` [B, N, Hq] float32: the main branch's lse for these q, k and indices
    (``sparse_attention(..., return_lse=True)``). Passing it saves the kernels a
    main-branch forward; it must come from the same selection, since it is the
    teacher's normaliser. Its gradient is not taken.

    ``cu_seqlens`` [num_docs + 1] int32: documents packed into one row (B = 1), ``indices`` counting blocks from
    each query's document start; the teacher and the student see only the query's document, and the loss is the
    mean over all packed rows. ``max_seqlen`` (the longest document) sizes the warmup's selection; without it a
    GPU run reads it back (a host sync).

    ``query_start``: the position of the first query, as in :func:`sparse_attention` (q, q_idx, indices and lse
    hold C queries from there; k and k_idx the tokens up to the last of them); the loss is the mean over those C
    queries.
    """
    check_options(block_size=block_size, scale=scale, index_scale=index_scale)
    _check_offset(query_start, cu_seqlens)
    check_attention_inputs(q, k, k, query_start)
    B, N = q.shape[:2]
    k_idx = check_index_inputs(q_idx, k_idx, batch=B, seq=N, groups=k.shape[2], like=q, query_start=query_start)
    if indices is not None:
        check_indices(indices, batch=B, seq=N, groups=k.shape[2], device=q.device)
    if lse is not None:
        check_lse(lse, shape=q.shape[:3], device=q.device)
    if cu_seqlens is None:
        indices = None if indices is None else canonical_indices(indices, block_size, query_start)
        return _kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse, query_start)
    layout = checked_layout(cu_seqlens, batch=B, total=N, device=q.device, block_size=block_size,
                            max_seqlen=max_seqlen)
    if indices is None:
        max_seqlen = max_seqlen or max_document_length(cu_seqlens)
        aligned = layout.causal_selection(k.shape[2], max_seqlen)
        if lse is None and q.is_cuda and varlen_lse_available():
            lse = _dense_lse(q, k, cu_seqlens, max_seqlen, scale)
    else:
        aligned = layout.to_aligned(indices)
    return _kl_aligned(layout, q, k, q_idx, k_idx, aligned, block_size, scale, index_scale, lse)


def _dense_lse(q, k, cu_seqlens, max_seqlen, scale):
    """The warmup teacher's normaliser, the lse [1, total, Hq] of dense causal attention per document, from
    FlashAttention's varlen kernel (the KL kernels would otherwise recompute it over every visible block)."""
    with torch.no_grad():
        return dense_packed(q, k, k, cu_seqlens, max_seqlen, _default_scale(scale, q.shape[3]), return_lse=True)[1]


def _kl_aligned(layout, q, k, q_idx, k_idx, aligned, block_size, scale, index_scale, lse):
    """The KL of packed inputs [1, total, ...] over ``aligned`` indices of the block-aligned row (-1 in rows with
    no token, which add 0): the aligned row's mean rescaled to the mean over the packed rows."""
    loss = _kl_alignment_loss(layout.pack(q), layout.pack(k), layout.pack(q_idx), layout.pack(k_idx), aligned,
                              block_size, scale, index_scale, None if lse is None else layout.pack(lse))
    return loss * (layout.length / q.shape[1])


def _kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse, query_start=0):
    """:func:`kl_alignment_loss` on checked inputs and canonical indices (or None)."""
    q, k = q.detach(), k.detach()  # the teacher takes no gradient: the KL's graph holds the index branch alone
    if lse is not None:
        lse = lse.detach()
    # when the gradients will be wanted, the forward's pass computes them with the value (one pass, not two)
    with_grads = torch.is_grad_enabled() and (q_idx.requires_grad or k_idx.requires_grad)
    loss, *_ = kl_alignment_loss_op(q, k, q_idx, k_idx, indices, lse, block_size, _default_scale(scale, q.shape[3]),
                                    _default_scale(index_scale, q_idx.shape[3]), with_grads, query_start)
    return loss


def msa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    *,
    block_size: int = 128,
    topk: int = 16,
    scale: float | None = None,
    index_scale: float | None = None,
    return_lse: bool = False,
    return_indices: bool = False,
    local_blocks: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    index_fp8: bool = False,
    query_start: int = 0,
):
    """MiniMax Sparse Attention: the index branch picks key blocks, the main branch attends over them.

    Args:
        q: [B, N, Hq, D] queries.
        k, v: [B, N, G, D] keys and values, G = KV heads = groups; Hq % G == 0.
        q_idx: [B, N, G, Di] index queries (one head per group).
        k_idx: [B, N, Di] (or [B, N, 1, Di]) index keys.
        block_size: key block size Bk (default 128).
        topk: blocks per (query, group), the local block included (default 16).
        scale: main-branch softmax scale, default 1/sqrt(D).
        index_scale: index-score scale, default 1/sqrt(Di).
        return_lse: also return lse [B, N, Hq] float32.
        return_indices: also return the selection [B, N, G, topk] int32 (-1 = unused).
        local_blocks: the newest visible blocks every query is given (:func:`select_blocks`).
        cu_seqlens: [num_docs + 1] int32, documents packed into one row (B = 1, flash-attn's convention): each
            document is attended on its own (blocks counted from its first token, causal within it); the
            returned indices count blocks from each query's document start.
        index_fp8: select with FP8 index scores (:func:`select_blocks`).
        query_start: the position of the first query: q and q_idx hold C queries from there, k, v and k_idx the
            ``query_start + C`` tokens up to the last of them (:func:`select_blocks`).

    Returns:
        o [B, N, Hq, D] in q's dtype; with ``return_lse`` / ``return_indices``
        the tuple (o, lse?, indices?) in that order.

    Inputs must be contiguous and share device and dtype (bf16/fp16 on CUDA;
    any float dtype on CPU, where the float64 reference runs). The selection
    is not differentiable: q_idx / k_idx get gradients only through
    :func:`kl_alignment_loss`.
    """
    check_options(block_size=block_size, topk=topk, local_blocks=local_blocks, scale=scale, index_scale=index_scale)
    _check_offset(query_start, cu_seqlens)
    check_attention_inputs(q, k, v, query_start)
    k_idx = check_index_inputs(q_idx, k_idx, batch=q.shape[0], seq=q.shape[1], groups=k.shape[2], like=q,
                               query_start=query_start)
    if cu_seqlens is None:
        with torch.no_grad():
            indices = select_blocks(q_idx, k_idx, block_size=block_size, topk=topk, index_scale=index_scale,
                                    local_blocks=local_blocks, index_fp8=index_fp8, query_start=query_start)
        o, lse = _sparse_attention(q, k, v, indices, block_size, scale, True, query_start)
    else:
        layout = checked_layout(cu_seqlens, batch=q.shape[0], total=q.shape[1], device=q.device,
                                block_size=block_size)
        with torch.no_grad():
            aligned = _select_aligned(layout, q_idx, k_idx, topk, _default_scale(index_scale, q_idx.shape[3]),
                                      local_blocks, index_fp8)
        o, lse = _attend_aligned(layout, q, k, v, aligned, block_size, scale)
        indices = layout.from_aligned(aligned)
    extras = ([lse] if return_lse else []) + ([indices] if return_indices else [])
    return (o, *extras) if extras else o


def msa_decode(
    q: torch.Tensor,
    q_idx: torch.Tensor,
    cache: MSACache,
    *,
    block_size: int = 128,
    topk: int = 16,
    scale: float | None = None,
    index_scale: float | None = None,
    return_lse: bool = False,
    return_indices: bool = False,
    local_blocks: int = 1,
):
    """MSA for the newest tokens of each cached sequence: decode (S = 1), speculative drafts or multi-token
    prediction (S = 2-16) and chunked prefill (S up to a few hundred).

    Args:
        q: [B, S, Hq, D] queries of each row's last S cached tokens (append their k, v, k_idx to ``cache`` first:
            :meth:`~msa_tl.ops.cache.MSACache.append`).
        q_idx: [B, S, G, Di] index queries of the same tokens.
        cache: the layer's :class:`~msa_tl.ops.cache.MSACache`; row b holds ``cache.lengths[b] >= S`` tokens.
        block_size, topk, scale, index_scale, local_blocks: as in :func:`msa_attention`.
        return_lse: also return lse [B, S, Hq] float32.
        return_indices: also return the selection [B, S, G, topk] int32.

    Returns:
        o [B, S, Hq, D] in q's dtype, equal to the rows of :func:`msa_attention` over each row's first
        ``cache.lengths[b]`` tokens at its last S positions; with ``return_lse`` / ``return_indices`` the tuple
        (o, lse?, indices?). With FP8 index keys (``MSACache.paged(..., index_dtype=torch.float8_e4m3fn)``) the
        selection scores the dequantised keys against q_idx quantised per row the same way; a cache made with
        ``rescore=True`` then ranks the FP8 stage's best ``2 (topk - local_blocks)`` blocks again by the exact
        keys' scores (:mod:`msa_tl.decode.rescore`).
    """
    check_options(block_size=block_size, topk=topk, local_blocks=local_blocks, scale=scale, index_scale=index_scale)
    check_decode_inputs(q, q_idx, cache)
    scale, index_scale = _default_scale(scale, q.shape[3]), _default_scale(index_scale, q_idx.shape[3])
    kernel = kernel_for("msa_decode", q.device, dtype=q.dtype, heads=q.shape[2], groups=cache.k.shape[2],
                        head_dim=q.shape[3], index_dim=q_idx.shape[3], block_size=block_size, topk=topk,
                        page_size=cache.page_size, queries=q.shape[1])
    if kernel is not None:
        o, lse, indices = kernel(q, q_idx, cache, block_size=block_size, topk=topk, scale=scale,
                                 index_scale=index_scale, local_blocks=local_blocks)
    else:
        q_idx_ref = reference.fake_quantize_fp8(q_idx) if cache.index_fp8 else q_idx
        rescore = {}
        if cache.rescore:
            rescore = dict(rescore_queries=q_idx, rescore_keys=cache.k_idx_exact,
                           candidates=default_candidates(topk, local_blocks))
        o, lse, indices = reference.msa_decode(q, q_idx_ref, cache.k, cache.v, cache.index_keys(), cache.block_table,
                                               cache.lengths, block_size, topk, scale, index_scale,
                                               local_blocks=local_blocks, **rescore)
        o, lse = o.to(q.dtype), lse.float()
    extras = ([lse] if return_lse else []) + ([indices] if return_indices else [])
    return (o, *extras) if extras else o
