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
from msa_tl.ops.cache import MSACache
from msa_tl.ops.custom_ops import kl_alignment_loss_op, select_blocks_op, sparse_attention_op
from msa_tl.ops.dispatch import kernel_for
from msa_tl.ops.validation import (
    canonical_indices,
    check_attention_inputs,
    check_decode_inputs,
    check_index_inputs,
    check_indices,
    check_lse,
    check_options,
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
) -> torch.Tensor:
    """The index branch: which key blocks each (query, group) attends to.

    Args:
        q_idx: [B, N, G, Di] index queries, one head per KV group.
        k_idx: [B, N, Di] (or [B, N, 1, Di]) index keys, shared by all groups.
        block_size: key block size Bk.
        topk: blocks chosen per (query, group), the local block included.
        index_scale: score scale, default 1/sqrt(Di).

    Returns:
        indices [B, N, G, topk] int32: chosen block ids, -1 in unused slots
        (query t sees t // Bk + 1 blocks; with fewer than topk all are chosen).
        Slot order is not part of the contract.
    """
    check_options(block_size=block_size, topk=topk, index_scale=index_scale)
    k_idx = check_index_inputs(q_idx, k_idx)
    return select_blocks_op(q_idx, k_idx, block_size, topk, _default_scale(index_scale, q_idx.shape[3]))


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    return_lse: bool = False,
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

    Returns:
        o [B, N, Hq, D] in q's dtype, and lse [B, N, Hq] float32 (natural log) if ``return_lse``.
    """
    check_options(block_size=block_size, scale=scale)
    check_attention_inputs(q, k, v)
    B, N, _, _ = q.shape
    check_indices(indices, batch=B, seq=N, groups=k.shape[2], device=q.device)
    return _sparse_attention(q, k, v, canonical_indices(indices, block_size), block_size, scale, return_lse)


def _sparse_attention(q, k, v, indices, block_size, scale, return_lse):
    """:func:`sparse_attention` on checked inputs and canonical indices (the index kernels' own selection)."""
    o, lse = sparse_attention_op(q, k, v, indices, block_size, _default_scale(scale, q.shape[3]))
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
    """
    check_options(block_size=block_size, scale=scale, index_scale=index_scale)
    check_attention_inputs(q, k, k)
    k_idx = check_index_inputs(q_idx, k_idx, batch=q.shape[0], seq=q.shape[1], groups=k.shape[2], like=q)
    if indices is not None:
        check_indices(indices, batch=q.shape[0], seq=q.shape[1], groups=k.shape[2], device=q.device)
        indices = canonical_indices(indices, block_size)
    if lse is not None:
        check_lse(lse, shape=q.shape[:3], device=q.device)
    return _kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse)


def _kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse):
    """:func:`kl_alignment_loss` on checked inputs and canonical indices (or None)."""
    if lse is not None:
        lse = lse.detach()
    # when the gradients will be wanted, the forward's pass computes them with the value (one pass, not two)
    with_grads = torch.is_grad_enabled() and (q_idx.requires_grad or k_idx.requires_grad)
    loss, *_ = kl_alignment_loss_op(q, k, q_idx, k_idx, indices, lse, block_size, _default_scale(scale, q.shape[3]),
                                    _default_scale(index_scale, q_idx.shape[3]), with_grads)
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

    Returns:
        o [B, N, Hq, D] in q's dtype; with ``return_lse`` / ``return_indices``
        the tuple (o, lse?, indices?) in that order.

    Inputs must be contiguous and share device and dtype (bf16/fp16 on CUDA;
    any float dtype on CPU, where the float64 reference runs). The selection
    is not differentiable: q_idx / k_idx get gradients only through
    :func:`kl_alignment_loss`.
    """
    check_options(block_size=block_size, topk=topk, scale=scale, index_scale=index_scale)
    check_attention_inputs(q, k, v)
    k_idx = check_index_inputs(q_idx, k_idx, batch=q.shape[0], seq=q.shape[1], groups=k.shape[2], like=q)
    with torch.no_grad():
        indices = select_blocks(q_idx, k_idx, block_size=block_size, topk=topk, index_scale=index_scale)
    o, lse = _sparse_attention(q, k, v, indices, block_size, scale, return_lse=True)
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
):
    """MSA for the newest tokens of each cached sequence: decode (S = 1), speculative drafts or multi-token
    prediction (S = 2-16) and chunked prefill (S up to a few hundred).

    Args:
        q: [B, S, Hq, D] queries of each row's last S cached tokens (append their k, v, k_idx to ``cache`` first:
            :meth:`~msa_tl.ops.cache.MSACache.append`).
        q_idx: [B, S, G, Di] index queries of the same tokens.
        cache: the layer's :class:`~msa_tl.ops.cache.MSACache`; row b holds ``cache.lengths[b] >= S`` tokens.
        block_size, topk, scale, index_scale: as in :func:`msa_attention`.
        return_lse: also return lse [B, S, Hq] float32.
        return_indices: also return the selection [B, S, G, topk] int32.

    Returns:
        o [B, S, Hq, D] in q's dtype, equal to the rows of :func:`msa_attention` over each row's first
        ``cache.lengths[b]`` tokens at its last S positions; with ``return_lse`` / ``return_indices`` the tuple
        (o, lse?, indices?). With FP8 index keys (``MSACache.paged(..., index_dtype=torch.float8_e4m3fn)``) the
        selection scores the dequantised keys against q_idx quantised per row the same way.
    """
    check_options(block_size=block_size, topk=topk, scale=scale, index_scale=index_scale)
    check_decode_inputs(q, q_idx, cache)
    scale, index_scale = _default_scale(scale, q.shape[3]), _default_scale(index_scale, q_idx.shape[3])
    kernel = kernel_for("msa_decode", q.device, dtype=q.dtype, heads=q.shape[2], groups=cache.k.shape[2],
                        head_dim=q.shape[3], index_dim=q_idx.shape[3], block_size=block_size, topk=topk,
                        page_size=cache.page_size, queries=q.shape[1])
    if kernel is not None:
        o, lse, indices = kernel(q, q_idx, cache, block_size=block_size, topk=topk, scale=scale,
                                 index_scale=index_scale)
    else:
        q_idx_ref = reference.fake_quantize_fp8(q_idx) if cache.index_fp8 else q_idx
        o, lse, indices = reference.msa_decode(q, q_idx_ref, cache.k, cache.v, cache.index_keys(), cache.block_table,
                                               cache.lengths, block_size, topk, scale, index_scale)
        o, lse = o.to(q.dtype), lse.float()
    extras = ([lse] if return_lse else []) + ([indices] if return_indices else [])
    return (o, *extras) if extras else o
