"""One layer's KV cache for MSA decode: K, V and the index keys in pages, as vLLM and FlashAttention's
``flash_attn_with_kvcache`` lay them out.

    k, v         [num_pages, page_size, G, D]   main-branch keys / values
    k_idx        [num_pages, page_size, Di]     index keys (one head shared by the G groups), K's dtype or
                                                float8_e4m3fn with
    k_idx_scale  [num_pages, page_size] fp32    a scale per token (amax / 448): the key is k_idx * k_idx_scale
    k_idx_exact  [num_pages, page_size, Di]     optional beside FP8 codes: the index keys in K's dtype, which
                                                rescore the FP8 scan's best blocks (:mod:`msa_tl.decode.rescore`)
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

from msa_tl.ops.kernels import DECODE_MAX_TOPK
from msa_tl.reference import dequantize_fp8, quantize_fp8


def default_candidates(topk: int, local_blocks: int = 1) -> int:
    """FP8 candidates a rescoring cache's decode ranks again beside the forced blocks: twice the ranked slots, within
    the slots the decode top-k holds (``DECODE_MAX_TOPK``). On random keys, where FP8 alone keeps ~93% of the bf16
    selection's blocks, the float64 model of the two stages keeps all of them at 128K and 1M (NOTES.md)."""
    return max(topk - local_blocks, min(2 * (topk - local_blocks), DECODE_MAX_TOPK - local_blocks))


class MSACache:
    """A paged K / V / index-key cache for one MSA layer (see the module docstring for the layout)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, k_idx: torch.Tensor, block_table: torch.Tensor,
                 lengths: Sequence[int], k_idx_scale: torch.Tensor | None = None,
                 k_idx_exact: torch.Tensor | None = None):
        if k.dim() != 4 or v.shape != k.shape:
            raise ValueError(f"k and v must both be [num_pages, page_size, G, D], got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        if k_idx.dim() != 3 or k_idx.shape[:2] != k.shape[:2]:
            raise ValueError(f"k_idx must be [num_pages, page_size, Di] with k's pages, got {tuple(k_idx.shape)}")
        if k.dtype != v.dtype or len({k.device, v.device, k_idx.device}) != 1:
            raise ValueError("k, v and k_idx must share a device, k and v a dtype")
        if k_idx.dtype == torch.float8_e4m3fn:
            if (k_idx_scale is None or k_idx_scale.shape != k_idx.shape[:2] or k_idx_scale.dtype != torch.float32
                    or k_idx_scale.device != k.device):
                raise ValueError(f"FP8 index keys need k_idx_scale [{k_idx.shape[0]}, {k_idx.shape[1]}] float32 on "
                                 f"{k.device}, a scale per token")
        elif k_idx.dtype != k.dtype or k_idx_scale is not None:
            raise ValueError(f"k_idx must have k's dtype {k.dtype} (no scale) or be float8_e4m3fn with a scale, got "
                             f"{k_idx.dtype}")
        if k_idx_exact is not None and (k_idx.dtype != torch.float8_e4m3fn or k_idx_exact.shape != k_idx.shape
                                        or k_idx_exact.dtype != k.dtype or k_idx_exact.device != k.device):
            raise ValueError(f"k_idx_exact (the exact keys that rescore FP8 candidates) goes with FP8 k_idx and must be "
                             f"{tuple(k_idx.shape)} {k.dtype} on {k.device}")
        if block_table.dim() != 2 or block_table.dtype != torch.int32 or block_table.device != k.device:
            raise ValueError(f"block_table must be [B, max_pages] int32 on {k.device}, got {tuple(block_table.shape)} "
                             f"{block_table.dtype} on {block_table.device}")
        lengths = [int(n) for n in lengths]
        if len(lengths) != block_table.shape[0] or min(lengths, default=0) < 0:
            raise ValueError(f"lengths must give each of the {block_table.shape[0]} rows a length >= 0, got {lengths}")
        self.k, self.v, self.k_idx, self.block_table = k, v, k_idx, block_table
        self.k_idx_scale, self.k_idx_exact = k_idx_scale, k_idx_exact
        self.lengths = lengths  # host copy of seqlens
        self.seqlens = torch.tensor(lengths, dtype=torch.int32, device=k.device)
        if max(lengths, default=0) > self.capacity:
            raise ValueError(f"a row of {max(lengths)} tokens exceeds the {self.capacity} its pages hold")

    @classmethod
    def paged(cls, batch: int, max_seq: int, groups: int, head_dim: int, index_dim: int, *, page_size: int = 128,
              num_pages: int | None = None, block_table: torch.Tensor | None = None, dtype=torch.bfloat16,
              index_dtype=None, rescore: bool = False, device=None) -> "MSACache":
        """An empty cache of ``num_pages`` pages (default: enough for ``batch`` rows of ``max_seq`` tokens), rows
        given pages in order unless ``block_table`` [batch, ceil(max_seq / page_size)] int32 says otherwise.
        ``index_dtype``: the index keys' dtype, ``dtype`` (default) or torch.float8_e4m3fn (half the bytes the
        decode scan reads; appends quantise each token with its own scale). ``rescore`` (FP8 only): keep the index
        keys in ``dtype`` as well (``k_idx_exact``, +2 B an element), so decode ranks the FP8 scan's best
        ``2 (topk - local_blocks)`` blocks again by their exact scores (the bf16 selection, where FP8 alone keeps
        ~93% of its blocks on random keys)."""
        per_row = math.ceil(max_seq / page_size)
        num_pages = batch * per_row if num_pages is None else num_pages
        if block_table is None:
            if num_pages < batch * per_row:
                raise ValueError(f"{num_pages} pages cannot hold {batch} rows of {max_seq} tokens; pass a block_table")
            block_table = torch.arange(batch * per_row, dtype=torch.int32, device=device).view(batch, per_row)
        elif block_table.numel() and (int(block_table.min()) < 0 or int(block_table.max()) >= num_pages):
            raise ValueError(f"block_table holds page ids outside [0, {num_pages})")
        k = torch.zeros((num_pages, page_size, groups, head_dim), dtype=dtype, device=device)
        index_dtype = dtype if index_dtype is None else index_dtype
        k_idx = torch.zeros((num_pages, page_size, index_dim), dtype=index_dtype, device=device)
        scale = (torch.ones((num_pages, page_size), dtype=torch.float32, device=device)
                 if index_dtype == torch.float8_e4m3fn else None)
        if rescore and scale is None:
            raise ValueError("rescore keeps exact index keys beside FP8 ones: it needs index_dtype=torch.float8_e4m3fn")
        exact = torch.zeros((num_pages, page_size, index_dim), dtype=dtype, device=device) if rescore else None
        return cls(k, torch.zeros_like(k), k_idx, block_table.to(device), [0] * batch, k_idx_scale=scale,
                   k_idx_exact=exact)

    @classmethod
    def contiguous(cls, batch: int, max_seq: int, groups: int, head_dim: int, index_dim: int, *,
                   page_size: int = 128, dtype=torch.bfloat16, index_dtype=None, rescore: bool = False,
                   device=None) -> "MSACache":
        """The contiguous layout: each row's pages in order, so ``k.view(batch, -1, G, D)[b]`` holds row b."""
        return cls.paged(batch, max_seq, groups, head_dim, index_dim, page_size=page_size, dtype=dtype,
                         index_dtype=index_dtype, rescore=rescore, device=device)

    @property
    def index_fp8(self) -> bool:
        """Whether the index keys are FP8 codes with a scale per token."""
        return self.k_idx_scale is not None

    @property
    def rescore(self) -> bool:
        """Whether decode rescores the FP8 scan's best blocks with the exact keys ``k_idx_exact``."""
        return self.k_idx_exact is not None

    def index_keys(self) -> torch.Tensor:
        """The index keys [num_pages, page_size, Di] as values (dequantised, float64, when FP8; else k_idx)."""
        if not self.index_fp8:
            return self.k_idx
        return dequantize_fp8(self.k_idx, self.k_idx_scale)

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        """Tokens each row's pages hold."""
        return self.block_table.shape[1] * self.page_size

    def plan(self, *, queries: int, heads: int, block_size: int | None = None, topk: int = 16,
             scale: float | None = None, index_scale: float | None = None, local_blocks: int = 1,
             rescore_candidates: int | None = None, **config):
        """The GPU launches of a decode step over this cache (:class:`msa_tl.decode.plan.DecodePlan`) for ``queries``
        newest tokens a row and ``heads`` query heads: build it once per step, ``run`` it per layer (layers whose
        caches share this one's block table and lengths). ``config``: DecodePlan's knob overrides and ``splits``.
        The plan reads ``block_table`` and ``seqlens`` when it runs, so a CUDA graph of its runs replays after
        :meth:`append` as long as the shapes stay. ``rescore_candidates``: the FP8 candidates a rescoring cache
        ranks again (default :func:`default_candidates`)."""
        from msa_tl.decode.plan import DecodePlan

        if rescore_candidates is not None and not self.rescore:
            raise ValueError("rescore_candidates needs a cache that keeps exact index keys (MSACache.paged(..., "
                             "rescore=True))")
        if self.rescore and rescore_candidates is None:
            rescore_candidates = default_candidates(topk, local_blocks)

        return DecodePlan(self.block_table, self.seqlens, queries=queries, heads=heads, groups=self.k.shape[2],
                          head_dim=self.k.shape[3], index_dim=self.k_idx.shape[2],
                          block_size=self.page_size if block_size is None else block_size, topk=topk, scale=scale,
                          index_scale=index_scale, dtype=self.k.dtype, index_fp8=self.index_fp8,
                          local_blocks=local_blocks, rescore_candidates=rescore_candidates or 0, **config)

    def truncate(self, length: int) -> None:
        """Keep each row's first ``length`` tokens (0 empties the cache for a new sequence); later appends overwrite
        the rest. No device sync."""
        if not isinstance(length, int) or not 0 <= length <= min(self.lengths, default=0):
            raise ValueError(f"truncate keeps 0 .. {min(self.lengths, default=0)} tokens a row, got {length!r}")
        self.lengths = [length] * len(self.lengths)
        self.seqlens.fill_(length)

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
        if self.index_fp8:
            codes, scale = quantize_fp8(k_idx.reshape(B * S, -1))
            self.k_idx[page, slot] = codes
            self.k_idx_scale[page, slot] = scale
            if self.rescore:
                self.k_idx_exact[page, slot] = k_idx.reshape(B * S, -1).to(self.k_idx_exact.dtype)
        else:
            self.k_idx[page, slot] = k_idx.reshape(B * S, -1).to(self.k_idx.dtype)
        self.seqlens += S
        self.lengths = [n + S for n in self.lengths]
