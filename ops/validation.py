"""Input checks for the public API: every bad argument gets a TypeError or ValueError that names it."""

from __future__ import annotations

import math

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
REFERENCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
BLOCK_SIZES = (16, 32, 64, 128, 256)
MAX_TOPK = 64


def _tensor(name: str, x, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dim() != shape_doc.count(",") + 1:
        raise ValueError(f"{name} must be {shape_doc}, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {x.stride()}")
    return x


def _same_device_and_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    allowed = KERNEL_DTYPES if ref.device.type == "cuda" else REFERENCE_DTYPES
    if ref.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{ref_name} has dtype {ref.dtype}; on {ref.device.type} MSA takes {names}")
    for name, x in others.items():
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; they must match")


_UNSET = object()


def check_options(block_size=None, topk=None, local_blocks=_UNSET, **scales) -> None:
    if block_size is not None and (not isinstance(block_size, int) or block_size not in BLOCK_SIZES):
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= MAX_TOPK):
        raise ValueError(f"topk must be an int in [1, {MAX_TOPK}], got {topk!r}")
    if local_blocks is not _UNSET and (not isinstance(local_blocks, int) or isinstance(local_blocks, bool)
                                       or not 1 <= local_blocks <= (MAX_TOPK if topk is None else topk)):
        raise ValueError(f"local_blocks must be an int in [1, topk = {topk}], got {local_blocks!r}")
    for name, value in scales.items():
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be None or a positive finite number, got {value!r}")


def check_query_start(query_start) -> int:
    """The position of the first query (an int >= 0)."""
    if not isinstance(query_start, int) or isinstance(query_start, bool) or query_start < 0:
        raise ValueError(f"query_start must be an int >= 0, got {query_start!r}")
    return query_start


def check_attention_inputs(q, k, v, query_start: int = 0) -> None:
    """q [B, N, Hq, D], k/v [B, query_start + N, G, D] with Hq divisible by G."""
    _tensor("q", q, "[batch, seq, heads, dim]")
    _tensor("k", k, "[batch, seq, kv_heads, dim]")
    _tensor("v", v, "[batch, seq, kv_heads, dim]")
    _same_device_and_dtype("q", q, k=k, v=v)
    B, N, Hq, D = q.shape
    keys = (B, query_start + N)
    if k.shape[:2] != keys or v.shape[:2] != keys:
        if query_start == 0:
            raise ValueError(f"q, k, v must share [batch, seq]: got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)}")
        raise ValueError(f"k and v must hold the {query_start + N} tokens up to the last query (query_start "
                         f"{query_start} + {N} queries): got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if N < 1 or B < 1:
        raise ValueError(f"q must have batch >= 1 and seq >= 1, got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if D < 1:
        raise ValueError(f"q must have head dim >= 1, got shape {tuple(q.shape)}")
    if k.shape[-1] != D:
        raise ValueError(f"k head dim {k.shape[-1]} differs from q head dim {D}")
    G = k.shape[2]
    if G < 1 or Hq % G != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({G})")


def check_index_inputs(q_idx, k_idx, *, batch=None, seq=None, groups=None, like=None,
                       query_start: int = 0) -> torch.Tensor:
    """q_idx [B, N, G, Di], k_idx [B, query_start + N, Di] (or [B, query_start + N, 1, Di]); returns k_idx as
    [B, query_start + N, Di]. ``like`` (q): the index tensors must share its device and dtype."""
    _tensor("q_idx", q_idx, "[batch, seq, kv_heads, index_dim]")
    if isinstance(k_idx, torch.Tensor) and k_idx.dim() == 4:
        if k_idx.shape[2] != 1:
            raise ValueError(f"k_idx has one head shared by all groups: expected [batch, seq, 1, index_dim], got {tuple(k_idx.shape)}")
        k_idx = k_idx.squeeze(2)
    _tensor("k_idx", k_idx, "[batch, seq, index_dim]")
    if like is not None:
        _same_device_and_dtype("q", like, q_idx=q_idx, k_idx=k_idx)
    _same_device_and_dtype("q_idx", q_idx, k_idx=k_idx)
    B, N, G, Di = q_idx.shape
    if Di < 1:
        raise ValueError(f"q_idx must have index dim >= 1, got shape {tuple(q_idx.shape)}")
    if k_idx.shape != (B, query_start + N, Di):
        what = "" if query_start == 0 else f" (the tokens up to the last query: query_start {query_start} + {N})"
        raise ValueError(f"k_idx must be [batch, seq, index_dim] = {(B, query_start + N, Di)}{what} to match q_idx "
                         f"{tuple(q_idx.shape)}, got {tuple(k_idx.shape)}")
    if N < 1 or B < 1:
        raise ValueError(f"q_idx must have batch >= 1 and seq >= 1, got shape {tuple(q_idx.shape)}")
    if batch is not None and (B, N) != (batch, seq):
        raise ValueError(f"q_idx [batch, seq] = {(B, N)} differs from q's {(batch, seq)}")
    if groups is not None and G != groups:
        raise ValueError(f"q_idx has {G} heads but there are {groups} kv heads: one index head per group")
    return k_idx


def check_decode_inputs(q, q_idx, cache) -> None:
    """q [B, S, Hq, D] and q_idx [B, S, G, Di] of the newest S tokens of the rows of ``cache`` (an MSACache with
    q's dtype and device, its G, D and Di, B rows each holding >= S tokens: host lengths, no device sync)."""
    from msa_tl.ops.cache import MSACache

    if not isinstance(cache, MSACache):
        raise TypeError(f"cache must be an msa_tl.ops.cache.MSACache, got {type(cache).__name__}")
    _tensor("q", q, "[batch, queries, heads, dim]")
    _tensor("q_idx", q_idx, "[batch, queries, kv_heads, index_dim]")
    _same_device_and_dtype("q", q, q_idx=q_idx, cache_k=cache.k)
    B, S, Hq, D = q.shape
    G, Di = cache.k.shape[2], cache.k_idx.shape[2]
    if B != len(cache.lengths) or S < 1:
        raise ValueError(f"q must be [{len(cache.lengths)} cache rows, queries >= 1, heads, dim], got {tuple(q.shape)}")
    if D != cache.k.shape[3] or Hq % G:
        raise ValueError(f"q {tuple(q.shape)} must have the cache's head dim {cache.k.shape[3]} and a multiple of its "
                         f"{G} kv heads")
    if q_idx.shape != (B, S, G, Di):
        raise ValueError(f"q_idx must be {(B, S, G, Di)} (one index head per kv head, the cache's index dim), "
                         f"got {tuple(q_idx.shape)}")
    if S > min(cache.lengths):
        raise ValueError(f"{S} queries need their tokens in the cache, but a row holds {min(cache.lengths)}: "
                         f"append them first")


def check_indices(indices, *, batch, seq, groups, device) -> None:
    """indices [B, N, G, topk] int32 (values are not read back: that would sync the GPU)."""
    _tensor("indices", indices, "[batch, seq, kv_heads, topk]")
    if indices.dtype != torch.int32:
        raise TypeError(f"indices must be int32, got {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"indices is on {indices.device} but q is on {device}")
    if indices.shape[:3] != (batch, seq, groups):
        raise ValueError(f"indices must be [batch, seq, kv_heads, topk] with {(batch, seq, groups)} leading, got {tuple(indices.shape)}")
    check_options(topk=indices.shape[3])


def check_lse(lse, *, shape, device) -> None:
    """lse [B, N, Hq] float32, the main branch's log-sum-exp."""
    _tensor("lse", lse, "[batch, seq, heads]")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32 (as sparse_attention returns it), got {lse.dtype}")
    if lse.device != device:
        raise ValueError(f"lse is on {lse.device} but q is on {device}")
    if lse.shape != tuple(shape):
        raise ValueError(f"lse must be [batch, seq, heads] = {tuple(shape)}, got {tuple(lse.shape)}")


def canonical_indices(indices: torch.Tensor, block_size: int, query_start: int = 0) -> torch.Tensor:
    """The indices contract: indices [B, N, G, topk] int32 -> the same block sets, in the form the kernels need.

    Query t's slots are read as a set of blocks it may see: an id outside ``0 .. t // block_size`` (a block
    in the query's future, an id past the last block) is ignored like -1, and an id given twice counts once.
    Returns the ids in descending order with repeats replaced by -1 (so -1 may sit in any slot). Runs on the
    indices' device without a host sync (one sort per row); the index kernels' own selection is already canonical.
    """
    N = indices.shape[1]  # queries query_start .. query_start + N - 1
    own_block = torch.div(torch.arange(query_start, query_start + N, device=indices.device, dtype=torch.int32),
                          block_size, rounding_mode="floor").view(1, N, 1, 1)
    return distinct_descending(torch.where((indices >= 0) & (indices <= own_block), indices, -1))


def distinct_descending(ids: torch.Tensor) -> torch.Tensor:
    """Each row's slots [..., topk] sorted descending with repeats replaced by -1 (the kernels' canonical form)."""
    ids = ids.sort(dim=-1, descending=True).values
    repeat = torch.cat([torch.zeros_like(ids[..., :1], dtype=torch.bool), ids[..., 1:] == ids[..., :-1]], dim=-1)
    return torch.where(repeat, -1, ids)

