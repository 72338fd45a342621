"""The trainable MSA attention layer: GQA projections plus the two index projections."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from msa_tl import reference
from msa_tl.ops.cache import MSACache
from msa_tl.ops.functional import _kl_alignment_loss, _sparse_attention, msa_decode, select_blocks
from msa_tl.ops.validation import check_options


class MSAOutput(NamedTuple):
    output: torch.Tensor  # [B, N, hidden_size]
    kl_loss: torch.Tensor | None  # float32 scalar when computed, for the training loop to add
    indices: torch.Tensor | None  # [B, N, G, topk] int32 in sparse mode, None in warmup


class MSAAttention(nn.Module):
    """Causal GQA self-attention whose keys are chosen per query by MiniMax Sparse Attention.

    Main branch: q [B, N, Hq, D], k/v [B, N, G, D] from ``q_proj``/``k_proj``/``v_proj``.
    Index branch: ``index_q_proj`` gives one index query head per group,
    q_idx [B, N, G, Di]; ``index_k_proj`` gives one shared index key head,
    k_idx [B, N, Di]. Its input is the layer input with gradients stopped, so
    the LM loss never reaches the index projections; they learn only from the
    KL alignment loss (returned as ``kl_loss``, which in turn reaches nothing else).

    Modes:
        ``"sparse"``: the index branch picks ``topk`` blocks of ``block_size``
        keys per (query, group) and the main branch attends over them; KL over
        the chosen tokens.
        ``"warmup"``: dense causal attention in the main branch (SDPA) and KL
        over all visible tokens, to train the indexer before going sparse.

    ``forward(x [B, N, hidden_size])`` returns :class:`MSAOutput`. The KL loss
    is computed when ``compute_kl`` is True, by default in training mode.

    Generation: ``forward(x, cache=cache)`` with the layer's :class:`~msa_tl.ops.cache.MSACache` (G, D, Di of
    the layer) appends the N new tokens' k, v and k_idx to it and attends them over everything cached: an empty
    cache is a prefill (the kernels of the forward above), a filled one decode / chunked prefill
    (:func:`~msa_tl.ops.functional.msa_decode`; dense attention over the cache in warmup mode). Each output row
    equals the full-sequence forward's row at that position. No KL with a cache.
    """

    MODES = ("sparse", "warmup")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 64,
        num_kv_heads: int = 4,
        head_dim: int = 128,
        index_head_dim: int = 128,
        block_size: int = 128,
        topk: int = 16,
        mode: str = "sparse",
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in dict(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                head_dim=head_dim, index_head_dim=index_head_dim).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        check_options(block_size=block_size, topk=topk)
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.index_head_dim = head_dim, index_head_dim
        self.block_size, self.topk = block_size, topk
        self.set_mode(mode)
        factory = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, **factory)
        self.index_q_proj = nn.Linear(hidden_size, num_kv_heads * index_head_dim, **factory)
        self.index_k_proj = nn.Linear(hidden_size, index_head_dim, **factory)

    @classmethod
    def from_dense(cls, dense: nn.Module, *, num_heads: int, num_kv_heads: int, index_head_dim: int = 128,
                   block_size: int = 128, topk: int = 16, mode: str = "warmup") -> "MSAAttention":
        """An MSA layer from a trained causal GQA attention layer (the paper's MSA-CPT route).

        ``dense`` has ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` ``nn.Linear`` layers (as in Llama,
        Qwen and Mistral attention); they are copied, biases included, and the head dim is inferred from
        ``q_proj``. The index projections are new (default init) on the same device and dtype. The layer
        starts in ``"warmup"`` mode, where its output equals the dense layer's and the KL loss trains the
        indexer; call ``set_mode("sparse")`` once it has learned.
        """
        projections = {}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(dense, name, None)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"dense.{name} must be an nn.Linear, got {type(linear).__name__}")
            projections[name] = linear
        hidden_size = projections["q_proj"].in_features
        if projections["q_proj"].out_features % num_heads:
            raise ValueError(f"q_proj.out_features ({projections['q_proj'].out_features}) is not a multiple of "
                             f"num_heads ({num_heads})")
        head_dim = projections["q_proj"].out_features // num_heads
        expected = dict(k_proj=(hidden_size, num_kv_heads * head_dim), v_proj=(hidden_size, num_kv_heads * head_dim),
                        o_proj=(num_heads * head_dim, hidden_size))
        for name, (fan_in, fan_out) in expected.items():
            got = (projections[name].in_features, projections[name].out_features)
            if got != (fan_in, fan_out):
                raise ValueError(f"dense.{name} maps {got[0]} -> {got[1]}, expected {fan_in} -> {fan_out} for "
                                 f"{num_heads} heads, {num_kv_heads} KV heads of dim {head_dim}")
        weight = projections["q_proj"].weight
        layer = cls(hidden_size, num_heads, num_kv_heads, head_dim, index_head_dim, block_size, topk, mode,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for name, source in projections.items():
                target = getattr(layer, name)
                target.weight.copy_(source.weight)
                if source.bias is not None:
                    target.bias = nn.Parameter(source.bias.detach().clone())
        return layer

    def set_mode(self, mode: str) -> None:
        """Switch between ``"warmup"`` (dense) and ``"sparse"``."""
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def index_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the KL loss alone (the two index projections)."""
        return [*self.index_q_proj.parameters(), *self.index_k_proj.parameters()]

    def forward(self, hidden_states: torch.Tensor, *, compute_kl: bool | None = None,
                cache: MSACache | None = None) -> MSAOutput:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
            raise ValueError(f"hidden_states must be [batch, seq, {self.hidden_size}], got {shape}")
        B, N, _ = hidden_states.shape
        H, G, D, Di = self.num_heads, self.num_kv_heads, self.head_dim, self.index_head_dim
        q = self.q_proj(hidden_states).view(B, N, H, D)
        k = self.k_proj(hidden_states).view(B, N, G, D)
        v = self.v_proj(hidden_states).view(B, N, G, D)
        detached = hidden_states.detach()
        q_idx = self.index_q_proj(detached).view(B, N, G, Di)
        k_idx = self.index_k_proj(detached)
        if cache is not None:
            if self.training if compute_kl is None else compute_kl:
                raise ValueError("the KL loss is a training loss: call the layer without a cache (or compute_kl=False)")
            prefill = max(cache.lengths) == 0  # nothing cached yet: the sequence is all here
            cache.append(k, v, k_idx)
            if not prefill:
                return self._attend_cached(q, q_idx, cache)

        if self.mode == "warmup":
            indices, lse = None, None
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        else:
            with torch.no_grad():
                indices = select_blocks(q_idx, k_idx, block_size=self.block_size, topk=self.topk)
            o, lse = _sparse_attention(q, k, v, indices, self.block_size, None, return_lse=True)

        kl_loss = None
        if self.training if compute_kl is None else compute_kl:
            # the sparse forward's lse is the teacher's normaliser, so the KL need not recompute it
            kl_loss = _kl_alignment_loss(q, k, q_idx, k_idx, indices, self.block_size, None, None, lse)
        return MSAOutput(self.o_proj(o.reshape(B, N, H * D)), kl_loss, indices)

    def _attend_cached(self, q, q_idx, cache: MSACache) -> MSAOutput:
        """The output of the newest tokens q [B, S, Hq, D] over the cache (their k / v already in it)."""
        B, S, H, D = q.shape
        if self.mode == "warmup":  # dense: each row's cached keys, the queries at its last S positions
            rows = []
            for b, n in enumerate(cache.lengths):
                k, v = (reference.cached_rows(x, cache.block_table, b, n).transpose(0, 1)[None]
                        for x in (cache.k, cache.v))
                visible = torch.arange(n, device=q.device)[None, :] <= torch.arange(n - S, n, device=q.device)[:, None]
                rows.append(F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), k, v, attn_mask=visible,
                                                           enable_gqa=True).transpose(1, 2))
            o, indices = torch.cat(rows), None
        else:
            o, indices = msa_decode(q.contiguous(), q_idx.contiguous(), cache, block_size=self.block_size,
                                    topk=self.topk, return_indices=True)
        return MSAOutput(self.o_proj(o.reshape(B, S, H * D)), None, indices)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, index_head_dim={self.index_head_dim}, block_size={self.block_size}, "
            f"topk={self.topk}, mode={self.mode!r}"
        )
