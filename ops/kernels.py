"""Registers the TileLang kernels with the dispatcher (importing tilelang only when one first runs)."""

import os

import torch

from msa_tl.ops.dispatch import register_kernel

INDEX_GROUPS = (1, 2, 4, 8, 16, 32, 64)  # powers of 2 tile the select's 128-row CTAs with whole tokens
INDEX_DIMS = (64, 128)
INDEX_BLOCK_SIZES = (64, 128)


def is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _first_limit(*limits):
    """The first limit that applies (a string saying which), or None: the kernel runs the call."""
    return next((limit for limit in limits if limit), None)


def _device_limit(device, dtype):
    return _first_limit(not is_hopper(device) and f"a {device.type} device, not a Hopper GPU",
                        dtype not in (torch.bfloat16, torch.float16) and f"{dtype} inputs (bfloat16 / float16 only)")


# The forward, backward and KL kernels' head dims. Above 128 the attention stages run each block as its 64-key
# halves (split_blocks) and the backward computes dQ, dK and dV in two column halves; the KL reads D only in the
# teacher's scores.
HEAD_DIMS = (64, 128, 256)
Q_OUTER_HEAD_DIMS = (64, 128)  # the Q-outer forward (MSA_TL_ATTENTION_PATH=q_outer)


def next_supported(value: int, supported: tuple) -> int:
    """The smallest of the kernels' ``supported`` sizes (ascending) that holds ``value``: 96 -> 128, 7 -> 8."""
    return next(s for s in supported if s >= value)


def padded_dim(dim: int, dims=HEAD_DIMS) -> int:
    """The kernels' head dim for ``dim`` <= max(dims): the next one of ``dims`` (80, 96, 112 -> 128)."""
    return next_supported(dim, dims)


def pad_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x [..., d] -> [..., dim] with zeros: dot products, and so scores, softmax and outputs, are unchanged."""
    return x if x.shape[-1] == dim else torch.nn.functional.pad(x, (0, dim - x.shape[-1]))


def unpad_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of :func:`pad_dim`, contiguous."""
    return x if x.shape[-1] == dim else x[..., :dim].contiguous()


def pad_queries(x: torch.Tensor, query_start: int, value: float = 0.0) -> torch.Tensor:
    """x [B, C, *rest] of queries query_start .. -> [B, query_start + C, *rest] with ``value`` rows before them.

    Only the Q-outer attention (``MSA_TL_ATTENTION_PATH=q_outer``) reads a query's rows at its position in the keys'
    sequence; there queries at an offset run as the tail of a row as long as the keys (the rows before them cost
    memory, no work: their indices are -1). The KV-outer forward and backward, the KL and the selects read and
    write the query side at the offset itself.
    """
    if query_start == 0:
        return x
    out = x.new_full((x.shape[0], query_start + x.shape[1], *x.shape[2:]), value)
    out[:, query_start:] = x
    return out


def unpad_queries(x: torch.Tensor, query_start: int) -> torch.Tensor:
    """The inverse of :func:`pad_queries`, contiguous."""
    return x if query_start == 0 else x[:, query_start:].contiguous()


TILE_HEADS = (1, 2, 4, 8, 16, 32, 64)  # heads per group that tile a consumer's 64 rows with whole queries


def padded_heads(heads_per_group: int) -> int:
    """The kernels' heads per group for a GQA ratio: the next divisor of 64 (7 -> 8, 12 -> 16, 24 -> 32)."""
    return next_supported(heads_per_group, TILE_HEADS)


def pad_heads(x: torch.Tensor, groups: int, padded: int, value: float = 0.0) -> torch.Tensor:
    """x [B, N, G*R, *rest] -> [B, N, G*padded, *rest]: each group's R heads, then ``value`` heads."""
    B, N, Hq, *rest = x.shape
    R = Hq // groups
    if R == padded:
        return x
    out = x.new_full((B, N, groups, padded, *rest), value)
    out[:, :, :, :R] = x.view(B, N, groups, R, *rest)
    return out.view(B, N, groups * padded, *rest)


def unpad_heads(x: torch.Tensor, groups: int, heads_per_group: int) -> torch.Tensor:
    """The inverse of :func:`pad_heads`: [B, N, G*padded, *rest] -> [B, N, G*R, *rest], contiguous."""
    B, N, Hp, *rest = x.shape
    padded = Hp // groups
    if padded == heads_per_group:
        return x
    kept = x.view(B, N, groups, padded, *rest)[:, :, :, :heads_per_group]
    return kept.reshape(B, N, groups * heads_per_group, *rest).contiguous()


def _select_blocks_limit(device, *, dtype, groups, index_dim, block_size, topk, index_fp8=False, query_start=0,
                         **_):
    # other group counts up to 64 run with zero index heads padded in (3 -> 4, 5..7 -> 8, 12 -> 16), other index
    # dims up to 128 with zero dims padded in
    from msa_tl.index.select import pipelined_rows

    padded_groups = next_supported(min(groups, INDEX_GROUPS[-1]), INDEX_GROUPS)
    return _first_limit(_device_limit(device, dtype),
                        groups > INDEX_GROUPS[-1] and f"{groups} index heads (at most {INDEX_GROUPS[-1]})",
                        index_dim > INDEX_DIMS[-1] and f"index dim {index_dim} (at most {INDEX_DIMS[-1]})",
                        block_size not in INDEX_BLOCK_SIZES and f"block size {block_size} (one of {INDEX_BLOCK_SIZES})",
                        index_fp8 and not pipelined_rows(padded_groups, block_size)
                        and f"an FP8 select over {padded_groups} index heads x {block_size} keys (at least 128 rows)",
                        index_fp8 and query_start % block_size
                        and f"an FP8 select of queries from {query_start}, not a block boundary")


def _select_blocks_supported(device, **shape) -> bool:
    return _select_blocks_limit(device, **shape) is None


def _select_blocks(q_idx, k_idx, *, block_size, topk, index_scale, local_blocks=1, block_start=None,
                   index_fp8=False, query_start=0):
    from msa_tl.index.select import select_blocks, select_blocks_fp8

    G, Di = q_idx.shape[2], padded_dim(q_idx.shape[3], INDEX_DIMS)
    padded = next_supported(G, INDEX_GROUPS)  # a padded head's selection is computed and dropped
    q_idx, k_idx = pad_heads(pad_dim(q_idx, Di), 1, padded), pad_dim(k_idx, Di)
    if index_fp8:
        indices = select_blocks_fp8(q_idx, k_idx, block_size, topk, local_blocks=local_blocks,
                                    block_start=block_start, query_start=query_start)
    else:  # queries at an offset: the pipelined select from a block boundary, else the two-pass one
        indices = select_blocks(q_idx, k_idx, block_size, topk, index_scale, local_blocks=local_blocks,
                                block_start=block_start, query_start=query_start)
    return unpad_heads(indices, 1, G)


register_kernel("select_blocks", _select_blocks, _select_blocks_limit)


def _sparse_attention_limit(device, *, dtype, heads, groups, head_dim, block_size, topk, **_):
    # a GQA ratio that does not tile 64 rows runs with zero query heads padded in (padded_heads)
    return _first_limit(
        _device_limit(device, dtype),
        head_dim > HEAD_DIMS[-1] and f"head dim {head_dim} (at most {HEAD_DIMS[-1]})",
        block_size not in INDEX_BLOCK_SIZES and f"block size {block_size} (one of {INDEX_BLOCK_SIZES})",
        heads // groups > TILE_HEADS[-1] and f"{heads // groups} query heads per KV head (at most {TILE_HEADS[-1]})")


def _sparse_attention_supported(device, **shape) -> bool:
    return _sparse_attention_limit(device, **shape) is None


# Below this many queries the Q-outer kernel would run. Measured on the H100 at the paper shape
# (benchmarks/results/h100/main_paths.csv) it is 1.4-2.5x slower than KV-outer at every length from
# 2K to 128K, so KV-outer runs everywhere; MSA_TL_ATTENTION_PATH=q_outer picks it by hand (it needs no
# workspace).
Q_OUTER_MAX_SEQ = 0
ATTENTION_PATHS = ("q_outer", "kv_outer")


def attention_path(seq_len: int) -> str:
    """Which main-branch kernel runs a sequence of ``seq_len`` queries: "q_outer" or "kv_outer"."""
    forced = os.environ.get("MSA_TL_ATTENTION_PATH")
    if forced:
        if forced not in ATTENTION_PATHS:
            raise ValueError(f"MSA_TL_ATTENTION_PATH must be one of {ATTENTION_PATHS}, got {forced!r}")
        return forced
    return "q_outer" if seq_len < Q_OUTER_MAX_SEQ else "kv_outer"


def _sparse_attention(q, k, v, indices, *, block_size, scale, query_start=0):
    G, D = k.shape[2], q.shape[3]
    R, Dp = q.shape[2] // G, padded_dim(D)
    q_kernel = pad_heads(pad_dim(q, Dp), G, padded_heads(R))  # a padded head attends uniformly and is dropped
    k, v = pad_dim(k, Dp), pad_dim(v, Dp)  # scale stays the caller's (1/sqrt(D) by default)
    if attention_path(q.shape[1]) == "q_outer":
        if Dp > Q_OUTER_HEAD_DIMS[-1]:
            raise ValueError(f"MSA_TL_ATTENTION_PATH=q_outer: head dims up to {Q_OUTER_HEAD_DIMS[-1]}, got {D}")
        from msa_tl.attention.q_outer import q_outer_attention_forward

        o, lse = q_outer_attention_forward(pad_queries(q_kernel, query_start), k, v,
                                           pad_queries(indices, query_start, -1), block_size, scale)
        o, lse = unpad_queries(o, query_start), unpad_queries(lse, query_start)
    else:
        from msa_tl.attention.kv_outer import sparse_attention_forward

        o, lse = sparse_attention_forward(q_kernel, k, v, indices, block_size, scale, query_start=query_start)
    return unpad_dim(unpad_heads(o, G, R), D), unpad_heads(lse, G, R)


register_kernel("sparse_attention", _sparse_attention, _sparse_attention_limit)


def _sparse_attention_backward(do, dlse, q, k, v, indices, o, lse, *, block_size, scale, query_start=0):
    from msa_tl.attention.backward import sparse_attention_backward

    G, D = k.shape[2], q.shape[3]
    R, Dp = q.shape[2] // G, padded_dim(D)
    P = padded_heads(R)
    # padded heads: q = dO = 0, lse = 0, so their dS and dO are 0 and they add nothing to dK / dV;
    # padded dims are 0 in q, k, v, dO and O, so they change no score and no delta;

    def per_head(x):  # [B, N, Hq] (lse, dlse) -> the kernels' heads
        return None if x is None else pad_heads(x, G, P)

    def per_head_row(x):  # [B, N, Hq, D] (q, dO, O) -> the kernels' heads and dims
        return pad_heads(pad_dim(x, Dp), G, P)

    dq, dk, dv = sparse_attention_backward(per_head_row(do), per_head(dlse), per_head_row(q), pad_dim(k, Dp),
                                           pad_dim(v, Dp), indices, per_head_row(o), per_head(lse), block_size, scale,
                                           query_start=query_start)
    return unpad_dim(unpad_heads(dq, G, R), D), unpad_dim(dk, D), unpad_dim(dv, D)


register_kernel("sparse_attention_backward", _sparse_attention_backward, _sparse_attention_limit)


# The warmup's KL (all visible tokens) runs the same kernels over every visible block. Its selection, stats and
# schedule take ~16 bytes per (query, group, block): at most 2**27 of them (~2 GB; N = 32K at B = 1, G = 4,
# Bk = 128 is 2**25), and at most 256 blocks, which the LSE combine's shared weights [64, blocks] fp32 allow.
WARMUP_MAX_BLOCKS = 256
WARMUP_MAX_ENTRIES = 2 ** 27


def _kl_limit(device, *, dtype, heads=64, groups, head_dim, index_dim, block_size, sparse=True, batch=1, seq=1,
              query_start=0, **_):
    # a ratio that does not divide 64 runs padded (the gather fills whole 64-row tiles only), up to 16
    blocks = -(-seq // block_size)
    return _first_limit(
        _device_limit(device, dtype),
        head_dim > HEAD_DIMS[-1] and f"head dim {head_dim} (at most {HEAD_DIMS[-1]})",
        index_dim > INDEX_DIMS[-1] and f"index dim {index_dim} (at most {INDEX_DIMS[-1]})",
        block_size not in INDEX_BLOCK_SIZES and f"block size {block_size} (one of {INDEX_BLOCK_SIZES})",
        heads // groups > 16 and f"{heads // groups} query heads per KV head (at most 16)",
        not sparse and blocks > WARMUP_MAX_BLOCKS and f"a warmup over {blocks} blocks (at most {WARMUP_MAX_BLOCKS})",
        not sparse and query_start > 0 and "a warmup KL of queries at an offset (query_start > 0)",
        not sparse and batch * seq * groups * blocks > WARMUP_MAX_ENTRIES
        and f"a warmup of {batch * seq * groups * blocks} (query, group, block) entries (at most 2**27)")


def _kl_supported(device, **shape) -> bool:
    return _kl_limit(device, **shape) is None


def _kl_padded(q, k, q_idx, k_idx, indices, lse):
    """The KL kernels' inputs: q and the teacher lse with zero heads padded in up to a divisor of 64 (the real heads
    per group returned with them), q / k and q_idx / k_idx with zero dims padded in up to a supported head / index
    dim (dot products, so scores, are unchanged)."""
    G = k.shape[2]
    R = q.shape[2] // G
    P = padded_heads(R)  # a padded head's lse is 0 (finite); the teacher's mean gives it no weight
    D, Di = padded_dim(q.shape[3]), padded_dim(q_idx.shape[3], INDEX_DIMS)
    return (pad_heads(pad_dim(q, D), G, P), pad_dim(k, D), pad_dim(q_idx, Di), pad_dim(k_idx, Di), indices,
            None if lse is None else pad_heads(lse, G, P), R)


def _kl_alignment_loss(q, k, q_idx, k_idx, indices, lse, *, block_size, scale, index_scale, with_grads=False,
                       query_start=0):
    from msa_tl.kl_loss import kl_alignment_loss_forward

    Di = q_idx.shape[3]
    *padded, R = _kl_padded(q, k, q_idx, k_idx, indices, lse)
    out = kl_alignment_loss_forward(*padded[:4], padded[4], block_size, scale, index_scale, padded[5],
                                    with_grads=with_grads, mean_heads=R, query_start=query_start)
    return (*out[:2], unpad_dim(out[2], Di), unpad_dim(out[3], Di)) if with_grads else out


def _kl_alignment_loss_backward(dloss, q, k, q_idx, k_idx, indices, lse, lse_student, *, block_size, scale,
                                index_scale, query_start=0):
    from msa_tl.kl_loss import kl_alignment_loss_backward

    Di = q_idx.shape[3]
    *padded, R = _kl_padded(q, k, q_idx, k_idx, indices, lse)
    dq_idx, dk_idx = kl_alignment_loss_backward(dloss, *padded[:4], padded[4], block_size, scale, index_scale,
                                                padded[5], lse_student, mean_heads=R, query_start=query_start)
    return unpad_dim(dq_idx, Di), unpad_dim(dk_idx, Di)


register_kernel("kl_alignment_loss", _kl_alignment_loss, _kl_limit)
register_kernel("kl_alignment_loss_backward", _kl_alignment_loss_backward, _kl_limit)


DECODE_MAX_TOPK = 32  # each thread of the decode top-k keeps its k-1 best in registers


def _msa_decode_limit(device, *, dtype, heads, groups, head_dim, index_dim, block_size, topk, page_size=None, **_):
    page_size = block_size if page_size is None else page_size
    return _first_limit(
        _device_limit(device, dtype),
        page_size != block_size and f"pages of {page_size} tokens for blocks of {block_size} (a page a block)",
        block_size not in INDEX_BLOCK_SIZES and f"block size {block_size} (one of {INDEX_BLOCK_SIZES})",
        head_dim not in Q_OUTER_HEAD_DIMS and f"head dim {head_dim} (one of {Q_OUTER_HEAD_DIMS})",
        index_dim not in INDEX_DIMS and f"index dim {index_dim} (one of {INDEX_DIMS})",
        heads // groups > 16 and f"{heads // groups} query heads per KV head (at most 16)",
        topk > DECODE_MAX_TOPK and f"topk {topk} (at most {DECODE_MAX_TOPK})")


def _msa_decode(q, q_idx, cache, *, block_size, topk, scale, index_scale, local_blocks=1):
    plan = cache.plan(queries=q.shape[1], heads=q.shape[2], block_size=block_size, topk=topk, scale=scale,
                      index_scale=index_scale, local_blocks=local_blocks)
    return plan.run(q, q_idx, cache.k, cache.v, cache.k_idx, cache.k_idx_scale, cache.k_idx_exact)


register_kernel("msa_decode", _msa_decode, _msa_decode_limit)
