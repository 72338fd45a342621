"""Float64 reference of every MSA stage: the oracle the kernels are tested against.

Plain torch, written for clarity, not speed. Every function upcasts its inputs
to float64, runs on whatever device they live on and is differentiable where
the stage is (attention and the KL loss), so ``torch.autograd.gradcheck``
applies. Work is split into query chunks so that no buffer holds N x N
elements at once (a chunk of C queries holds B * Hq * C * N scores).

Shapes (layout "bshd", as flash-attn):

    q        [B, N, Hq, D]      main-branch queries
    k, v     [B, N, G, D]       main-branch keys / values, G = Hkv groups
    q_idx    [B, N, G, Di]      index queries, one head per group
    k_idx    [B, N, Di]         index keys, one head shared by all groups
    scores   [B, G, N, nblk]    block max-pooled index scores, -inf where invisible
    indices  [B, N, G, topk]    int32 chosen block ids, ascending, -1 in unused slots
    o        [B, N, Hq, D]      attention output
    lse      [B, N, Hq]         natural-log sum of exp of the scaled scores

with nblk = ceil(N / block_size). Query t sees key j iff j <= t (causal), and
block b is visible to t iff b <= t // block_size.

Queries at an offset: where a function takes ``query_start``, its query-side tensors (q, q_idx, indices, lse,
do, o) hold the C queries ``query_start .. query_start + C - 1`` and its key-side tensors (k, v, k_idx) the
``query_start + C`` tokens up to the last of them (a chunk of a longer sequence: chunked prefill, or a rank's
chunk under context parallelism).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "index_token_scores",
    "block_scores",
    "topk_blocks",
    "select_blocks",
    "sparse_attention",
    "dense_attention",
    "sparse_attention_backward",
    "kl_alignment_loss",
    "kl_alignment_loss_backward",
    "msa_forward",
    "cached_rows",
    "msa_decode",
]

# Query rows per chunk are chosen so a chunk's score tensor stays near this many elements.
_CHUNK_ELEMENTS = 1 << 24
_NEG_INF = float("-inf")


def _query_chunk(rows_per_query: int, n_keys: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, rows_per_query * n_keys))


def _causal(t0: int, n_queries: int, n_keys: int, device) -> torch.Tensor:
    """[C, N] bool: query t0 + c may see key j."""
    t = torch.arange(t0, t0 + n_queries, device=device)
    return torch.arange(n_keys, device=device)[None, :] <= t[:, None]


def index_token_scores(
    q_idx: torch.Tensor, k_idx: torch.Tensor, scale: float | None = None, query_start: int = 0
) -> torch.Tensor:
    """Token-level index scores ``s[b, g, t, j] = q_idx[b, t, g] . k_idx[b, j] * scale``, -inf for j > t.

    q_idx [B, C, G, Di] holds queries ``query_start .. query_start + C - 1``;
    k_idx [B, N, Di] -> s [B, G, C, N] float64. ``scale`` defaults to 1/sqrt(Di).
    """
    C, N, Di = q_idx.shape[1], k_idx.shape[1], k_idx.shape[-1]
    scale = 1.0 / math.sqrt(Di) if scale is None else scale
    s = torch.einsum("btgd,bjd->bgtj", q_idx.double(), k_idx.double()) * scale
    return s.masked_fill(~_causal(query_start, C, N, s.device), _NEG_INF)


def _pool_blocks(s: torch.Tensor, block_size: int) -> torch.Tensor:
    """Max over each key block of token scores s [B, G, C, N] -> [B, G, C, ceil(N / block_size)]."""
    B, G, C, N = s.shape
    nblk = math.ceil(N / block_size)
    s = torch.nn.functional.pad(s, (0, nblk * block_size - N), value=_NEG_INF)
    return s.view(B, G, C, nblk, block_size).amax(dim=-1)


def block_scores(q_idx: torch.Tensor, k_idx: torch.Tensor, block_size: int, scale: float | None = None) -> torch.Tensor:
    """Block max-pool of the index scores: ``S[b, g, t, blk] = max_{j in blk, j <= t} s[b, g, t, j]``.

    q_idx [B, N, G, Di], k_idx [B, N, Di] -> S [B, G, N, nblk] float64, -inf for
    blocks in the future of t. The output holds N^2 / block_size values per
    (b, g); token scores are formed one query chunk at a time.
    """
    B, N, G, _ = q_idx.shape
    out = q_idx.new_empty((B, G, N, math.ceil(N / block_size)), dtype=torch.float64)
    chunk = _query_chunk(B * G, N)
    for t0 in range(0, N, chunk):
        t1 = min(N, t0 + chunk)
        out[:, :, t0:t1] = _pool_blocks(index_token_scores(q_idx[:, t0:t1], k_idx, scale, t0), block_size)
    return out


def topk_blocks(scores: torch.Tensor, topk: int, block_size: int, query_start: int = 0, local_blocks: int = 1,
                first_block: torch.Tensor | None = None) -> torch.Tensor:
    """Exp-free top-k over block scores with the forced local blocks and the causal limit.

    scores [B, G, C, nblk] for queries ``query_start .. query_start + C - 1``
    (as from :func:`block_scores`) -> indices [B, C, G, topk] int32. For query
    t the ``local_blocks`` newest visible blocks (its own block t // block_size
    and the ones before it) are always chosen; the other slots take the
    highest-scoring visible blocks before them (raw scores are ranked: softmax
    preserves order, so no exp is needed). ``first_block`` [B, C] int, if given,
    is each query's first visible block (its document's first block in a packed
    batch); blocks before it are invisible. With fewer than ``topk`` visible
    blocks all of them are chosen. Chosen ids are sorted ascending; unused
    slots hold -1 and come last. A NaN or -inf score never chooses its block,
    and a +inf score ranks first among the others: no score can displace a
    forced block.
    """
    B, G, C, nblk = scores.shape
    rows = torch.arange(C, device=scores.device)
    local = (rows + query_start) // block_size  # [C]
    blocks = torch.arange(nblk, device=scores.device)
    first = torch.zeros((1, C), dtype=torch.long, device=scores.device) if first_block is None else first_block.long()
    visible = (blocks[None, None, :] <= local[None, :, None]) & (blocks[None, None, :] >= first[:, :, None])
    forced = visible & (blocks[None, None, :] > local[None, :, None] - local_blocks)  # [B|1, C, nblk]
    finite_max = torch.finfo(torch.float64).max
    ranked = scores.double().nan_to_num(nan=_NEG_INF, posinf=finite_max, neginf=_NEG_INF)
    ranked = ranked.masked_fill(~visible[:, None], _NEG_INF)
    ranked = ranked.masked_fill(forced[:, None], float("inf"))  # a forced block wins every comparison
    kk = min(topk, nblk)
    top_vals, top_ids = ranked.topk(kk, dim=-1)
    # ascending ids with the unused (-inf) slots last: sort them as id nblk, then mark -1
    top_ids = torch.where(top_vals == _NEG_INF, nblk, top_ids).sort(dim=-1).values
    top_ids = torch.where(top_ids == nblk, -1, top_ids)
    top_ids = torch.nn.functional.pad(top_ids, (0, topk - kk), value=-1)
    return top_ids.permute(0, 2, 1, 3).to(torch.int32).contiguous()


def rescore_selection(exact_scores: torch.Tensor, candidates: torch.Tensor, topk: int, block_size: int,
                      query_start: int = 0, local_blocks: int = 1) -> torch.Tensor:
    """The second stage of a two-stage selection (FP8 candidates ranked again by exact scores).

    exact_scores [B, G, C, nblk] (as from :func:`block_scores` over the exact keys), candidates [B, C, G, kc] int32
    (the first stage's :func:`topk_blocks` at kc >= topk slots, -1 = none) -> indices [B, C, G, topk] int32:
    :func:`topk_blocks` over the exact scores of the candidate blocks alone (the forced blocks stay forced).
    """
    B, G, C, nblk = exact_scores.shape
    ids = torch.where(candidates >= 0, candidates.long(), nblk)  # -1 -> a column past the blocks, cut below
    member = torch.zeros((B, C, G, nblk + 1), dtype=torch.bool, device=exact_scores.device)
    member = member.scatter_(-1, ids, True)[..., :nblk].permute(0, 2, 1, 3)  # [B, G, C, nblk]
    return topk_blocks(exact_scores.masked_fill(~member, _NEG_INF), topk, block_size, query_start, local_blocks)


def select_blocks(
    q_idx: torch.Tensor, k_idx: torch.Tensor, block_size: int, topk: int, scale: float | None = None,
    local_blocks: int = 1, block_start: torch.Tensor | None = None, query_start: int = 0,
) -> torch.Tensor:
    """The whole index branch: scoring, block max-pool and top-k (:func:`topk_blocks`).

    q_idx [B, C, G, Di] (queries ``query_start ..``), k_idx [B, query_start + C, Di] -> indices [B, C, G, topk]
    int32. ``block_start`` [B, nblk] int, if given, is the first visible block for the queries of each block (the
    first block of its document when documents are packed block-aligned into one row).
    Block scores exist for one query chunk at a time (B * G * chunk * N token scores).
    """
    B, C, G, _ = q_idx.shape
    out = torch.empty((B, C, G, topk), dtype=torch.int32, device=q_idx.device)
    chunk = _query_chunk(B * G, k_idx.shape[1])
    for r0 in range(0, C, chunk):
        r1, t0 = min(C, r0 + chunk), query_start + r0
        S = _pool_blocks(index_token_scores(q_idx[:, r0:r1], k_idx, scale, t0), block_size)
        first = None
        if block_start is not None:
            first = block_start[:, torch.arange(t0, t0 + r1 - r0, device=block_start.device) // block_size]
        out[:, r0:r1] = topk_blocks(S, topk, block_size, query_start=t0, local_blocks=local_blocks, first_block=first)
    return out


def _chunk_mask(indices: torch.Tensor | None, r0: int, r1: int, n_keys: int, block_size: int, device,
                query_start: int = 0) -> torch.Tensor:
    """Which keys the query rows r0 .. r1-1 (queries query_start + r0 ..) attend to: [B or 1, G or 1, r1 - r0, N]
    bool.

    indices [B, C, G, topk] (-1 = unused) or None for dense causal attention.
    A key is attended iff its block is chosen and j <= t: ids past the last block are ignored like -1,
    blocks after the query's own contribute no key, and a block chosen twice counts once.
    """
    if indices is None:
        return _causal(query_start + r0, r1 - r0, n_keys, device)[None, None]
    return _selection_mask(indices[:, r0:r1], query_start + r0, n_keys, block_size)


def _selection_mask(rows: torch.Tensor, t0: int, n_keys: int, block_size: int) -> torch.Tensor:
    """:func:`_chunk_mask` of the index rows [B, C, G, topk] of queries t0 .. t0 + C - 1: [B, G, C, N] bool."""
    device = rows.device
    causal = _causal(t0, rows.shape[1], n_keys, device)
    nblk = math.ceil(n_keys / block_size)
    slot_ids = torch.where((rows < 0) | (rows >= nblk), nblk, rows).long()  # -1, past the end -> a spare column
    chosen = torch.zeros((*rows.shape[:3], nblk + 1), dtype=torch.bool, device=device)
    chosen.scatter_(-1, slot_ids, True)
    key_block = torch.arange(n_keys, device=device) // block_size
    return chosen[..., key_block].permute(0, 2, 1, 3) & causal


def _attention_probs(q, k, mask, scale):
    """Masked softmax of one chunk. q [B, C, Hq, D], k [B, N, G, D], mask [*, G|1, C, N].

    Returns (p [B, G, R, C, N], lse [B, G, R, C]) in float64, R = Hq / G. A row
    with no visible key gets p = 0 and lse = -inf.
    """
    B, C, Hq, D = q.shape
    G = k.shape[2]
    s = torch.einsum("bcgrd,bjgd->bgrcj", q.double().view(B, C, G, Hq // G, D), k.double()) * scale
    s = s.masked_fill(~mask[:, :, None], _NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    # as a dense softmax: a row with nothing chosen is all 0; a NaN or +inf score makes its whole row NaN
    lse = torch.where(torch.isposinf(lse), float("nan"), lse)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    return torch.where(mask[:, :, None], p, 0.0), lse


def _finite(x: torch.Tensor) -> torch.Tensor:
    """x in float64 with non-finite entries zeroed: a product with a zero weight must give 0, not NaN."""
    x = x.double()
    return torch.where(torch.isfinite(x), x, 0.0)


def _weighted_values(p, v_finite, v_bad, mask):
    """o = p V over the chosen keys [B, C, G, R, D] from V with non-finite entries zeroed (``_finite``) and
    their places (``v_bad``, float64 0 / 1): an entry is NaN where a chosen key's V entry is not finite (as in
    dense attention over those tokens), while keys nobody chose cannot poison it."""
    o = torch.einsum("bgrcj,bjgd->bcgrd", p, v_finite)
    bad = torch.einsum("bgcj,bjgd->bcgd", mask.double(), v_bad) > 0  # [B, C, G, D]
    return torch.where(bad[:, :, :, None], float("nan"), o)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor | None,
    block_size: int,
    scale: float | None = None,
    query_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The main branch: exact attention over the chosen key blocks, causal inside them.

    q [B, C, Hq, D] (queries ``query_start ..``), k/v [B, query_start + C, G, D], indices [B, C, G, topk] (int,
    -1 = unused; None = every visible block, i.e. dense causal attention). Query head h uses
    group h // (Hq / G). Returns o [B, C, Hq, D] and lse [B, C, Hq], both
    float64; ``scale`` defaults to 1/sqrt(D).
    """
    B, C, Hq, D = q.shape
    N = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    outs, lses = [], []
    vf, v_bad = _finite(v), (~torch.isfinite(v)).double()
    chunk = _query_chunk(B * Hq, N)
    for t0 in range(0, C, chunk):
        t1 = min(C, t0 + chunk)
        mask = _chunk_mask(indices, t0, t1, N, block_size, q.device, query_start).expand(B, k.shape[2], t1 - t0, N)
        p, lse = _attention_probs(q[:, t0:t1], k, mask, scale)
        o = _weighted_values(p, vf, v_bad, mask)
        outs.append(o.reshape(B, t1 - t0, Hq, D))
        lses.append(lse.permute(0, 3, 1, 2).reshape(B, t1 - t0, Hq))
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def sparse_attention_backward(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor | None,
    block_size: int,
    scale: float | None = None,
    query_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`sparse_attention`, written out (the oracle of the backward kernels).

    do [B, N, Hq, D] and dlse [B, N, Hq] (or None) are the gradients of o and lse. With
    P = softmax of the scaled masked scores, delta = rowsum(dO * O):

        dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta + dlse),
        dQ = scale * dS K,   dK = scale * dS^T Q

    summed over the R = Hq / G heads of each group for dK / dV. Returns (dq, dk, dv) in float64,
    shaped as q, k, v (``query_start`` as in :func:`sparse_attention`). P is recomputed one query chunk at a time.
    """
    B, C, Hq, D = q.shape
    N, G = k.shape[1], k.shape[2]
    R = Hq // G
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kd, qd, vf = _finite(k), _finite(q), _finite(v)  # a NaN reaches the gradients through dS, only where chosen
    v_bad = (~torch.isfinite(v)).double()
    dq = torch.empty((B, C, Hq, D), dtype=torch.float64, device=q.device)
    dk = torch.zeros((B, N, G, D), dtype=torch.float64, device=q.device)
    dv = torch.zeros_like(dk)
    chunk = _query_chunk(B * Hq, N)
    for t0 in range(0, C, chunk):
        t1 = min(C, t0 + chunk)
        rows = t1 - t0
        mask = _chunk_mask(indices, t0, t1, N, block_size, q.device, query_start).expand(B, G, rows, N)
        p, _ = _attention_probs(q[:, t0:t1], k, mask, scale)
        do_c = do[:, t0:t1].double().view(B, rows, G, R, D)
        o_c = _weighted_values(p, vf, v_bad, mask)
        delta = (do_c * o_c).sum(-1).permute(0, 2, 3, 1)  # [B, G, R, C]
        if dlse is not None:
            delta = delta - dlse[:, t0:t1].double().view(B, rows, G, R).permute(0, 2, 3, 1)
        dv += torch.einsum("bgrcj,bcgrd->bjgd", p, do_c)
        dp = torch.einsum("bcgrd,bjgd->bgrcj", do_c, vf)
        # zero off the chosen keys: a NaN row's delta must not reach keys it never attended (0 * NaN)
        ds = torch.where(mask[:, :, None], p * (dp - delta[..., None]), 0.0)
        dq[:, t0:t1] = (scale * torch.einsum("bgrcj,bjgd->bcgrd", ds, kd)).reshape(B, rows, Hq, D)
        dk += scale * torch.einsum("bgrcj,bcgrd->bjgd", ds, qd[:, t0:t1].view(B, rows, G, R, D))
    return dq, dk, dv


def dense_attention(q, k, v, scale: float | None = None, query_start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal GQA attention (the warmup mode's main branch): :func:`sparse_attention` over all keys."""
    return sparse_attention(q, k, v, None, block_size=1, scale=scale, query_start=query_start)


def kl_alignment_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    indices: torch.Tensor | None,
    block_size: int,
    scale: float | None = None,
    index_scale: float | None = None,
    return_student_lse: bool = False,
    lse: torch.Tensor | None = None,
    query_start: int = 0,
):
    """KL(teacher || student) that trains the index branch, averaged over queries and groups.

    teacher[b, g, t, j]: the main branch's attention probabilities over the
    chosen tokens, exp(scale q_h . k_j - lse_h) averaged over the group's Hq / G heads and
    detached; ``lse`` [B, N, Hq] is the main branch's (None: computed here, so the teacher
    sums to 1). student[b, g, t, j]: softmax over the same tokens of the index scores
    q_idx[b, t, g] . k_idx[b, j] * index_scale. Per row the loss is
    sum_j teacher_j (log teacher_j - s_j) + logsumexp_j s_j, the kernels' formula (the KL itself
    when the teacher sums to 1, as it does with the main branch's own lse). ``indices`` None takes every
    causally visible token (warmup). Shapes as in :func:`sparse_attention` and
    :func:`select_blocks` (``query_start`` too: the mean is then over the C given queries); returns a float64
    scalar, and with ``return_student_lse`` also the student's normaliser logsumexp_j s_j [B, N, G] float64
    (detached). Gradients reach q_idx and k_idx only.
    """
    B, N, _, _ = q.shape
    total = q_idx.new_zeros((), dtype=torch.float64)
    student_lse = []
    for _, _, mask, teacher, s in _kl_chunks(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse,
                                             query_start):
        row_lse = torch.logsumexp(s, dim=-1)
        row_lse = row_lse.masked_fill(~mask.any(-1).expand_as(row_lse), 0.0)  # a row with nothing chosen adds 0
        total = total + (torch.xlogy(teacher, teacher) - teacher * s.masked_fill(~mask, 0.0)).sum() + row_lse.sum()
        if return_student_lse:
            student_lse.append(torch.logsumexp(s.detach(), dim=-1).transpose(1, 2))
    loss = total / (B * N * k.shape[2])
    return (loss, torch.cat(student_lse, dim=1)) if return_student_lse else loss


def _kl_chunks(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse=None, query_start=0):
    """Per chunk of query rows: (t0, t1, mask [B|1, G|1, C, N], teacher [B, G, C, N] detached, masked index scores
    s), rows t0 .. t1 - 1 of q. With ``lse`` [B, N, Hq] the teacher is normalised by it, else by its own
    logsumexp."""
    B, C, Hq, D = q.shape
    N, G = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    chunk = _query_chunk(B * Hq, N)
    for t0 in range(0, C, chunk):
        t1 = min(C, t0 + chunk)
        mask = _chunk_mask(indices, t0, t1, N, block_size, q.device, query_start)
        with torch.no_grad():
            p, own_lse = _attention_probs(q[:, t0:t1].detach(), k.detach(), mask, scale)
            if lse is not None:  # p = exp(s - own_lse) -> exp(s - lse)  [B, G, R, C, N]
                given = lse[:, t0:t1].double().view(B, t1 - t0, G, Hq // G).permute(0, 2, 3, 1)
                p = p * torch.exp(torch.where(torch.isfinite(own_lse), own_lse - given, 0.0))[..., None]
        s = index_token_scores(q_idx[:, t0:t1], k_idx, index_scale, query_start + t0).masked_fill(~mask, _NEG_INF)
        yield t0, t1, mask, p.mean(dim=2), s


def kl_alignment_loss_backward(
    dloss: torch.Tensor | float,
    q: torch.Tensor,
    k: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    indices: torch.Tensor | None,
    block_size: int,
    scale: float | None = None,
    index_scale: float | None = None,
    lse: torch.Tensor | None = None,
    query_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`kl_alignment_loss` (``lse`` and ``query_start`` as there) for q_idx and k_idx, written
    out (the KL kernel's oracle).

    Per (b, g, t) row, with teacher rows summing to 1 over the attended tokens:
    d loss / d s_j = dloss * (student_j - teacher_j) / (B * N * G); then
    dq_idx[t, g] = index_scale * sum_j ds_j k_idx[j] and dk_idx[j] = index_scale * sum_{t,g} ds_j q_idx[t, g].
    Returns (dq_idx [B, N, G, Di], dk_idx [B, N, Di]) in float64.
    """
    B, C, _, _ = q.shape
    N, G, Di = k.shape[1], k.shape[2], k_idx.shape[-1]
    index_scale = 1.0 / math.sqrt(Di) if index_scale is None else index_scale
    weight = torch.as_tensor(dloss, dtype=torch.float64, device=q.device) / (B * C * G)
    dq_idx = torch.empty((B, C, G, Di), dtype=torch.float64, device=q.device)
    dk_idx = torch.zeros((B, N, Di), dtype=torch.float64, device=q.device)
    qf, kf = _finite(q_idx), _finite(k_idx)  # a NaN reaches the gradients through ds, only where chosen
    for t0, t1, mask, teacher, s in _kl_chunks(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse,
                                               query_start):
        # a row with nothing chosen has no student (0 / 0); a NaN score keeps its row's student NaN
        student = torch.where(mask.any(-1, keepdim=True), torch.softmax(s, dim=-1), 0.0)
        ds = torch.where(mask, weight * (student - teacher), 0.0)  # [B, G, C, N], 0 off the chosen tokens
        dq_idx[:, t0:t1] = index_scale * torch.einsum("bgtj,bjd->btgd", ds, kf)
        dk_idx += index_scale * torch.einsum("bgtj,btgd->bjd", ds, qf[:, t0:t1])
    return dq_idx, dk_idx


def msa_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    block_size: int,
    topk: int,
    scale: float | None = None,
    index_scale: float | None = None,
    local_blocks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """End-to-end MSA: select blocks with the index branch, attend over them.

    Shapes as in the module docstring; returns (o, lse, indices).
    """
    indices = select_blocks(q_idx, k_idx, block_size, topk, index_scale, local_blocks)
    o, lse = sparse_attention(q, k, v, indices, block_size, scale)
    return o, lse, indices


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., Di] -> (float8_e4m3fn [..., Di], scale [...] float32): a scale per row, amax / 448 (1 for a row of
    zeros), the codes ``x / scale`` rounded to nearest, as the FP8 index cache stores keys and the decode scan its
    queries."""
    amax = x.float().abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes [..., Di] float8_e4m3fn, scale [...] -> the values they stand for, float64."""
    return codes.double() * scale.double()[..., None]


def fake_quantize_fp8(x: torch.Tensor) -> torch.Tensor:
    """x as FP8 scoring sees it: quantised per row and back (float64)."""
    return dequantize_fp8(*quantize_fp8(x))


def cached_rows(cache: torch.Tensor, block_table: torch.Tensor, row: int, length: int) -> torch.Tensor:
    """The first ``length`` tokens of batch row ``row`` of a paged cache [num_pages, page_size, *rest] whose pages
    ``block_table`` [B, max_pages] lists, as one contiguous [length, *rest] tensor."""
    page_size = cache.shape[1]
    pages = block_table[row, : math.ceil(length / page_size)].long()
    return cache[pages].flatten(0, 1)[:length]


def msa_decode(
    q: torch.Tensor,
    q_idx: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_idx_cache: torch.Tensor,
    block_table: torch.Tensor,
    seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    scale: float | None = None,
    index_scale: float | None = None,
    indices: torch.Tensor | None = None,
    local_blocks: int = 1,
    rescore_queries: torch.Tensor | None = None,
    rescore_keys: torch.Tensor | None = None,
    candidates: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSA for the newest S tokens of each sequence in a paged cache (decode, speculative drafts, chunked prefill).

    q [B, S, Hq, D], q_idx [B, S, G, Di]: the queries of tokens ``seqlens[b] - S .. seqlens[b] - 1`` of row b,
    whose keys are already in the cache; k_cache / v_cache [num_pages, page_size, G, D], k_idx_cache
    [num_pages, page_size, Di]; block_table [B, max_pages] int32; seqlens [B] int (each >= S).
    Each query selects and attends exactly as the same token does in :func:`msa_forward` over its row's first
    ``seqlens[b]`` tokens: the rows of that forward at those positions. ``indices`` [B, S, G, topk] int32, if
    given, replace the selection (the attention alone, over any ids, as :func:`sparse_attention` reads them).
    ``local_blocks`` as in :func:`topk_blocks`. Two-stage selection (FP8 index keys rescored): with
    ``rescore_keys`` [num_pages, page_size, Di] (the exact index keys) and ``rescore_queries`` [B, S, G, Di], q_idx
    and k_idx_cache give the first stage, whose best ``candidates`` blocks beside the forced ones
    :func:`rescore_selection` ranks again by the exact scores. Returns (o [B, S, Hq, D], lse [B, S, Hq], both
    float64, indices [B, S, G, topk] int32).
    """
    B, S, Hq, D = q.shape
    G = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    o = q.new_empty((B, S, Hq, D), dtype=torch.float64)
    lse = q.new_empty((B, S, Hq), dtype=torch.float64)
    chosen = torch.empty((B, S, G, topk), dtype=torch.int32, device=q.device) if indices is None else indices
    for b in range(B):
        n = int(seqlens[b])
        t0 = n - S
        if t0 < 0:
            raise ValueError(f"row {b} holds {n} cached tokens, fewer than its {S} queries")
        k, v, k_idx = (cached_rows(c, block_table, b, n)[None] for c in (k_cache, v_cache, k_idx_cache))
        if indices is None:
            scores = _pool_blocks(index_token_scores(q_idx[b:b + 1], k_idx.flatten(2), index_scale, t0), block_size)
            if rescore_keys is None:
                chosen[b] = topk_blocks(scores, topk, block_size, query_start=t0, local_blocks=local_blocks)[0]
            else:
                first = topk_blocks(scores, local_blocks + candidates, block_size, query_start=t0,
                                    local_blocks=local_blocks)
                exact = _pool_blocks(index_token_scores(rescore_queries[b:b + 1],
                                                        cached_rows(rescore_keys, block_table, b, n)[None],
                                                        index_scale, t0), block_size)
                chosen[b] = rescore_selection(exact, first, topk, block_size, t0, local_blocks)[0]  # [S, G, topk]
        mask = _selection_mask(chosen[b:b + 1], t0, n, block_size)
        p, row_lse = _attention_probs(q[b:b + 1], k, mask, scale)
        o[b] = _weighted_values(p, _finite(v), (~torch.isfinite(v)).double(), mask).reshape(S, Hq, D)
        lse[b] = row_lse.permute(0, 3, 1, 2).reshape(S, Hq)
    return o, lse, chosen
