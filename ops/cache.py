"""One layer's KV cache for MSA decode: K, V and the index keys in pages, as vLLM and FlashAttention's
``flash_attn_with_kvcache`` lay them out.

    k, v         [num_pages, page_size, G, D]   main-branch keys / values
    k_idx        [num_pages, page_size, Di]     index keys (one head shared by the G groups)
    block_table  [B, max_pages] int32           the pages of each batch row, in token order
    seqlens      [B] int32                      tokens cached per row (device copy, for the kernels)

Token ``t`` of row ``b`` lives at ``(block_table[b, t // page_size], t % page_size)``. A page of 128 tokens is one
MSA block (the default, as MiniMax's inference kernels use); 64 works as well. :meth:`MSACache.contiguous` is the
page-table-free layout seen as pages (``block_table[b, i] = b * pages_per_row + i``, so ``cache.k.view(B, -1, G, D)``
is the [B, max_seq rounded up to pages, G, D] tensor).

The cache keeps each row's length on the host as well (it changes only through :meth:`MSACache.append`, which
adds the same number of tokens to every row), so appends check their capacity with no device sync.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


class MSACache:
    """A paged K / V / index-key cache for one MSA layer (see the module docstring for the layout)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, k_idx: torch.Tensor, block_table: torch.Tensor,
                 lengths: Sequence[int]):
        if k.dim() != 4 or v.shape != k.shape:
            raise ValueError(f"k and v must both be [num_pages, page_size, G, D], got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        if k_idx.dim() != 3 or k_idx.shape[:2] != k.shape[:2]:
            raise ValueError(f"k_idx must be [num_pages, page_size, Di] with k's pages, got {tuple(k_idx.shape)}")
        if len({k.dtype, v.dtype, k_idx.dtype}) != 1 or len({k.device, v.device, k_idx.device}) != 1:
            raise ValueError("k, v and k_idx must share a dtype and a device")
        if block_table.dim() != 2 or block_table.dtype != torch.int32 or block_table.device != k.device:
            raise ValueError(f"block_table must be [B, max_pages] int32 on {k.device}, got {tuple(block_table.shape)} "
                             f"{block_table.dtype} on {block_table.device}")
        lengths = [int(n) for n in lengths]
        if len(lengths) != block_table.shape[0] or min(lengths, default=0) < 0:
            raise ValueError(f"lengths must give each of the {block_table.shape[0]} rows a length >= 0, got {lengths}")
        self.k, self.v, self.k_idx, self.block_table = k, v, k_idx, block_table
        self.lengths = lengths  # host copy of seqlens
        self.seqlens = torch.tensor(lengths, dtype=torch.int32, device=k.device)
        if max(lengths, default=0) > self.capacity:
            raise ValueError(f"a row of {max(lengths)} tokens exceeds the {self.capacity} its pages hold")

    @classmethod
    def paged(cls, batch: int, max_seq: int, groups: int, head_dim: int, index_dim: int, *, page_size: int = 128,
              num_pages: int | None = None, block_table: torch.Tensor | None = None, dtype=torch.bfloat16,
              device=None) -> "MSACache":
        """An empty cache of ``num_pages`` pages (default: enough for ``batch`` rows of ``max_seq`` tokens), rows
        given pages in order unless ``block_table`` [batch, ceil(max_seq / page_size)] int32 says otherwise."""
        per_row = math.ceil(max_seq / page_size)
        num_pages = batch * per_row if num_pages is None else num_pages
        if block_table is None:
            if num_pages < batch * per_row:
                raise ValueError(f"{num_pages} pages cannot hold {batch} rows of {max_seq} tokens; pass a block_table")
            block_table = torch.arange(batch * per_row, dtype=torch.int32, device=device).view(batch, per_row)
        elif block_table.numel() and (int(block_table.min()) < 0 or int(block_table.max()) >= num_pages):
            raise ValueError(f"block_table holds page ids outside [0, {num_pages})")
        k = torch.zeros((num_pages, page_size, groups, head_dim), dtype=dtype, device=device)
        k_idx = torch.zeros((num_pages, page_size, index_dim), dtype=dtype, device=device)
        return cls(k, torch.zeros_like(k), k_idx, block_table.to(device), [0] * batch)

    @classmethod
    def contiguous(cls, batch: int, max_seq: int, groups: int, head_dim: int, index_dim: int, *,
                   page_size: int = 128, dtype=torch.bfloat16, device=None) -> "MSACache":
        """The contiguous layout: each row's pages in order, so ``k.view(batch, -1, G, D)[b]`` holds row b."""
        return cls.paged(batch, max_seq, groups, head_dim, index_dim, page_size=page_size, dtype=dtype, device=device)

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        """Tokens each row's pages hold."""
        return self.block_table.shape[1] * self.page_size

    def append(self, k: torch.Tensor, v: torch.Tensor, k_idx: torch.Tensor) -> None:
        """Write S new tokens to every row: k, v [B, S, G, D], k_idx [B, S, Di] (or [B, S, 1, Di]) go to positions
        ``lengths[b] .. lengths[b] + S - 1``; the lengths grow by S. No device sync."""
        B, S = k.shape[:2]
        k_idx = k_idx.squeeze(2) if k_idx.dim() == 4 else k_idx
        if (k.shape != (B, S, *self.k.shape[2:]) or v.shape != k.shape or k_idx.shape != (B, S, self.k_idx.shape[2])
                or B != len(self.lengths)):
            raise ValueError(f"append takes k, v [{len(self.lengths)}, S, {self.k.shape[2]}, {self.k.shape[3]}] and "
                             f"k_idx [{len(self.lengths)}, S, {self.k_idx.shape[2]}], got {tuple(k.shape)}, "
                             f"{tuple(v.shape)}, {tuple(k_idx.shape)}")
        if max(self.lengths, default=0) + S > self.capacity:
            raise ValueError(f"appending {S} tokens to a row of {max(self.lengths)} exceeds its {self.capacity}")
        pos = self.seqlens.long()[:, None] + torch.arange(S, device=self.k.device)  # [B, S]
        page = self.block_table.long().gather(1, pos // self.page_size).flatten()
        slot = (pos % self.page_size).flatten()
        self.k[page, slot] = k.reshape(B * S, *k.shape[2:]).to(self.k.dtype)
        self.v[page, slot] = v.reshape(B * S, *v.shape[2:]).to(self.v.dtype)
        self.k_idx[page, slot] = k_idx.reshape(B * S, -1).to(self.k_idx.dtype)
        self.seqlens += S
        self.lengths = [n + S for n in self.lengths]
