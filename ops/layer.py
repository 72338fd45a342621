"""The trainable MSA attention layer: GQA projections plus the two index projections, with optional RoPE and
QK-norm so that the attention layers of real models (Llama, Qwen2/3, Mistral, MiniMax-M3) convert into it."""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from msa_tl import reference
from msa_tl.ops.cache import MSACache
from msa_tl.ops.context_parallel import context_parallel_msa
from msa_tl.ops.functional import (
    _attend_aligned,
    _default_scale,
    _kl_aligned,
    _kl_alignment_loss,
    _select_aligned,
    _sparse_attention,
    msa_decode,
    select_blocks,
)
from msa_tl.ops.varlen import checked_layout, dense_packed, max_document_length, varlen_lse_available
from msa_tl.ops.validation import check_options


class MSAOutput(NamedTuple):
    output: torch.Tensor  # [B, N, hidden_size]
    kl_loss: torch.Tensor | None  # float32 scalar when computed, for the training loop to add
    indices: torch.Tensor | None  # [B, N, G, topk] int32 in sparse mode, None in warmup


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, normalised in float32 as transformers' LlamaRMSNorm / Qwen3RMSNorm do.

    ``x [..., dim]`` -> ``x * rsqrt(mean(x^2) + eps) * weight`` in x's shape and dtype. ``unit_offset`` (Gemma,
    MiniMax-M3): the weight is stored as an offset from 1 (initialised to 0) and the output is
    ``(x_hat * (1 + weight))`` formed in float32 before the cast back; otherwise (Llama, Qwen3) ``x_hat`` is cast
    back first and then scaled by the weight (initialised to 1). Each convention rounds where its model does.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False, device=None, dtype=None):
        super().__init__()
        self.eps, self.unit_offset = float(eps), bool(unit_offset)
        self.weight = nn.Parameter((torch.zeros if unit_offset else torch.ones)(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, unit_offset={self.unit_offset}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``rot`` dims of each head, the rest passed through (rotate_half convention, as
    transformers' ``apply_rotary_pos_emb`` for Llama and, partial, for MiniMax-M3 / GLM).

    Args:
        x: [B, N, H, D].
        cos, sin: [B or 1, N, rot], rot <= D and even.

    Returns:
        [B, N, H, D] in x's dtype; the rotation is formed in the promoted dtype of x and cos, as transformers
        forms it (x's own dtype when cos comes from the model's rotary embedding).
    """
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x_rot = x[..., :rot]
    rotated = x_rot * cos + _rotate_half(x_rot) * sin
    if rot < x.shape[-1]:
        rotated = torch.cat((rotated, x[..., rot:].to(rotated.dtype)), dim=-1)
    return rotated.to(x.dtype)


class MSAAttention(nn.Module):
    """Causal GQA self-attention whose keys are chosen per query by MiniMax Sparse Attention.

    Main branch: q [B, N, Hq, D], k/v [B, N, G, D] from ``q_proj``/``k_proj``/``v_proj``; with ``qk_norm``,
    ``q_norm`` / ``k_norm`` (RMSNorm over D, per head, as Qwen3) normalise q and k, then RoPE rotates them.
    Index branch: ``index_q_proj`` gives one index query head per group, q_idx [B, N, G, Di]; ``index_k_proj``
    gives one shared index key head, k_idx [B, N, Di]; ``index_qk_norm`` adds ``index_q_norm`` / ``index_k_norm``
    (RMSNorm over Di) and ``index_rope`` rotates them with the same (cos, sin) (as MiniMax-M3's indexer). Its input
    is the layer input with gradients stopped, so the LM loss never reaches the index projections or norms; they
    learn only from the KL alignment loss (returned as ``kl_loss``, which in turn reaches nothing else).

    Modes:
        ``"sparse"``: the index branch picks ``topk`` blocks of ``block_size``
        keys per (query, group) and the main branch attends over them; KL over
        the chosen tokens.
        ``"warmup"``: dense causal attention in the main branch (SDPA) and KL
        over all visible tokens, to train the indexer before going sparse.

    ``forward(x [B, N, hidden_size], position_embeddings=None)`` returns :class:`MSAOutput`.
    ``position_embeddings`` is the ``(cos, sin)`` pair a transformers model passes its attention layers
    (each [B, N, rot], or [N, rot] / [1, N, rot] shared by the batch, rot <= D): RoPE on the first rot dims of
    each q / k head (partial rotary when rot < D). None means no positional encoding, which a layer with
    ``rotary_dim`` set refuses. The KL loss is computed when ``compute_kl`` is True, by default in training mode.

    Options: ``scale`` the main softmax scale (default 1/sqrt(D)); ``index_scale`` the index scores' (default
    1/sqrt(Di); it does not change the selection, only the KL's student softmax); ``local_blocks`` the newest
    blocks every query is given (MiniMax-M3's ``index_local_blocks``); ``index_fp8`` selects with FP8 index
    scores (a serving option: the KL still trains on bf16 scores); ``rotary_dim`` the rot that
    position_embeddings must carry (None: any, and they may be left out); ``norm_eps`` / ``norm_unit_offset`` for
    the four norms (see :class:`RMSNorm`).

    Packed documents: ``forward(x [1, total, hidden_size], position_embeddings, cu_seqlens=cu_seqlens)`` attends
    each document on its own (flash-attn's ``cu_seqlens`` [num_docs + 1] int32; position_embeddings of each
    token's position in its document, as the caller computes them), and the KL averages over all packed tokens.
    In warmup mode ``max_seqlen`` (the longest document) saves a host sync on the GPU.

    Context parallelism: with ``process_group`` (a ``torch.distributed`` group; ``dist.group.WORLD`` for all ranks)
    each rank's ``forward`` takes its shard of one sequence, ``x [B, 2C, hidden_size]`` in the zigzag layout of
    :mod:`msa_tl.ops.context_parallel` (:class:`~msa_tl.ops.context_parallel.ZigzagLayout` shards a sequence and
    gives each token's position, from which the caller computes position_embeddings), and returns the rank's rows;
    every rank must call it, and its backward. ``kl_loss`` is then the mean over the rank's queries.

    Generation: ``forward(x, position_embeddings, cache=cache)`` with the layer's :class:`~msa_tl.ops.cache.MSACache`
    (G, D, Di of the layer) appends the N new tokens' k, v and k_idx (normalised and rotated) to it and attends
    them over everything cached; ``position_embeddings`` are those of the N new tokens. An empty cache is a prefill
    (the kernels of the forward above), a filled one decode / chunked prefill
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
        *,
        scale: float | None = None,
        index_scale: float | None = None,
        local_blocks: int = 1,
        index_fp8: bool = False,
        rotary_dim: int | None = None,
        index_rope: bool = False,
        qk_norm: bool = False,
        index_qk_norm: bool = False,
        norm_eps: float = 1e-6,
        norm_unit_offset: bool = False,
        process_group=None,
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
        if rotary_dim is not None and (not isinstance(rotary_dim, int) or not 0 < rotary_dim <= head_dim
                                       or rotary_dim % 2):
            raise ValueError(f"rotary_dim must be None or an even int in [2, head_dim={head_dim}], got {rotary_dim!r}")
        if index_rope and rotary_dim is not None and rotary_dim > index_head_dim:
            raise ValueError(f"index_rope rotates the first rotary_dim={rotary_dim} dims of the index heads, more than "
                             f"index_head_dim={index_head_dim}")
        if not isinstance(norm_eps, (int, float)) or not norm_eps >= 0:
            raise ValueError(f"norm_eps must be a float >= 0, got {norm_eps!r}")
        check_options(block_size=block_size, topk=topk, local_blocks=local_blocks, scale=scale, index_scale=index_scale)
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.index_head_dim = head_dim, index_head_dim
        self.block_size, self.topk, self.local_blocks, self.index_fp8 = block_size, topk, local_blocks, bool(index_fp8)
        self.scale = None if scale is None else float(scale)
        self.index_scale = None if index_scale is None else float(index_scale)
        self.rotary_dim, self.index_rope = rotary_dim, bool(index_rope)
        self.qk_norm, self.index_qk_norm = bool(qk_norm), bool(index_qk_norm)
        self.process_group = process_group
        self.set_mode(mode)
        factory = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, **factory)
        self.index_q_proj = nn.Linear(hidden_size, num_kv_heads * index_head_dim, **factory)
        self.index_k_proj = nn.Linear(hidden_size, index_head_dim, **factory)
        norm = dict(eps=norm_eps, unit_offset=norm_unit_offset, device=device, dtype=dtype)
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(head_dim, **norm), RMSNorm(head_dim, **norm)
        if index_qk_norm:
            self.index_q_norm, self.index_k_norm = RMSNorm(index_head_dim, **norm), RMSNorm(index_head_dim, **norm)

    @classmethod
    def from_dense(cls, dense: nn.Module, *, num_heads: int | None = None, num_kv_heads: int | None = None,
                   index_head_dim: int | None = None, block_size: int | None = None, topk: int | None = None,
                   mode: str | None = None, rotary_dim: int | None = None, index_rope: bool | None = None,
                   index_qk_norm: bool | None = None) -> "MSAAttention":
        """An MSA layer from a trained causal GQA attention layer (the paper's MSA-CPT route).

        ``dense`` has ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` ``nn.Linear`` layers (as the attention of
        Llama, Qwen2/3, Mistral and MiniMax-M3 in transformers); they are copied, biases included. Left out, the
        head counts come from ``dense.config`` (``num_attention_heads``, ``num_key_value_heads``), else from
        attributes of ``dense`` (``num_heads`` / ``num_attention_heads``, ``num_key_value_heads`` /
        ``num_kv_heads``), else from the projection widths over ``dense.head_dim``; the head dim is
        ``dense.head_dim`` when present, else q_proj's width over num_heads. ``dense.scaling`` is kept as the
        layer's ``scale`` when it is not 1/sqrt(head_dim).

        Per-head ``q_norm`` / ``k_norm`` RMSNorms (Qwen3, MiniMax-M3) are copied with their eps; whether a norm
        scales by ``weight`` or ``1 + weight`` is read off its output on a probe input. RoPE has no weights: the
        caller passes ``position_embeddings`` to ``forward`` as to the dense layer. When the dense layer takes
        them, ``rotary_dim`` (left out) is recorded from ``config.rope_parameters["partial_rotary_factor"]`` x
        head_dim, and the layer then requires them.

        The index branch is new (default init, ``index_head_dim`` default 128, ``block_size`` 128, ``topk`` 16),
        on the same device and dtype, and the layer starts in ``"warmup"`` mode, where its output equals the dense
        layer's and the KL loss trains the indexer; call ``set_mode("sparse")`` once it has learned. A dense layer
        with its own block indexer (``dense.indexer``, MiniMax-M3's sparse layers: one index query head per KV
        group, one shared index key head) has it copied instead, norms and all, with its block size, top-k,
        local blocks and ``index_rope`` on; that layer starts in ``"sparse"`` mode, equal to the dense one.
        """
        projections = {}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(dense, name, None)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"dense.{name} must be an nn.Linear, got {type(linear).__name__}")
            projections[name] = linear
        hidden_size = projections["q_proj"].in_features
        q_width, kv_width = projections["q_proj"].out_features, projections["k_proj"].out_features
        config = getattr(dense, "config", None)
        head_dim = _positive_int(getattr(dense, "head_dim", None))
        if num_heads is None:
            num_heads = _head_count("num_heads", q_width, head_dim, (config, "num_attention_heads"),
                                    (dense, "num_heads"), (dense, "num_attention_heads"))
        if num_kv_heads is None:
            num_kv_heads = _head_count("num_kv_heads", kv_width, head_dim, (config, "num_key_value_heads"),
                                       (dense, "num_key_value_heads"), (dense, "num_kv_heads"))
        if head_dim is None:
            if q_width % num_heads:
                raise ValueError(f"q_proj.out_features ({q_width}) is not a multiple of num_heads ({num_heads})")
            head_dim = q_width // num_heads
        elif q_width != num_heads * head_dim:
            raise ValueError(f"dense.q_proj has {q_width} outputs, not num_heads ({num_heads}) x head_dim "
                             f"({head_dim})")
        expected = dict(k_proj=(hidden_size, num_kv_heads * head_dim), v_proj=(hidden_size, num_kv_heads * head_dim),
                        o_proj=(num_heads * head_dim, hidden_size))
        for name, (fan_in, fan_out) in expected.items():
            got = (projections[name].in_features, projections[name].out_features)
            if got != (fan_in, fan_out):
                raise ValueError(f"dense.{name} maps {got[0]} -> {got[1]}, expected {fan_in} -> {fan_out} for "
                                 f"{num_heads} heads, {num_kv_heads} KV heads of dim {head_dim}")

        scaling = getattr(dense, "scaling", None)
        scale = None
        if isinstance(scaling, (int, float)) and not math.isclose(scaling, 1 / math.sqrt(head_dim), rel_tol=1e-12):
            scale = float(scaling)
        if rotary_dim is None and _takes_position_embeddings(dense):
            rope_parameters = getattr(config, "rope_parameters", None)
            factor = rope_parameters.get("partial_rotary_factor", 1.0) if isinstance(rope_parameters, dict) else 1.0
            rotary_dim = int(head_dim * (factor or 1.0))

        norms = {name: getattr(dense, name, None) for name in ("q_norm", "k_norm")}
        if (norms["q_norm"] is None) != (norms["k_norm"] is None):
            raise ValueError("dense has only one of q_norm / k_norm; this layer normalises both or neither")
        main_norms = {name: _read_rms_norm(norm, head_dim, f"dense.{name}")
                      for name, norm in norms.items() if norm is not None}

        indexer = getattr(dense, "indexer", None)
        index_projections, index_norms = {}, {}
        if indexer is not None:
            index_projections, index_norms, index_dims = _read_indexer(indexer, hidden_size, num_kv_heads)
            if index_head_dim is not None and index_head_dim != index_dims["index_head_dim"]:
                raise ValueError(f"index_head_dim={index_head_dim} differs from dense.indexer's "
                                 f"{index_dims['index_head_dim']}")
            index_head_dim = index_dims["index_head_dim"]
            block_size = index_dims["block_size"] if block_size is None else block_size
            topk = index_dims["topk"] if topk is None else topk
            index_rope = True if index_rope is None else index_rope
            index_qk_norm = bool(index_norms) if index_qk_norm is None else index_qk_norm
            if index_qk_norm != bool(index_norms):
                raise ValueError(f"index_qk_norm={index_qk_norm} but dense.indexer "
                                 f"{'has' if index_norms else 'has no'} q_norm / k_norm")
        weight = projections["q_proj"].weight
        layer = cls(hidden_size, num_heads, num_kv_heads, head_dim, 128 if index_head_dim is None else index_head_dim,
                    128 if block_size is None else block_size, 16 if topk is None else topk,
                    mode or ("sparse" if indexer is not None else "warmup"), scale=scale,
                    local_blocks=index_dims["local_blocks"] if indexer is not None else 1, rotary_dim=rotary_dim,
                    index_rope=bool(index_rope), qk_norm=bool(main_norms), index_qk_norm=bool(index_qk_norm),
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for name, source in {**projections, **index_projections}.items():
                target = getattr(layer, name)
                target.weight.copy_(source.weight)
                if source.bias is not None:
                    target.bias = nn.Parameter(source.bias.detach().clone())
            for name, (source_weight, eps, unit_offset) in {**main_norms, **index_norms}.items():
                target = getattr(layer, name)
                target.weight.copy_(source_weight)
                target.eps, target.unit_offset = eps, unit_offset
        return layer

    def set_mode(self, mode: str) -> None:
        """Switch between ``"warmup"`` (dense) and ``"sparse"``."""
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def index_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the KL loss alone: the two index projections and, with ``index_qk_norm``,
        the two index norms."""
        modules = [self.index_q_proj, self.index_k_proj]
        if self.index_qk_norm:
            modules += [self.index_q_norm, self.index_k_norm]
        return [p for module in modules for p in module.parameters()]

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                *, compute_kl: bool | None = None, cache: MSACache | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> MSAOutput:
        """Attention of ``hidden_states`` [B, N, hidden_size] (the N newest tokens when ``cache`` is given).

        ``position_embeddings``: (cos, sin), each [B, N, rot], [1, N, rot] or [N, rot], or None (no RoPE).
        ``cu_seqlens`` [num_docs + 1] int32: B = 1 packed documents, each attended on its own (no cache).
        Returns :class:`MSAOutput` (output [B, N, hidden_size], kl_loss, indices [B, N, G, topk] in sparse mode,
        counting blocks from each token's document start when packed).
        """
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
            raise ValueError(f"hidden_states must be [batch, seq, {self.hidden_size}], got {shape}")
        B, N, _ = hidden_states.shape
        H, G, D, Di = self.num_heads, self.num_kv_heads, self.head_dim, self.index_head_dim
        rope = self._check_position_embeddings(position_embeddings, hidden_states)
        q = self.q_proj(hidden_states).view(B, N, H, D)
        k = self.k_proj(hidden_states).view(B, N, G, D)
        v = self.v_proj(hidden_states).view(B, N, G, D)
        detached = hidden_states.detach()
        q_idx = self.index_q_proj(detached).view(B, N, G, Di)
        k_idx = self.index_k_proj(detached)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.index_qk_norm:
            q_idx, k_idx = self.index_q_norm(q_idx), self.index_k_norm(k_idx)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if self.index_rope:
                q_idx, k_idx = apply_rotary(q_idx, cos, sin), apply_rotary(k_idx[:, :, None], cos, sin)[:, :, 0]
        with_kl = self.training if compute_kl is None else compute_kl
        if self.process_group is not None:
            if cache is not None or cu_seqlens is not None:
                raise ValueError("a context-parallel layer (process_group) attends one sequence sharded over its "
                                 "ranks: no cache, no packed documents (cu_seqlens)")
            q, k, v, q_idx, k_idx = (x.contiguous() for x in (q, k, v, q_idx, k_idx))
            out = context_parallel_msa(q, k, v, q_idx, k_idx, process_group=self.process_group,
                                       block_size=self.block_size, topk=self.topk, scale=self.scale,
                                       index_scale=self.index_scale, local_blocks=self.local_blocks,
                                       index_fp8=self.index_fp8, dense=self.mode == "warmup", compute_kl=with_kl)
            return MSAOutput(self.o_proj(out.o.reshape(B, N, H * D)), out.kl_loss, out.indices)
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("packed documents (cu_seqlens) and a cache do not mix: decode each row from its cache")
            o, kl_loss, indices = self._attend_packed(q, k, v, q_idx, k_idx, cu_seqlens, max_seqlen, with_kl)
            return MSAOutput(self.o_proj(o.reshape(B, N, H * D)), kl_loss, indices)
        if cache is not None:
            if with_kl:
                raise ValueError("the KL loss is a training loss: call the layer without a cache (or compute_kl=False)")
            prefill = max(cache.lengths) == 0  # nothing cached yet: the sequence is all here
            cache.append(k, v, k_idx)
            if not prefill:
                return self._attend_cached(q, q_idx, cache)

        if self.mode == "warmup":
            indices, lse = None, None
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale,
                enable_gqa=True,
            ).transpose(1, 2)
        else:
            with torch.no_grad():
                indices = select_blocks(q_idx, k_idx, block_size=self.block_size, topk=self.topk,
                                        index_scale=self.index_scale, local_blocks=self.local_blocks,
                                        index_fp8=self.index_fp8)
            o, lse = _sparse_attention(q, k, v, indices, self.block_size, self.scale, return_lse=True)

        kl_loss = None
        if with_kl:
            # the sparse forward's lse is the teacher's normaliser, so the KL need not recompute it
            kl_loss = _kl_alignment_loss(q, k, q_idx, k_idx, indices, self.block_size, self.scale, self.index_scale,
                                         lse)
        return MSAOutput(self.o_proj(o.reshape(B, N, H * D)), kl_loss, indices)

    def _attend_packed(self, q, k, v, q_idx, k_idx, cu_seqlens, max_seqlen, with_kl):
        """(o [1, total, Hq, D], kl_loss, indices) of packed documents, each attended on its own."""
        layout = checked_layout(cu_seqlens, batch=q.shape[0], total=q.shape[1], device=q.device,
                                block_size=self.block_size, max_seqlen=max_seqlen)
        indices = lse = None
        if self.mode == "warmup":
            if with_kl or q.is_cuda:
                max_seqlen = max_seqlen or max_document_length(cu_seqlens)
            if with_kl and q.is_cuda and varlen_lse_available():  # the teacher's normaliser, given to the KL
                o, lse = dense_packed(q, k, v, cu_seqlens, max_seqlen, self.scale, return_lse=True)
            else:
                o = dense_packed(q, k, v, cu_seqlens, max_seqlen, self.scale)
            aligned = layout.causal_selection(self.num_kv_heads, max_seqlen) if with_kl else None
        else:
            with torch.no_grad():
                aligned = _select_aligned(layout, q_idx, k_idx, self.topk,
                                          _default_scale(self.index_scale, q_idx.shape[3]), self.local_blocks,
                                          self.index_fp8)
            o, lse = _attend_aligned(layout, q, k, v, aligned, self.block_size, self.scale)
            indices = layout.from_aligned(aligned)
        kl_loss = None
        if with_kl:
            kl_loss = _kl_aligned(layout, q, k, q_idx, k_idx, aligned, self.block_size, self.scale, self.index_scale,
                                  lse)
        return o, kl_loss, indices

    def _check_position_embeddings(self, position_embeddings, hidden_states: torch.Tensor):
        """(cos, sin) as [B or 1, N, rot] each, or None; ValueError naming ``position_embeddings`` otherwise."""
        if position_embeddings is None:
            if self.rotary_dim is not None:
                raise ValueError(f"position_embeddings are required: this layer rotates rotary_dim={self.rotary_dim} "
                                 f"dims of each head (pass the (cos, sin) the model's rotary embedding gives)")
            return None
        B, N, _ = hidden_states.shape
        if (not isinstance(position_embeddings, (tuple, list)) or len(position_embeddings) != 2
                or not all(isinstance(t, torch.Tensor) for t in position_embeddings)):
            raise ValueError(f"position_embeddings must be a (cos, sin) pair of tensors, got "
                             f"{type(position_embeddings).__name__}")
        cos, sin = position_embeddings
        shapes = f"{tuple(cos.shape)} and {tuple(sin.shape)}"
        if cos.shape != sin.shape or cos.dim() not in (2, 3):
            raise ValueError(f"position_embeddings (cos, sin) must share a shape [batch, seq, rot] or [seq, rot], "
                             f"got {shapes}")
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        rot = cos.shape[-1]
        if cos.shape[0] not in (1, B) or cos.shape[1] != N:
            raise ValueError(f"position_embeddings must be [{B} or 1, {N}, rot] (or [{N}, rot]) for hidden_states "
                             f"{tuple(hidden_states.shape)}, got {shapes}")
        if rot % 2 or not 0 < rot <= self.head_dim:
            raise ValueError(f"position_embeddings rotate rot={rot} dims; rot must be even and in [2, head_dim="
                             f"{self.head_dim}]")
        if self.rotary_dim is not None and rot != self.rotary_dim:
            raise ValueError(f"position_embeddings rotate rot={rot} dims, this layer's rotary_dim is {self.rotary_dim}")
        if self.index_rope and rot > self.index_head_dim:
            raise ValueError(f"position_embeddings rotate rot={rot} dims, more than index_head_dim="
                             f"{self.index_head_dim} (index_rope rotates the first rot dims of the index heads)")
        if not cos.is_floating_point() or not sin.is_floating_point() or cos.device != hidden_states.device \
                or sin.device != hidden_states.device:
            raise ValueError(f"position_embeddings must be floating point on {hidden_states.device}, got "
                             f"{cos.dtype} on {cos.device} and {sin.dtype} on {sin.device}")
        return cos, sin

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
                                                           scale=self.scale, enable_gqa=True).transpose(1, 2))
            o, indices = torch.cat(rows), None
        else:
            o, indices = msa_decode(q.contiguous(), q_idx.contiguous(), cache, block_size=self.block_size,
                                    topk=self.topk, scale=self.scale, index_scale=self.index_scale,
                                    local_blocks=self.local_blocks, return_indices=True)
        return MSAOutput(self.o_proj(o.reshape(B, S, H * D)), None, indices)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, index_head_dim={self.index_head_dim}, block_size={self.block_size}, "
            f"topk={self.topk}, local_blocks={self.local_blocks}, index_fp8={self.index_fp8}, mode={self.mode!r}, "
            f"scale={self.scale}, "
            f"index_scale={self.index_scale}, rotary_dim={self.rotary_dim}, "
            f"index_rope={self.index_rope}, qk_norm={self.qk_norm}, index_qk_norm={self.index_qk_norm}"
        )


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _first_positive_int(*owner_attributes) -> int | None:
    """The first of ``(owner, attribute)`` that holds a positive int."""
    for owner, attribute in owner_attributes:
        value = _positive_int(getattr(owner, attribute, None)) if owner is not None else None
        if value is not None:
            return value
    return None


def _head_count(name: str, width: int, head_dim: int | None, *owner_attributes) -> int:
    """A head count from the first ``(owner, attribute)`` that holds one, else a projection's ``width`` over
    ``head_dim``; ValueError naming the ``from_dense`` argument that would settle it."""
    count = _first_positive_int(*owner_attributes)
    if count is None and head_dim is not None and width % head_dim == 0:
        count = width // head_dim
    if count is None:
        places = ", ".join(f"{'config.' if owner is not None and not isinstance(owner, nn.Module) else ''}{attr}"
                           for owner, attr in owner_attributes)
        raise ValueError(f"cannot tell {name} from dense (none of {places}, nor head_dim): pass {name}=")
    return count


def _takes_position_embeddings(dense: nn.Module) -> bool:
    try:
        return "position_embeddings" in inspect.signature(dense.forward).parameters
    except (TypeError, ValueError):
        return False


def _read_rms_norm(norm: nn.Module, dim: int, where: str) -> tuple[torch.Tensor, float, bool]:
    """(weight [dim], eps, unit_offset) of an RMSNorm over ``dim`` that :class:`RMSNorm` reproduces.

    The weight convention is read off the norm's output on a probe input, since models name the two alike
    (Qwen3RMSNorm scales by w, MiniMax-M3's and Gemma's by 1 + w)."""
    weight = getattr(norm, "weight", None)
    eps = next((value for value in (getattr(norm, name, None) for name in ("variance_epsilon", "eps"))
                if isinstance(value, (int, float)) and not isinstance(value, bool)), None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (dim,) or eps is None:
        raise ValueError(f"{where} must be an RMSNorm over the {dim} dims of a head (a weight [{dim}] and an eps), "
                         f"got {type(norm).__name__}")
    probe = torch.randn(3, dim, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        got = norm(probe)
        for unit_offset in (False, True):
            candidate = RMSNorm(dim, eps, unit_offset, device=weight.device, dtype=weight.dtype)
            candidate.weight.copy_(weight)
            if got.shape == probe.shape and torch.allclose(candidate(probe).to(got.dtype), got, rtol=1e-3, atol=1e-5):
                return weight.detach(), float(eps), unit_offset
    raise ValueError(f"{where} ({type(norm).__name__}) is not x * rsqrt(mean(x^2) + eps) scaled by its weight or by "
                     f"1 + its weight; this layer cannot reproduce it")


def _read_indexer(indexer: nn.Module, hidden_size: int, num_kv_heads: int):
    """MiniMax-M3's block indexer as this layer's index branch: the projections and norms to copy
    ({name in the layer: module or (weight, eps, unit_offset)}) and the index head dim, block size and top-k."""
    q_proj, k_proj = getattr(indexer, "q_proj", None), getattr(indexer, "k_proj", None)
    if not isinstance(q_proj, nn.Linear) or not isinstance(k_proj, nn.Linear):
        raise ValueError("dense.indexer must have q_proj and k_proj nn.Linear layers (MiniMax-M3's indexer)")
    index_head_dim = k_proj.out_features
    index_heads = _positive_int(getattr(indexer, "num_heads", None)) or q_proj.out_features // index_head_dim
    if index_heads != num_kv_heads or q_proj.out_features != index_heads * index_head_dim:
        raise ValueError(f"dense.indexer has {index_heads} index query heads of dim {index_head_dim} "
                         f"(q_proj {q_proj.out_features} outputs); this layer has one per KV group ({num_kv_heads})")
    if q_proj.in_features != hidden_size or k_proj.in_features != hidden_size:
        raise ValueError(f"dense.indexer's projections must read the {hidden_size} hidden dims")
    local_blocks = _positive_int(getattr(indexer, "local_blocks", 1))
    if local_blocks is None:
        raise ValueError(f"dense.indexer.local_blocks must be a positive int, got {indexer.local_blocks!r}")
    block_size, topk = _positive_int(getattr(indexer, "block_size", None)), _positive_int(
        getattr(indexer, "topk_blocks", None))
    if block_size is None or topk is None:
        raise ValueError("dense.indexer must say its block_size and topk_blocks")
    norms = {name: getattr(indexer, name, None) for name in ("q_norm", "k_norm")}
    if (norms["q_norm"] is None) != (norms["k_norm"] is None):
        raise ValueError("dense.indexer has only one of q_norm / k_norm; this layer normalises both or neither")
    index_norms = {f"index_{name}": _read_rms_norm(norm, index_head_dim, f"dense.indexer.{name}")
                   for name, norm in norms.items() if norm is not None}
    projections = dict(index_q_proj=q_proj, index_k_proj=k_proj)
    return projections, index_norms, dict(index_head_dim=index_head_dim, block_size=block_size, topk=topk,
                                          local_blocks=local_blocks)
