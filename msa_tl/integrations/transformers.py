"""MSA in transformers (>= 5.24) models, on tensors laid out [batch, seq, heads, dim].

MiniMax-M3 on the MSA ops (the same attention, no dense mask)::

    use_msa_kernels(model)                  # every MiniMaxM3VLAttention with an indexer
    model.generate(ids, max_new_tokens=64, cache=msa_cache(model, batch_size=ids.shape[0], max_seq=4096))

Llama / Qwen2 / Qwen3 / Mistral converted to MSA (continued pre-training, as the MSA paper's MSA-CPT)::

    convert_to_msa(model, block_size=128, topk=16)  # "warmup": the model's own (dense) attention + an indexer
    loss = lm_loss + sum(kl_losses(model))         # in training mode; the KL trains the index projections only
    set_msa_mode(model, "sparse")                  # attend over the chosen blocks
    model.save_pretrained(path)
    model = load_msa_model(Qwen3ForCausalLM, path)

The converted attention modules keep their class's parameters and names (MSA adds ``index_q_proj`` /
``index_k_proj`` to the Llama family) and swap their ``__class__`` to a subclass whose ``forward`` runs the MSA
ops. MSA's blocks are token slots: token t of a row (cached ones included) is at position t. Padding (left,
right or packed sequences) cannot be expressed, and an ``attention_mask`` that hides keys is refused;
``position_ids`` are not read (transformers derives them, and RoPE's cos / sin, from the slots when nothing is
padded). MiniMax-M3's layers compute no KL loss (their indexer is trained already).

Caches: MSA layers keep K, V and the index keys in an :class:`~msa_tl.ops.cache.MSACache`, wrapped in a
:class:`MSACacheLayer` of a transformers ``DynamicCache`` (:func:`msa_cache`); the model's other layers keep
their usual cache layers. A plain transformers cache holds no index keys: an MSA layer accepts one for a prefill
(it stores K and V there as the original layer would) and refuses to decode from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import CacheLayerMixin, DynamicCache
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLAttention
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from msa_tl.ops.cache import MSACache
from msa_tl.ops.functional import kl_alignment_loss, msa_attention, msa_decode
from msa_tl.ops.layer import apply_rotary
from msa_tl.ops.varlen import dense_packed, max_document_length
from msa_tl.ops.validation import check_options

__all__ = [
    "MSACacheLayer",
    "MiniMaxM3MSAAttention",
    "MSALlamaAttention",
    "MSAQwen2Attention",
    "MSAQwen3Attention",
    "MSAMistralAttention",
    "msa_cache",
    "use_msa_kernels",
    "convert_to_msa",
    "set_msa_mode",
    "kl_losses",
    "msa_model_class",
    "load_msa_model",
]

MODES = ("warmup", "sparse")


class MSACacheLayer(CacheLayerMixin):
    """A transformers cache layer holding one MSA layer's :class:`~msa_tl.ops.cache.MSACache` (``msa``).

    The MSA attention forwards of this module append each chunk's k, v [B, S, G, D] and index keys [B, S, Di]
    to ``msa`` (post-norm, post-RoPE) and attend over it; transformers asks the layer only for lengths, and
    ``crop`` / ``reset`` roll it back. ``keys`` / ``values`` stay None: the tensors live in ``msa``.
    """

    is_croppable = True
    supports_early_init = False  # preallocated by msa_cache

    def __init__(self, msa: MSACache):
        super().__init__()
        self.msa = msa
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("this cache layer holds an MSACache, which only MSA attention writes: convert the model's "
                        "attention first (use_msa_kernels / convert_to_msa)")

    lazy_initialization = update  # abstract in CacheLayerMixin; only transformers' own attention would call it

    def get_seq_length(self) -> int:
        """Tokens cached (every row holds as many)."""
        return self.msa.lengths[0]

    def get_max_length(self) -> int:
        return self.msa.capacity

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask transformers builds for ``query_length`` new tokens."""
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest ``-tokens_to_remove`` tokens (transformers passes a count <= 0)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the negative number of tokens to remove, got {tokens_to_remove}")
        self.msa.truncate(self.get_seq_length() + tokens_to_remove)

    def reset(self) -> None:
        """Empty the cache, keeping its memory for the next sequence."""
        self.msa.truncate(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("an MSACacheLayer cannot reorder its rows (beam search); use greedy or sampling")



def msa_cache(model: nn.Module, batch_size: int, max_seq: int, device=None, dtype=None) -> DynamicCache:
    """A transformers cache for ``model``'s forward / ``generate(..., cache=...)``: an :class:`MSACacheLayer` for
    each MSA attention layer (an ``MSACache.contiguous`` of ``batch_size`` rows of ``max_seq`` tokens, pages of
    one MSA block), the usual ``DynamicCache`` layers for the others (MiniMax-M3's full-attention layers).

    ``device`` / ``dtype`` default to each layer's ``q_proj.weight``'s. ``max_seq`` bounds prompt plus new tokens.
    """
    if any(_is_m3_sparse(m) for m in model.modules()):
        raise ValueError("model has MiniMax-M3 sparse attention that does not run MSA yet: call use_msa_kernels(model) "
                         "first")
    layers = [m for m in model.modules() if isinstance(m, _MSAAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MSA attention: call use_msa_kernels or convert_to_msa first")
    cache = DynamicCache(config=model.config)
    for module in layers:
        weight = module.q_proj.weight
        options = module._msa_options()
        msa = MSACache.contiguous(batch_size, max_seq, module.config.num_key_value_heads, module.head_dim,
                                  options["index_dim"], page_size=options["block_size"],
                                  dtype=weight.dtype if dtype is None else dtype,
                                  device=weight.device if device is None else device)
        cache.layers[module.layer_idx] = MSACacheLayer(msa)
    return cache


class _MSAAttention:
    """The part of the MSA attention subclasses that attends: prefill, cached decode and the KL loss.

    Subclasses give ``_msa_options()``: dict(index_dim, block_size, topk, local_blocks, index_scale).
    """

    def _msa_attend(self, q, k, v, q_idx, k_idx, cache, *, dense: bool, with_kl: bool, packed=None):
        """Attention of the S new tokens: q [B, S, Hq, D], k / v [B, S, G, D], q_idx [B, S, G, Di], k_idx
        [B, S, 1, Di] (post-norm, post-RoPE, contiguous) -> (o [B, S, Hq, D], KL loss or None).

        With ``cache`` the chunk is appended to this layer's cache; it is a prefill (the whole sequence is here)
        when the cache held nothing, else the new tokens attend over everything cached. ``dense``: causal softmax
        over all visible tokens instead of the chosen blocks. ``with_kl``: the KL alignment loss of a prefill
        (over the chosen tokens, or all visible ones when dense); None for a decode step. ``packed``: (cu_seqlens,
        max_seqlen) of documents packed into one row (:func:`_packed_documents`), each attended on its own.
        """
        options = self._msa_options()
        if packed is not None:
            return self._msa_attend_packed(q, k, v, q_idx, k_idx, *packed, options, dense=dense, with_kl=with_kl)
        layer = cache.layers[self.layer_idx] if cache is not None and self.layer_idx < len(cache.layers) else None
        if isinstance(layer, MSACacheLayer):
            prefill = layer.get_seq_length() == 0
            layer.msa.append(k, v, k_idx)
            if not prefill:
                if dense:
                    return _dense_attention(q, *_cached_kv(layer.msa), self.scaling), None
                return msa_decode(q, q_idx, layer.msa, block_size=options["block_size"], topk=options["topk"],
                                  scale=self.scaling, index_scale=options["index_scale"],
                                  local_blocks=options["local_blocks"]), None
        elif cache is not None:
            if cache.get_seq_length(self.layer_idx) > 0:
                raise ValueError(f"layer {self.layer_idx} runs MSA, but its cache layer is a "
                                 f"{type(layer).__name__}, which holds no index keys: pass "
                                 f"cache=msa_cache(model, batch_size, max_seq) to the model or to generate")
            # K and V where the original layer keeps them, so that a decode step from this cache is caught above
            cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
        if dense:
            o, indices, lse = _dense_attention(q, k, v, self.scaling), None, None
        else:
            o, lse, indices = msa_attention(q, k, v, q_idx, k_idx, block_size=options["block_size"],
                                            topk=options["topk"], scale=self.scaling,
                                            index_scale=options["index_scale"], local_blocks=options["local_blocks"],
                                            return_lse=True, return_indices=True)
        if not with_kl:
            return o, None
        return o, kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=options["block_size"],
                                    scale=self.scaling, index_scale=options["index_scale"], lse=lse)


    def _msa_attend_packed(self, q, k, v, q_idx, k_idx, cu_seqlens, max_seqlen, options, *, dense, with_kl):
        """:meth:`_msa_attend` of documents packed into one row (no cache)."""
        packing = dict(block_size=options["block_size"], scale=self.scaling, index_scale=options["index_scale"],
                       cu_seqlens=cu_seqlens)
        if dense:
            max_seqlen = max_seqlen or max_document_length(cu_seqlens)
            o, indices, lse = dense_packed(q, k, v, cu_seqlens, max_seqlen, self.scaling), None, None
        else:
            o, lse, indices = msa_attention(q, k, v, q_idx, k_idx, topk=options["topk"],
                                            local_blocks=options["local_blocks"], return_lse=True,
                                            return_indices=True, **packing)
        if not with_kl:
            return o, None
        return o, kl_alignment_loss(q, k, q_idx, k_idx, indices, lse=lse, max_seqlen=max_seqlen, **packing)


def _packed_documents(kwargs: dict, batch: int, cache) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens int32 [num_docs + 1], max_seqlen) when transformers passes packed documents the way its
    FlashAttention path takes them (``cu_seq_lens_q`` / ``max_length_q``, as ``DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)`` makes them), else None. Read from the kwargs alone: no host sync."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        return None
    if batch != 1 or cache is not None and cache.get_seq_length() > 0:
        raise ValueError("packed documents (cu_seq_lens_q) come as one row with no cached tokens")
    if kwargs.get("cu_seq_lens_k") is not None and not torch.equal(kwargs["cu_seq_lens_k"], cu_seqlens):
        raise ValueError("packed documents attend to themselves: cu_seq_lens_k must equal cu_seq_lens_q")
    max_seqlen = kwargs.get("max_length_q")
    return cu_seqlens.to(torch.int32), None if max_seqlen is None else int(max_seqlen)


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention of the last S of n tokens: q [B, S, Hq, D], k / v [B, n, G, D] -> [B, S, Hq, D]."""
    S, n = q.shape[1], k.shape[1]
    mask = None
    if S != n:  # is_causal aligns the queries to the first keys; these are the last n - S .. n - 1
        mask = torch.arange(n, device=q.device) <= torch.arange(n - S, n, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                          is_causal=mask is None, scale=scale, enable_gqa=True).transpose(1, 2)


def _cached_kv(msa: MSACache) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached k, v as [B, n, G, D] each (n tokens in every row)."""
    n = msa.lengths[0]
    pages = msa.block_table[:, : -(-n // msa.page_size)].long()
    return tuple(x[pages].flatten(1, 2)[:, :n] for x in (msa.k, msa.v))


def _check_attention_mask(attention_mask) -> None:
    """Refuse a mask that hides any key from the newest query: padding, which MSA's slot positions cannot express.

    The mask transformers passes is None, [B, 1, S, K] (bool: True attends; float: 0 attends) or [B, K] (1 / True
    attends). A causal mask lets the newest query see every key, so its row alone is checked.
    """
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
        raise ValueError(f"MSA attention takes an attention_mask that is None, [batch, 1, query, key] or "
                         f"[batch, key], got {type(attention_mask).__name__} "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    if attention_mask.dim() == 2:
        visible = attention_mask.bool()
    else:
        last = attention_mask[:, :, -1]
        visible = last if last.dtype == torch.bool else last == 0
    if not bool(visible.all()):
        raise ValueError("attention_mask hides keys from the newest query (padding or packed sequences): MSA places "
                         "token t at position t of its row, so run unpadded rows (batch equal lengths together)")


# --------------------------------------------------------------------------------------------- MiniMax-M3


class MiniMaxM3MSAAttention(_MSAAttention, MiniMaxM3VLAttention):
    """A MiniMax-M3 sparse attention layer (``MiniMaxM3VLAttention`` with an ``indexer``) on the MSA ops.

    Same parameters and math as transformers' eager path: q / k / v projections, Gemma q_norm / k_norm per head,
    the model's partial RoPE on the first rot dims; the indexer's projections, norms and RoPE (rot <= Di) give
    q_idx [B, S, G, Di] and a shared k_idx [B, S, 1, Di]; a query attends over the ``index_topk_blocks`` blocks of
    ``index_block_size`` keys its group's raw index score (scale 1) ranks highest, the ``index_local_blocks``
    newest forced. No attention weights are returned.
    """

    def _msa_options(self) -> dict:
        indexer = self.indexer
        return dict(index_dim=indexer.head_dim, block_size=indexer.block_size, topk=indexer.topk_blocks,
                    local_blocks=indexer.local_blocks, index_scale=1.0)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        """hidden_states [B, S, hidden]; position_embeddings (cos, sin) [B or 1, S, rot] of the S tokens (the
        last S when ``cache`` holds earlier ones) -> (output [B, S, hidden], None). Packed documents come as
        transformers' FlashAttention kwargs (:func:`_packed_documents`); their mask, if any, is the documents'."""
        B, S, _ = hidden_states.shape
        packed = _packed_documents(kwargs, B, cache)
        if packed is None:
            _check_attention_mask(attention_mask)
        cos, sin = position_embeddings
        indexer = self.indexer
        if cos.shape[-1] > indexer.head_dim:
            raise ValueError(f"RoPE rotates {cos.shape[-1]} dims, more than the indexer's {indexer.head_dim}: "
                             f"transformers then rotates the index heads with mismatched frequencies, which MSA "
                             f"does not reproduce")
        shape = (B, S, -1, self.head_dim)
        q = apply_rotary(self.q_norm(self.q_proj(hidden_states).view(shape)), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(hidden_states).view(shape)), cos, sin)
        v = self.v_proj(hidden_states).view(shape)
        q_idx = indexer.q_norm(indexer.q_proj(hidden_states).view(B, S, -1, indexer.head_dim))
        k_idx = indexer.k_norm(indexer.k_proj(hidden_states).view(B, S, 1, indexer.head_dim))
        q_idx, k_idx = apply_rotary(q_idx, cos, sin), apply_rotary(k_idx, cos, sin)
        o, _ = self._msa_attend(q, k, v, q_idx, k_idx, cache, dense=False, with_kl=False, packed=packed)
        return self.o_proj(o.reshape(B, S, -1)), None


def _is_m3_sparse(module: nn.Module) -> bool:
    return type(module) is MiniMaxM3VLAttention and module.indexer is not None


def use_msa_kernels(model: nn.Module) -> nn.Module:
    """Run every MiniMax-M3 sparse attention layer of ``model`` (a ``MiniMaxM3VLForCausalLM``, or anything holding
    ``MiniMaxM3VLAttention`` modules with an indexer) on the MSA ops, in place; returns ``model``.

    The modules keep their parameters (``save_pretrained`` / ``from_pretrained`` with transformers' own classes
    still round-trip) and become :class:`MiniMaxM3MSAAttention`. Full-attention layers are left as they are.
    For cached decoding pass ``cache=msa_cache(model, ...)``. Refuses index heads other than one per KV head,
    block sizes / top-k the ops do not support, and attention dropout.
    """
    layers = [m for m in model.modules() if _is_m3_sparse(m)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MiniMax-M3 sparse attention to convert (MiniMaxM3VLAttention "
                         f"with an indexer)")
    for module in layers:
        indexer = module.indexer
        if indexer.num_heads != module.config.num_key_value_heads:
            raise ValueError(f"layer {module.layer_idx} has {indexer.num_heads} index heads for "
                             f"{module.config.num_key_value_heads} KV heads: MSA has one index head per KV head")
        check_options(block_size=indexer.block_size, topk=indexer.topk_blocks, local_blocks=indexer.local_blocks)
        _check_no_dropout(module)
    for module in layers:
        module.__class__ = MiniMaxM3MSAAttention
    return model


def _check_no_dropout(module: nn.Module) -> None:
    if module.attention_dropout:
        raise ValueError(f"layer {module.layer_idx} has attention_dropout={module.attention_dropout}; MSA attention "
                         f"has no dropout (set config.attention_dropout = 0.0)")


# --------------------------------------------------------------------------------- Llama / Qwen2 / Qwen3 / Mistral


class _ConvertedAttention(_MSAAttention):
    """A Llama-family attention layer with an MSA index branch (:func:`convert_to_msa`).

    Main branch exactly as the original: q / k / v projections (biases as configured), Qwen3's q_norm / k_norm,
    RoPE from ``position_embeddings``. Index branch, from the hidden states with gradients stopped:
    ``index_q_proj`` gives q_idx [B, S, G, Di] (one head per KV head), ``index_k_proj`` k_idx [B, S, 1, Di];
    RoPE with the same (cos, sin) on their first rot dims when rot <= Di, else on all Di dims with the Di / 2
    highest of the model's frequencies. Index score scale 1/sqrt(Di).

    ``msa_options["mode"]``: "warmup" attends densely (the original layer's output) and "sparse" over the chosen
    blocks. In training mode a forward over a whole sequence stores the KL alignment loss in ``msa_kl_loss``
    (over all visible tokens in warmup, the chosen ones when sparse), else None; it reaches the index projections
    only. Sliding-window layers run while the sequence fits in the window (then their attention is causal).
    """

    msa_options: dict
    msa_kl_loss: torch.Tensor | None

    def _msa_options(self) -> dict:
        options = self.msa_options
        return dict(index_dim=options["index_head_dim"], block_size=options["block_size"], topk=options["topk"],
                    local_blocks=options["local_blocks"], index_scale=None)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        """hidden_states [B, S, hidden]; position_embeddings (cos, sin) [B or 1, S, head_dim] of the S tokens
        (the last S when ``cache`` holds earlier ones) -> (output [B, S, hidden], None). Packed documents come as
        transformers' FlashAttention kwargs (:func:`_packed_documents`); their mask, if any, is the documents'."""
        self.msa_kl_loss = None
        if position_embeddings is None:
            raise ValueError("MSA attention needs the model's position_embeddings (cos, sin)")
        B, S, _ = hidden_states.shape
        # Qwen2 / Qwen3 set a window per layer, Mistral one for all in its config
        window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        packed = _packed_documents(kwargs, B, cache)
        if window is not None:
            length = S + (cache.get_seq_length(self.layer_idx) if cache is not None else 0)
            if packed is not None:  # each document must fit in the window
                length = packed[1] if packed[1] is not None else max_document_length(packed[0])
            if length > window:
                raise ValueError(f"layer {self.layer_idx} slides a window of {window} tokens over a sequence of "
                                 f"{length}; MSA expresses only causal attention (sequences within the window)")
        if packed is None:
            _check_attention_mask(attention_mask)
        shape = (B, S, -1, self.head_dim)
        q, k = self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        index_dim = self.msa_options["index_head_dim"]
        detached = hidden_states.detach()  # the KL trains the index projections alone, not the layers below
        q_idx = self.index_q_proj(detached).view(B, S, -1, index_dim)
        k_idx = self.index_k_proj(detached).view(B, S, 1, index_dim)
        if cos.shape[-1] > index_dim:
            half = index_dim // 2
            cos, sin = torch.cat([cos[..., :half]] * 2, -1), torch.cat([sin[..., :half]] * 2, -1)
        q_idx, k_idx = apply_rotary(q_idx, cos, sin), apply_rotary(k_idx, cos, sin)
        dense = self.msa_options["mode"] == "warmup"
        o, self.msa_kl_loss = self._msa_attend(q, k, v, q_idx, k_idx, cache, dense=dense, with_kl=self.training,
                                               packed=packed)
        return self.o_proj(o.reshape(B, S, -1)), None


class MSALlamaAttention(_ConvertedAttention, LlamaAttention):
    __doc__ = _ConvertedAttention.__doc__


class MSAQwen2Attention(_ConvertedAttention, Qwen2Attention):
    __doc__ = _ConvertedAttention.__doc__


class MSAQwen3Attention(_ConvertedAttention, Qwen3Attention):
    __doc__ = _ConvertedAttention.__doc__


class MSAMistralAttention(_ConvertedAttention, MistralAttention):
    __doc__ = _ConvertedAttention.__doc__


_CONVERTED = {LlamaAttention: MSALlamaAttention, Qwen2Attention: MSAQwen2Attention,
              Qwen3Attention: MSAQwen3Attention, MistralAttention: MSAMistralAttention}


def convert_to_msa(model: nn.Module, *, index_head_dim: int | None = None, block_size: int = 128, topk: int = 16,
                   local_blocks: int = 1, mode: str = "warmup") -> nn.Module:
    """Give every Llama / Qwen2 / Qwen3 / Mistral attention layer of ``model`` an MSA index branch, in place;
    returns ``model``.

    Each layer gains ``index_q_proj`` (Linear(hidden, G * Di), no bias) and ``index_k_proj`` (Linear(hidden, Di),
    no bias), default-initialised on the layer's device and dtype (Di = ``index_head_dim``, default head_dim),
    and becomes the ``MSA*Attention`` subclass of its class (see :class:`MSALlamaAttention`). ``block_size``,
    ``topk`` and ``local_blocks`` are the selection's (:func:`msa_tl.ops.select_blocks`); ``mode`` "warmup"
    keeps the dense attention, "sparse" attends over the chosen blocks (:func:`set_msa_mode`). The options go to
    ``model.config.msa`` so that :func:`load_msa_model` rebuilds the model from ``save_pretrained``'s output.
    Refuses attention dropout; sliding-window layers are accepted and refuse sequences longer than the window.
    """
    check_options(block_size=block_size, topk=topk, local_blocks=local_blocks)
    _check_mode(mode)
    layers = [m for m in model.modules() if type(m) in _CONVERTED]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no unconverted Llama / Qwen2 / Qwen3 / Mistral attention")
    index_head_dim = layers[0].head_dim if index_head_dim is None else index_head_dim
    if not isinstance(index_head_dim, int) or isinstance(index_head_dim, bool) or index_head_dim < 1:
        raise ValueError(f"index_head_dim must be a positive int, got {index_head_dim!r}")
    for module in layers:
        _check_no_dropout(module)
    options = dict(index_head_dim=index_head_dim, block_size=block_size, topk=topk, local_blocks=local_blocks,
                   mode=mode)
    for module in layers:
        weight = module.q_proj.weight
        factory = dict(bias=False, device=weight.device, dtype=weight.dtype)
        hidden = module.q_proj.in_features
        module.index_q_proj = nn.Linear(hidden, module.config.num_key_value_heads * index_head_dim, **factory)
        module.index_k_proj = nn.Linear(hidden, index_head_dim, **factory)
        module.msa_options, module.msa_kl_loss = dict(options), None
        module.__class__ = _CONVERTED[type(module)]
    model.config.msa = dict(options)
    return model


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _converted_layers(model: nn.Module) -> list[_ConvertedAttention]:
    layers = [m for m in model.modules() if isinstance(m, _ConvertedAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MSA-converted attention: call convert_to_msa first")
    return layers


def set_msa_mode(model: nn.Module, mode: str) -> None:
    """Switch every converted layer (and ``model.config.msa``) to ``"warmup"`` or ``"sparse"``."""
    _check_mode(mode)
    for module in _converted_layers(model):
        module.msa_options["mode"] = mode
    model.config.msa["mode"] = mode


def kl_losses(model: nn.Module) -> list[torch.Tensor]:
    """The KL alignment losses (float32 scalars) of the last forward, one per converted layer; empty after a forward
    in eval mode or a decode step. Add their sum to the training loss: it reaches the index projections only."""
    return [m.msa_kl_loss for m in _converted_layers(model) if m.msa_kl_loss is not None]


_MSA_MODEL_CLASSES: dict[type, type] = {}


def msa_model_class(model_class: type) -> type:
    """The subclass of ``model_class`` (e.g. ``Qwen3ForCausalLM``) that converts itself per ``config.msa`` in
    ``__init__``: its ``from_pretrained`` loads :func:`convert_to_msa`'d checkpoints with no missing or unexpected
    keys, and a plain checkpoint given ``config=`` with ``msa`` options (``convert_to_msa``'s keyword arguments),
    its index projections then newly initialised (normal, std ``config.initializer_range``)."""
    if model_class not in _MSA_MODEL_CLASSES:

        def __init__(self, config, *args, **kwargs):
            options = getattr(config, "msa", None)
            if not isinstance(options, dict):
                raise ValueError("config has no msa options (config.msa): load the model with its own class and call "
                                 "convert_to_msa")
            model_class.__init__(self, config, *args, **kwargs)
            convert_to_msa(self, **options)

        _MSA_MODEL_CLASSES[model_class] = type(f"MSA{model_class.__name__}", (model_class,),
                                               {"__init__": __init__, "__module__": __name__})
    return _MSA_MODEL_CLASSES[model_class]


def load_msa_model(model_class: type, path, **kwargs) -> nn.Module:
    """``model_class.from_pretrained(path, **kwargs)`` for a checkpoint saved after :func:`convert_to_msa`, converted
    again with its ``config.msa`` options (mode included) and its index projections loaded."""
    return msa_model_class(model_class).from_pretrained(path, **kwargs)
