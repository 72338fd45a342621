"""Packed variable-length batches (flash-attn's ``cu_seqlens``) on the fixed-length kernels.

A packed batch holds its documents back to back in one row, ``x [1, total, heads, dim]``, document d being tokens
``cu_seqlens[d] .. cu_seqlens[d + 1] - 1``. MSA runs per document: blocks count from the document's first token,
the forced local block(s) and causality are the document's, and no query sees another document.

The kernels run on a *block-aligned* copy of the row: document d starts at a multiple of ``block_size``, so each
key block (and each query tile of the select kernels, which never spans two key blocks) lies in one document.
In that row the attention kernels need nothing new (a document's selection names only its own blocks, and
causality inside a block is the same); the select kernels start each tile's scan at its document's first block
(``block_start``), which both keeps them inside the document and skips the other documents' keys. The copy is
at most ``num_docs * (block_size - 1)`` tokens longer, a bound known from the shapes alone, so building it
needs no host sync. Rows of the copy that hold no token (each document's tail up to its next block, the row's
end) get no selection (-1 slots): they attend to nothing, add nothing to the KL and receive no gradient.

    cu_seqlens   [num_docs + 1] int32   0 = cu_seqlens[0] <= ... <= cu_seqlens[-1] = total
    indices      [1, total, G, topk]    block ids counted from each query's document start (-1 = unused)
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from msa_tl.ops.validation import distinct_descending

logger = logging.getLogger("msa_tl")


def check_cu_seqlens(cu_seqlens, *, total: int, device: torch.device, max_seqlen=None) -> None:
    """cu_seqlens [num_docs + 1] int32 on ``device`` for a packed row of ``total`` tokens. Its values are read
    only on the CPU (on a GPU that would be a host sync)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor [num_docs + 1] int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [num_docs + 1] with at least one document, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (flash-attn's convention), got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1):
        raise ValueError(f"max_seqlen must be None or a positive int, got {max_seqlen!r}")
    if cu_seqlens.device.type == "cpu":
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {cu_seqlens.tolist()}")
        if max_seqlen is not None and int(lengths.max()) > max_seqlen:
            raise ValueError(f"max_seqlen {max_seqlen} is below the longest document ({int(lengths.max())} tokens)")


def check_packed_batch(batch: int) -> None:
    if batch != 1:
        raise ValueError(f"with cu_seqlens the documents are packed into one row: batch must be 1, got {batch}")


@dataclass
class PackedLayout:
    """Where each packed token sits in the block-aligned row, and each block's document.

    positions:   [total] int64, each token's row in the block-aligned copy
    first_block: [total] int32, the block-aligned row's first block of each token's document
    own_block:   [total] int64, each token's block counted from its document's first token
    block_start: [1, length // block_size] int32, the first block of each block's document (its own id past the
                 last document), the select kernels' ``block_start``
    real:        [length] bool, rows of the copy that hold a token
    length:      rows of the copy (a multiple of ``block_size``)
    """

    positions: torch.Tensor
    first_block: torch.Tensor
    own_block: torch.Tensor
    block_start: torch.Tensor
    real: torch.Tensor
    length: int
    block_size: int

    def pack(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """x [1, total, ...] -> [1, length, ...], rows with no token set to ``fill`` (differentiable)."""
        out = x.new_full((1, self.length, *x.shape[2:]), fill)
        return out.index_copy(1, self.positions, x)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, length, ...] -> the packed tokens' rows [1, total, ...] (differentiable)."""
        return x.index_select(1, self.positions)

    def to_aligned(self, indices: torch.Tensor) -> torch.Tensor:
        """Document-relative ids [1, total, G, topk] -> the block-aligned row's ids [1, length, G, topk] in the
        form the kernels take (:func:`~msa_tl.ops.validation.canonical_indices`): ids a query cannot see (before
        its document, in its future, repeats) become -1, and so does every slot of a row with no token."""
        visible = (indices >= 0) & (indices <= self.own_block.view(1, -1, 1, 1))
        ids = distinct_descending(torch.where(visible, indices + self.first_block.view(1, -1, 1, 1), -1))
        return self.pack(ids.to(torch.int32), fill=-1)

    def from_aligned(self, indices: torch.Tensor) -> torch.Tensor:
        """The block-aligned row's ids [1, length, G, topk] -> document-relative ids [1, total, G, topk]."""
        ids = self.unpack(indices)
        return torch.where(ids >= 0, ids - self.first_block.view(1, -1, 1, 1), -1).to(torch.int32)

    def only_real(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [1, length, G, topk] with every slot of a row that holds no token set to -1."""
        return torch.where(self.real.view(1, -1, 1, 1), indices, -1)

    def causal_selection(self, groups: int, max_seqlen: int) -> torch.Tensor:
        """Every block each query sees in its document (dense causal attention per document), in the
        block-aligned row: [1, length, G, width] int32, -1 past each query's block and for rows with no token.
        ``width``, ceil(max_seqlen / block_size) rounded up to a power of two, changes rarely from batch to batch
        (each width is a compile of the KL kernels; the extra -1 slots cost nothing)."""
        width = 1 << max(0, math.ceil(max_seqlen / self.block_size) - 1).bit_length()
        blocks = torch.arange(width, device=self.own_block.device)[None, :]
        ids = torch.where(blocks <= self.own_block[:, None], blocks + self.first_block[:, None].long(), -1)
        ids = ids[None, :, None, :].expand(1, -1, groups, width).to(torch.int32)
        return self.pack(ids, fill=-1)


def packed_layout(cu_seqlens: torch.Tensor, total: int, block_size: int) -> PackedLayout:
    """The block-aligned copy of a packed row of ``total`` tokens (documents ``cu_seqlens``), built on
    cu_seqlens' device with no host sync."""
    device = cu_seqlens.device
    num_docs = cu_seqlens.numel() - 1
    length = math.ceil((total + num_docs * (block_size - 1)) / block_size) * block_size
    cu = cu_seqlens.long()
    doc_blocks = torch.div(cu[1:] - cu[:-1] + block_size - 1, block_size, rounding_mode="floor")  # [num_docs]
    doc_first = torch.cumsum(doc_blocks, 0) - doc_blocks  # each document's first block in the aligned row
    token = torch.arange(total, device=device)
    doc = torch.searchsorted(cu[1:], token, right=True)  # [total] each token's document
    first_block = doc_first[doc]
    in_document = token - cu[doc]
    positions = first_block * block_size + in_document
    blocks = torch.arange(length // block_size, device=device)
    block_doc = (torch.searchsorted(doc_first, blocks, right=True) - 1).clamp(min=0)
    used_blocks = doc_blocks.sum()
    block_start = torch.where(blocks < used_blocks, doc_first[block_doc], blocks)
    real = torch.zeros(length, dtype=torch.bool, device=device).index_fill(0, positions, True)
    return PackedLayout(positions, first_block.to(torch.int32), in_document // block_size,
                        block_start.to(torch.int32).view(1, -1), real, length, block_size)


def checked_layout(cu_seqlens, *, batch: int, total: int, device: torch.device, block_size: int,
                   max_seqlen=None) -> PackedLayout:
    """The block-aligned layout of a packed call's inputs ([batch = 1, total, ...] on ``device``), after checking
    ``cu_seqlens`` (and ``max_seqlen``) against them."""
    check_packed_batch(batch)
    check_cu_seqlens(cu_seqlens, total=total, device=device, max_seqlen=max_seqlen)
    return packed_layout(cu_seqlens, total, block_size)


def max_document_length(cu_seqlens: torch.Tensor) -> int:
    """The longest document (a host sync on a GPU: pass ``max_seqlen`` to avoid it, as in flash-attn)."""
    return max(1, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))


def varlen_lse_available() -> bool:
    """Whether :func:`dense_packed` can give the lse (FlashAttention's varlen kernel, torch >= 2.9)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def dense_packed(q, k, v, cu_seqlens, max_seqlen, scale, *, return_lse: bool = False, cu_seqlens_k=None,
                 max_seqlen_k=None):
    """Dense causal GQA attention of each packed document on its own: q [1, total, Hq, D], k / v [1, total, G, D]
    -> o [1, total, Hq, D] (and with ``return_lse`` lse [1, total, Hq] float32, GPU only). FlashAttention's varlen
    kernel on the GPU; SDPA a document at a time on the CPU.

    ``cu_seqlens_k`` / ``max_seqlen_k``: the keys' own documents, when a document's queries are its last tokens
    only (k / v [1, total_k, G, D]): causality is then aligned at the end, query i of a document of Lq queries and
    Lk keys seeing its keys 0 .. Lk - Lq + i (flash-attn's convention)."""
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        varlen_attn = None
        if q.is_cuda:
            logger.warning("msa_tl: dense attention over packed documents runs SDPA a document at a time (torch %s "
                           "has no torch.nn.attention.varlen)", torch.__version__)
    if q.is_cuda and varlen_attn is not None:
        # older torch releases spell causal is_causal=True and have no enable_gqa
        options = inspect.signature(varlen_attn).parameters
        causal = dict(window_size=(-1, 0)) if "window_size" in options else dict(is_causal=True)
        if "enable_gqa" in options:
            causal["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for x in (k, v))
        if return_lse:
            from torch.nn.attention.varlen import AuxRequest

            causal["return_aux"] = AuxRequest(lse=True)
        out = varlen_attn(q[0], k[0], v[0], cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, scale=scale,
                          **causal)
        if not return_lse:
            return out[None]
        o, lse = out
        lse = lse if lse.shape[0] == q.shape[1] else lse.transpose(0, 1)  # [total, Hq]
        return o[None], lse.float()[None].contiguous()
    if return_lse:
        raise ValueError("dense_packed gives the lse only through FlashAttention's varlen kernel (a GPU, torch >= 2.9)")
    docs = []
    for a, b, a_k, b_k in zip(*(bounds.tolist() for bounds in (cu_seqlens[:-1], cu_seqlens[1:], cu_seqlens_k[:-1],
                                                                 cu_seqlens_k[1:]))):
        if b == a:
            continue
        last = torch.arange(b_k - a_k - (b - a), b_k - a_k, device=q.device)  # each query's last visible key
        visible = torch.arange(b_k - a_k, device=q.device)[None, :] <= last[:, None]
        docs.append(F.scaled_dot_product_attention(q[:, a:b].transpose(1, 2), k[:, a_k:b_k].transpose(1, 2),
                                                   v[:, a_k:b_k].transpose(1, 2), attn_mask=visible, scale=scale,
                                                   enable_gqa=True).transpose(1, 2))
    return torch.cat(docs, dim=1)
