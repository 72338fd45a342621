"""Packed variable-length batches (flash-attn's ``cu_seqlens``) and ``local_blocks`` through the functional API,
against the float64 reference run on each document alone (CPU; small shapes in float64, so comparisons are tight).

A packed row holds its documents back to back; MSA runs on each as if it were alone: blocks counted from its first
token, its own forced blocks and causality, no query seeing another document. The helpers below are shared with
tests/test_varlen_gpu.py, and each is exercised here on the CPU reference path.
"""

import itertools
import math
import os

import pytest
import torch

import msa_tl
from msa_tl import reference as R
from msa_tl.checks import POISON_INDEX
from msa_tl.ops.cache import MSACache
from msa_tl.ops.varlen import packed_layout
from test_conformance_gpu import assert_within_calibration, dtype_baseline
from test_decode import fill_paged, newest

f64 = torch.float64
DEFAULT_SEED = 0
# documents of every kind: empty (first, in the middle, last), one token, shorter than a block, exactly one block
# (16), lengths that are no multiple of the block, and several long enough that top-k discards blocks
LENGTHS = [0, 1, 9, 16, 40, 0, 75, 100, 33, 0]


@pytest.fixture(autouse=True)
def fresh_seed():
    """A fixed default seed (this replaces conftest's fresh one); MSA_TEST_SEED replays another."""
    seed = int(os.environ.get("MSA_TEST_SEED") or DEFAULT_SEED)
    torch.manual_seed(seed)
    print(f"seed {seed}")
    return seed


# ----------------------------------------------------------------------------------------------------------------
# helpers (shared with tests/test_varlen_gpu.py)


def cu_seqlens_of(lengths, device="cpu"):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def documents(cu_seqlens):
    """The token range (start, end) of each non-empty document."""
    bounds = cu_seqlens.tolist()
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def packed_inputs(lengths, Hq, G, D, Di, dtype=f64, device="cpu", gen=None):
    """cu_seqlens and random packed q [1, total, Hq, D], k, v [1, total, G, D], q_idx [1, total, G, Di] and
    k_idx [1, total, Di] (drawn on the CPU from ``gen``, or the global generator)."""
    total = sum(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    return (cu_seqlens_of(lengths, device), rand(1, total, Hq, D), rand(1, total, G, D), rand(1, total, G, D),
            rand(1, total, G, Di), rand(1, total, Di))


def per_document(cu_seqlens, fn, *tensors):
    """``fn`` on each non-empty document's rows of the packed tensors [1, total, ...] (None passed as is), alone;
    its outputs [1, n, ...] concatenated back into packed rows."""
    outs = [fn(*(None if t is None else t[:, a:b] for t in tensors)) for a, b in documents(cu_seqlens)]
    return tuple(torch.cat(parts, dim=1) for parts in zip(*outs))


def block_in_document(cu_seqlens, block_size):
    """[total] each token's block, counted from its document's first token."""
    own = torch.empty(int(cu_seqlens[-1]), dtype=torch.long)
    for a, b in documents(cu_seqlens.cpu()):
        own[a:b] = torch.arange(b - a) // block_size
    return own


def as_sets(indices):
    """Each row's ids sorted with the -1 slots last: equal for two selections iff the same sets (repeats count)."""
    big = torch.iinfo(torch.int32).max
    return torch.where(indices < 0, big, indices).sort(dim=-1).values


def block_starts(B, N, block_size, device="cpu"):
    """block_start [B, ceil(N / Bk)] int32 of documents packed block-aligned: row 0 holds documents of 1, 2 and 1
    blocks, then one long one; row 1 a long one, then 1 and 3 blocks, then the rest (each block's entry is its
    document's first block)."""
    nblk = math.ceil(N / block_size)
    rows = []
    for b in range(B):
        doc_blocks = [1, 2, 1, nblk] if b % 2 == 0 else [max(1, nblk - 4), 1, 3, nblk]
        starts = []
        for n in doc_blocks:
            starts += [len(starts)] * n
        rows.append(starts[:nblk])
    return torch.tensor(rows, dtype=torch.int32, device=device)


def assert_selection_up_to_ties(indices, q_idx, k_idx, block_size, topk, *, local_blocks=1, block_start=None,
                                rows_with_ties=1 / 1000):
    """msa_tl.checks.assert_same_selection_up_to_ties with forced blocks and documents: each row (slot order free)
    holds its ``local_blocks`` newest visible blocks (those at or after its first visible block ``start``, from
    ``block_start`` [B, nblk] or 0), only ids in ``start .. t // Bk`` or -1, min(topk, visible) distinct blocks, and
    the reference's set (``reference.select_blocks`` with the same options) except blocks whose float64 score ties
    the ranked slots' boundary within bf16 rounding, in at most ``rows_with_ties`` of the rows. The reference runs
    on q_idx's device."""
    B, N, G, _ = q_idx.shape
    device = q_idx.device
    assert indices.dtype == torch.int32 and indices.shape == (B, N, G, topk)
    idx = indices.to(device).long()
    assert not (idx == POISON_INDEX).any(), "unwritten slots"
    nblk = math.ceil(N / block_size)
    local = (torch.arange(N, device=device) // block_size)[None, :, None]  # [1, N, 1]
    start = (torch.zeros(B, N, device=device, dtype=torch.long) if block_start is None
             else block_start.to(device).long()[:, local[0, :, 0]])[..., None]  # [B, N, 1]
    forced = local[..., None] - torch.arange(local_blocks, device=device)  # [1, N, 1, L]
    present = (idx[..., None, :] == forced[..., None]).any(-1)  # [B, N, G, L]
    assert (present | (forced < start[..., None])).all(), "the local_blocks newest visible blocks are chosen"
    inside = (idx >= start[..., None]) & (idx <= local[..., None])
    assert (inside | (idx == -1)).all(), "ids only from the query's document, none in its future; -1 elsewhere"
    count = torch.clamp(local - start + 1, max=topk)  # [B, N, 1]
    chosen = torch.zeros(B, N, G, nblk + 1, dtype=torch.bool, device=device)
    chosen.scatter_(-1, torch.where(idx < 0, nblk, idx), True)
    assert ((idx >= 0).sum(-1) == count).all() and (chosen[..., :-1].sum(-1) == count).all(), \
        "min(topk, visible blocks) distinct blocks"

    ref = R.select_blocks(q_idx, k_idx, block_size, topk, None, local_blocks,
                          None if block_start is None else block_start.to(device)).long()
    ref_chosen = torch.zeros_like(chosen)
    ref_chosen.scatter_(-1, torch.where(ref < 0, nblk, ref), True)
    differ = (chosen != ref_chosen).any(-1).nonzero().tolist()
    if not differ:
        return
    scores = R.block_scores(q_idx, k_idx, block_size)  # [B, G, N, nblk] float64
    for b, t, g in differ:
        first, last = int(start[b, t, 0]), t // block_size - local_blocks  # the ranked blocks: first .. last
        ranked = scores[b, g, t, first:last + 1]
        boundary = ranked.sort(descending=True).values[topk - local_blocks - 1].item()  # the last ranked slot's
        for blk in (chosen[b, t, g, :-1] ^ ref_chosen[b, t, g, :-1]).nonzero().flatten().tolist():
            assert first <= blk <= last, (b, t, g, blk, "a forced or invisible block differs")
            gap = abs(ranked[blk - first].item() - boundary)
            assert gap <= 2**-8 * max(1.0, abs(boundary)), (b, t, g, blk, gap)
    allowed = max(2, int(B * N * G * rows_with_ties))
    assert len(differ) <= allowed, f"{len(differ)} rows differ: more ties than rounding explains"


def assert_decode_selection_up_to_ties(idx, q_idx, cache, block_size, topk, *, local_blocks=1, index_scale=None):
    """Per cache row's newest S queries (slot order free: the kernels put the forced blocks first, the CPU
    reference sorts ids): the ``local_blocks`` newest blocks that exist chosen, min(topk, visible) distinct visible
    blocks, and the reference's set (``reference.topk_blocks`` with ``local_blocks``) except blocks whose float64
    score ties the ranked slots' boundary within bf16 rounding. FP8 caches: the reference scores the dequantised
    keys against q_idx quantised as the scan quantises it."""
    B, S, G, _ = q_idx.shape
    q_idx = R.fake_quantize_fp8(q_idx) if cache.index_fp8 else q_idx
    idx = idx.cpu()
    for b, n in enumerate(cache.lengths):
        keys = R.cached_rows(cache.index_keys(), cache.block_table, b, n)[None]
        scores = R._pool_blocks(R.index_token_scores(q_idx[b:b + 1], keys, index_scale, n - S), block_size)
        want = R.topk_blocks(scores, topk, block_size, query_start=n - S, local_blocks=local_blocks)[0].cpu()
        scores = scores.cpu()
        for s in range(S):
            local = (n - S + s) // block_size
            forced = {local - j for j in range(local_blocks) if local - j >= 0}
            for g in range(G):
                row = idx[b, s, g].tolist()
                got = [i for i in row if i != -1]
                assert len(set(got)) == len(got) == min(topk, local + 1), (b, s, g, row)
                assert all(0 <= i <= local for i in got) and forced <= set(got), (b, s, g, row, forced)
                want_set = set(want[s, g].tolist()) - {-1}
                if set(got) != want_set:
                    ranked = scores[0, g, s, :local - local_blocks + 1]
                    boundary = ranked.sort(descending=True).values[topk - local_blocks - 1].item()
                    for blk in set(got) ^ want_set:
                        assert blk < ranked.numel(), (b, s, g, blk, "a forced block differs")
                        gap = abs(ranked[blk].item() - boundary)
                        assert gap <= 2**-8 * max(1.0, abs(boundary)), (b, s, g, blk, gap)


def check_packed_attention(lengths, Hq, G, D, Di, block_size, topk, local_blocks, dtype, device, gen, grads=True):
    """msa_attention over a packed batch against the float64 reference on each document alone, over the call's own
    selection (itself checked per document up to ties): o, lse and (``grads``) dq, dk, dv held to FA3's calibration
    (at most twice the error of masked attention computed in ``dtype``, per document, plus rounding)."""
    cu, q, k, v, q_idx, k_idx = packed_inputs(lengths, Hq, G, D, Di, dtype, device, gen)
    total = q.shape[1]
    leaves = [t.clone().requires_grad_(grads) for t in (q, k, v)]
    o, lse, idx = msa_tl.msa_attention(*leaves, q_idx, k_idx, block_size=block_size, topk=topk,
                                       local_blocks=local_blocks, return_lse=True, return_indices=True, cu_seqlens=cu)
    assert o.dtype == dtype and o.shape == q.shape and lse.shape == (1, total, Hq) and lse.dtype == torch.float32
    assert idx.shape == (1, total, G, topk) and idx.dtype == torch.int32
    for a, b in documents(cu):
        assert_selection_up_to_ties(idx[:, a:b], q_idx[:, a:b], k_idx[:, a:b], block_size, topk,
                                    local_blocks=local_blocks)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    do = torch.randn(q.shape, generator=gen).to(device, dtype) if grads else None
    ref_o, ref_lse = per_document(cu, lambda *x: R.sparse_attention(*x, block_size), q, k, v, idx)
    base = per_document(cu, lambda *x: dtype_baseline(*x[:4], block_size, x[4]), q, k, v, idx, do)
    every_head = torch.ones(1, total, Hq, dtype=torch.bool, device=device)
    assert_within_calibration("o", o.detach(), ref_o, base[0], dtype, every_head)
    assert_within_calibration("lse", lse, ref_lse, base[1], dtype, every_head)
    if not grads:
        return
    o.backward(do)
    refs = per_document(cu, lambda q, k, v, i, do: R.sparse_attention_backward(do, None, q, k, v, i, block_size),
                        q, k, v, idx, do)
    every_token = torch.ones(1, total, dtype=torch.bool, device=device)
    for name, leaf, ref, baseline, keep in zip(("dq", "dk", "dv"), leaves, refs, base[2:],
                                               (every_head, every_token, every_token)):
        assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all(), name
        assert_within_calibration(name, leaf.grad, ref, baseline, dtype, keep)


def check_packed_kl(lengths, Hq, G, D, Di, block_size, topk, mode, dtype, device, gen, *, max_seqlen=None,
                    loss_rtol, grad_rtol, lse_rtol):
    """kl_alignment_loss over a packed batch equals the token-weighted mean of the reference's loss on each document
    alone, and its q_idx / k_idx gradients that mean's autograd gradients. ``mode`` "sparse": the API's own
    selection with one row's slots all -1 (it adds 0), and again with the main branch's lse passed; "warmup":
    indices None (every token each query sees in its document), sized by ``max_seqlen``."""
    cu, q, k, v, q_idx, k_idx = packed_inputs(lengths, Hq, G, D, Di, dtype, device, gen)
    total = q.shape[1]
    indices = None
    if mode == "sparse":
        indices = msa_tl.select_blocks(q_idx, k_idx, block_size=block_size, topk=topk, cu_seqlens=cu).clone()
        indices[:, total // 2] = -1
    qi, ki = (t.clone().requires_grad_(True) for t in (q_idx, k_idx))
    loss = msa_tl.kl_alignment_loss(q, k, qi, ki, indices, block_size=block_size, cu_seqlens=cu,
                                    max_seqlen=max_seqlen)
    loss.backward()
    qr, kr = (t.detach().double().requires_grad_(True) for t in (q_idx, k_idx))
    want = sum(R.kl_alignment_loss(q[:, a:b], k[:, a:b], qr[:, a:b], kr[:, a:b],
                                   None if indices is None else indices[:, a:b], block_size) * (b - a)
               for a, b in documents(cu)) / total
    want.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and want.item() > 0
    assert abs(loss.item() - want.item()) <= loss_rtol * abs(want.item()), (loss.item(), want.item())
    for name, got, ref in (("dq_idx", qi.grad, qr.grad), ("dk_idx", ki.grad, kr.grad)):
        assert got.shape == ref.shape and torch.isfinite(got).all(), name
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err <= grad_rtol, f"{name} rel err {err:.2e}"
    if mode == "sparse":  # the teacher's normaliser from the main branch over the same selection
        _, lse = msa_tl.sparse_attention(q, k, v, indices, block_size=block_size, return_lse=True, cu_seqlens=cu)
        given = msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=block_size, cu_seqlens=cu, lse=lse)
        assert abs(given.item() - want.item()) <= lse_rtol * abs(want.item()), (given.item(), want.item())


# ----------------------------------------------------------------------------------------------------------------
# the block-aligned copy


def test_the_block_aligned_copy_starts_each_document_on_a_block():
    Bk = 16
    cu = cu_seqlens_of(LENGTHS)
    total, docs = int(cu[-1]), len(LENGTHS)
    layout = packed_layout(cu, total, Bk)
    assert layout.length % Bk == 0 and total <= layout.length < total + docs * (Bk - 1) + Bk
    x = torch.randn(1, total, 3, dtype=f64)
    aligned = layout.pack(x, fill=float("nan"))
    assert torch.equal(layout.unpack(aligned), x)
    assert torch.equal(layout.real, ~torch.isnan(aligned[0]).all(-1)), "rows with no token are the filled ones"
    end = 0
    for a, b in documents(cu):
        p = int(layout.positions[a])
        assert p % Bk == 0 and p >= end, "each document starts on a block of its own, after the one before"
        assert torch.equal(layout.positions[a:b], p + torch.arange(b - a))
        blocks = slice(p // Bk, math.ceil((p + b - a) / Bk))
        assert (layout.block_start[0, blocks] == p // Bk).all()
        end = p + b - a


# ----------------------------------------------------------------------------------------------------------------
# msa_attention: each document as if alone


@pytest.mark.parametrize("local_blocks", [1, 2])
@pytest.mark.parametrize("Bk,topk", [(16, 3), (32, 2)])
def test_msa_attention_runs_each_document_as_if_alone(Bk, topk, local_blocks):
    cu, q, k, v, q_idx, k_idx = packed_inputs(LENGTHS, 4, 2, 8, 8)
    total = q.shape[1]
    o, lse, idx = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=Bk, topk=topk, local_blocks=local_blocks,
                                       return_lse=True, return_indices=True, cu_seqlens=cu)
    ref_o, ref_lse, ref_idx = per_document(cu, lambda *x: R.msa_forward(*x, Bk, topk, local_blocks=local_blocks),
                                           q, k, v, q_idx, k_idx)
    assert o.dtype == f64 and o.shape == q.shape and lse.dtype == torch.float32 and lse.shape == (1, total, 4)
    assert idx.dtype == torch.int32 and idx.shape == (1, total, 2, topk)
    assert torch.equal(as_sets(idx), as_sets(ref_idx)), "the selection, counted from each document's start"
    torch.testing.assert_close(o, ref_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-6)
    # the case is one where top-k discards blocks, in several documents
    visible = (block_in_document(cu, Bk) + 1).view(1, total, 1)
    discarding = {d for d, (a, b) in enumerate(documents(cu)) if ((idx[:, a:b] >= 0).sum(-1) < visible[:, a:b]).any()}
    assert len(discarding) >= 2, discarding


def test_a_poisoned_document_changes_nothing_in_the_others():
    """NaN (or huge values) in every input row of one document, in the middle of the batch: every other
    document's outputs, lse, selection and gradients stay bit-identical, while the poison reaches its own rows."""
    Bk, topk = 16, 3
    cu, q, k, v, q_idx, k_idx = packed_inputs(LENGTHS, 4, 2, 8, 8)
    do = torch.randn_like(q)
    a, b = documents(cu)[4]  # the 75-token document: documents before it and after it
    others = torch.ones(q.shape[1], dtype=torch.bool)
    others[a:b] = False

    def run(*inputs):
        leaves = [t.clone().requires_grad_(True) for t in inputs[:3]]
        o, lse, idx = msa_tl.msa_attention(*leaves, *inputs[3:], block_size=Bk, topk=topk, local_blocks=2,
                                           return_lse=True, return_indices=True, cu_seqlens=cu)
        (o * do).sum().backward()
        return (o.detach(), lse, idx, *(t.grad for t in leaves))

    clean = run(q, k, v, q_idx, k_idx)
    for poison in ("nan", "huge"):
        inputs = [t.clone() for t in (q, k, v, q_idx, k_idx)]
        for t in inputs:
            t[:, a:b] = float("nan") if poison == "nan" else 1e3 * torch.randn_like(t[:, a:b])
        got = run(*inputs)
        for name, x, y in zip(("o", "lse", "indices", "dq", "dk", "dv"), got, clean):
            assert torch.equal(x[:, others], y[:, others]), (poison, name)
        if poison == "nan":
            assert torch.isnan(got[1][:, a:b]).all() and torch.isnan(got[0][:, a:b]).all()
        else:
            assert not torch.equal(got[0][:, a:b], clean[0][:, a:b])


@pytest.mark.parametrize("local_blocks", [1, 2])
def test_gradients_equal_the_per_document_reference(local_blocks):
    """dq, dk, dv of msa_attention (through o and lse) under cu_seqlens: the autograd gradients of the float64
    reference run on each document alone over its own selection."""
    Bk, topk = 16, 3
    cu, q, k, v, q_idx, k_idx = packed_inputs(LENGTHS, 4, 2, 8, 8)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o, lse = msa_tl.msa_attention(*leaves, q_idx, k_idx, block_size=Bk, topk=topk, local_blocks=local_blocks,
                                  return_lse=True, cu_seqlens=cu)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    ((o * do).sum() + (lse * dlse).sum()).backward()
    (ref_idx,) = per_document(cu, lambda qi, ki: (R.select_blocks(qi, ki, Bk, topk, local_blocks=local_blocks),),
                              q_idx, k_idx)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_o, ref_lse = per_document(cu, lambda *x: R.sparse_attention(*x, Bk), *ref_leaves, ref_idx)
    ((ref_o * do).sum() + (ref_lse * dlse.double()).sum()).backward()
    for name, got, ref in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        assert ref.grad.abs().sum() > 0
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_gradcheck_packed_sparse_attention():
    lengths, Bk = [3, 0, 20, 9], 16
    cu, q, k, v, _, _ = packed_inputs(lengths, 2, 1, 2, 4)
    indices = hostile_packed_indices(cu, Bk, groups=1, topk=3)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))  # o only: lse is float32 whatever the inputs' dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~2000 tiny calls: a second thread only adds waits (20x slower on a busy CPU)
    try:
        assert torch.autograd.gradcheck(
            lambda q, k, v: msa_tl.sparse_attention(q, k, v, indices, block_size=Bk, cu_seqlens=cu), (q, k, v))
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# user indices under cu_seqlens


def hostile_packed_indices(cu_seqlens, block_size, groups, topk, gen=None):
    """Document-relative ids anywhere in -3 .. (the longest document's blocks) + 2: negative ids (counted from a
    later document's start, -2 and -3 would name an earlier document's blocks), ids in the query's future or past
    its document's end (a later document's blocks), repeats, and rows of only -1."""
    total = int(cu_seqlens[-1])
    nblk = max(math.ceil((b - a) / block_size) for a, b in documents(cu_seqlens))
    ids = torch.randint(-3, nblk + 3, (1, total, groups, topk), generator=gen, dtype=torch.int32)
    ids[:, ::7, :, 1] = ids[:, ::7, :, 0]
    ids[:, 3::11] = -1
    return ids


def sanitised(indices, cu_seqlens, block_size):
    """The indices contract, row by row: the set of ids a query may see (0 .. its block in its document), each
    once, -1 in the other slots."""
    own = block_in_document(cu_seqlens, block_size)
    out = torch.full_like(indices, -1)
    for t in range(indices.shape[1]):
        for g in range(indices.shape[2]):
            kept = sorted({i for i in indices[0, t, g].tolist() if 0 <= i <= own[t]})
            out[0, t, g, :len(kept)] = torch.tensor(kept, dtype=torch.int32)
    return out


def test_hostile_indices_are_read_per_document():
    """Any int32 ids through sparse_attention(cu_seqlens=): the per-document reference over the sanitised ids, with
    gradients; rows with nothing visible give o = 0, lse = -inf."""
    Bk, topk = 16, 4
    cu, q, k, v, _, _ = packed_inputs(LENGTHS, 4, 2, 8, 8)
    raw = hostile_packed_indices(cu, Bk, 2, topk)
    clean = sanitised(raw, cu, Bk)
    first_doc = documents(cu)[0][1]
    assert (raw[:, first_doc:] < -1).any() and (clean != raw).any()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o, lse = msa_tl.sparse_attention(*leaves, raw, block_size=Bk, return_lse=True, cu_seqlens=cu)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_o, ref_lse = per_document(cu, lambda *x: R.sparse_attention(*x, Bk), *ref_leaves, clean)
    torch.testing.assert_close(o, ref_o, rtol=1e-12, atol=1e-12)
    empty = torch.isneginf(ref_lse)
    assert empty[:, 3::11].all() and not empty.all()
    assert torch.equal(torch.isneginf(lse), empty) and (o[empty] == 0).all()
    torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], rtol=0, atol=1e-6)
    do = torch.randn_like(o)
    (o * do).sum().backward()
    (ref_o * do).sum().backward()
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-10, atol=1e-12)
    no_lse = msa_tl.sparse_attention(q, k, v, raw, block_size=Bk, cu_seqlens=cu)
    assert torch.equal(no_lse, o.detach())


# ----------------------------------------------------------------------------------------------------------------
# the KL loss


@pytest.mark.parametrize("mode,max_seqlen", [("sparse", None), ("warmup", None), ("warmup", "longest"),
                                             ("warmup", "longer")],
                         ids=["sparse", "warmup", "warmup-max_seqlen", "warmup-larger-max_seqlen"])
def test_kl_loss_is_the_token_weighted_mean_of_the_documents(mode, max_seqlen):
    longest = max(LENGTHS)
    max_seqlen = {None: None, "longest": longest, "longer": longest + 37}[max_seqlen]
    check_packed_kl(LENGTHS, 4, 2, 8, 8, 16, 3, mode, f64, "cpu", None, max_seqlen=max_seqlen, loss_rtol=1e-12,
                    grad_rtol=1e-10, lse_rtol=1e-5)


def test_kl_rows_with_nothing_chosen_add_zero_with_the_main_lse():
    """A row whose slots are all -1 has lse = -inf from the main branch; passed as the teacher's normaliser it
    still adds 0 (reference and API, loss and gradients), as without it: the rows' own inputs change nothing."""
    B, N, Hq, G, D, Di, Bk = 2, 50, 4, 2, 8, 8, 16
    q, k, v = (torch.randn(B, N, h, D, dtype=f64) for h in (Hq, G, G))
    q_idx, k_idx = torch.randn(B, N, G, Di, dtype=f64), torch.randn(B, N, Di, dtype=f64)
    indices = R.select_blocks(q_idx, k_idx, Bk, 2)
    indices[:, 20] = -1
    indices[1, 33, 1] = -1
    _, lse = R.sparse_attention(q, k, v, indices, Bk)
    assert torch.isneginf(lse[:, 20]).all() and torch.isneginf(lse[1, 33, 2:]).all()
    without = R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk)
    given = R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk, lse=lse)
    assert torch.isfinite(given)
    torch.testing.assert_close(given, without, rtol=1e-12, atol=0)
    q2, q_idx2 = q.clone(), q_idx.clone()
    q2[:, 20], q_idx2[:, 20] = torch.randn_like(q2[:, 20]), torch.randn_like(q_idx2[:, 20])
    assert torch.equal(R.kl_alignment_loss(q2, k, q_idx2, k_idx, indices, Bk, lse=lse), given)
    for got, want in zip(R.kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, indices, Bk, lse=lse),
                         R.kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, indices, Bk)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    _, api_lse = msa_tl.sparse_attention(q, k, v, indices, block_size=Bk, return_lse=True)
    api = msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=Bk, lse=api_lse)
    assert torch.isfinite(api) and abs(api.item() - without.item()) <= 1e-6 * without.item()


# ----------------------------------------------------------------------------------------------------------------
# local_blocks


def brute_force_selection(q_idx, k_idx, block_size, topk, local_blocks):
    """The definition, by loops over one sequence's queries [1, N, ...]: (t, g) -> the chosen set. A visible block's
    score is the max over its keys j <= t of q_idx[t, g] . k_idx[j] / sqrt(Di); the local_blocks newest visible
    blocks (t // Bk and the ones before it, from block 0 on) are always chosen, the best-scoring older ones fill
    the rest up to topk."""
    N, G, Di = q_idx.shape[1:]
    out = {}
    for t in range(N):
        own = t // block_size
        forced = {own - j for j in range(local_blocks) if own - j >= 0}
        for g in range(G):
            s = k_idx[0, :t + 1] @ q_idx[0, t, g] / math.sqrt(Di)
            score = {blk: s[blk * block_size:(blk + 1) * block_size].max().item() for blk in range(own + 1)}
            older = sorted((blk for blk in score if blk not in forced), key=lambda blk: -score[blk])
            out[t, g] = forced | set(older[:topk - len(forced)])
    return out


@pytest.mark.parametrize("local_blocks", [1, 2, 3, 4])
def test_select_blocks_forces_the_newest_blocks_and_ranks_the_rest(local_blocks):
    """select_blocks(local_blocks=L) for L = 1 .. topk, one batch of two sequences and one packed batch, against
    the definition per query."""
    Bk, topk, G, Di = 16, 4, 2, 8
    seqs = torch.randn(2, 70, G, Di, dtype=f64), torch.randn(2, 70, Di, dtype=f64)
    batched = msa_tl.select_blocks(*seqs, block_size=Bk, topk=topk, local_blocks=local_blocks)
    cu, _, _, _, q_idx, k_idx = packed_inputs([90, 0, 7, 50], 2, G, 4, Di)
    packed = msa_tl.select_blocks(q_idx, k_idx, block_size=Bk, topk=topk, local_blocks=local_blocks, cu_seqlens=cu)
    cases = [(batched[b:b + 1], seqs[0][b:b + 1], seqs[1][b:b + 1]) for b in range(2)]
    cases += [(packed[:, a:b], q_idx[:, a:b], k_idx[:, a:b]) for a, b in documents(cu)]
    discarded = 0
    for got, qi, ki in cases:
        for (t, g), want in brute_force_selection(qi, ki, Bk, topk, local_blocks).items():
            row = got[0, t, g].tolist()
            assert sorted(i for i in row if i != -1) == sorted(want), (t, g, row, want)
            discarded += len(want) < t // Bk + 1
    assert discarded > 0


def test_packed_fp8_selection_is_the_selection_of_each_quantised_document():
    """select_blocks(index_fp8=True, cu_seqlens=, local_blocks=2): each document's rows the reference's selection over
    that document's q_idx / k_idx quantised per row to e4m3 (and not the unquantised selection)."""
    Bk, topk = 16, 3
    cu, _, _, _, q_idx, k_idx = packed_inputs(LENGTHS, 2, 2, 4, 8)
    got = msa_tl.select_blocks(q_idx, k_idx, block_size=Bk, topk=topk, local_blocks=2, index_fp8=True, cu_seqlens=cu)
    (want,) = per_document(cu, lambda qi, ki: (R.select_blocks(R.fake_quantize_fp8(qi), R.fake_quantize_fp8(ki), Bk,
                                                               topk, local_blocks=2),), q_idx, k_idx)
    assert torch.equal(as_sets(got), as_sets(want))
    plain = msa_tl.select_blocks(q_idx, k_idx, block_size=Bk, topk=topk, local_blocks=2, cu_seqlens=cu)
    assert not torch.equal(as_sets(plain), as_sets(got)), "e4m3 scores swap some near blocks"


def test_the_selection_check_takes_forced_blocks_and_documents():
    """The GPU tests' selection check (assert_selection_up_to_ties) passes the reference's selection in any slot
    order and catches rows that drop a forced block, reach into another document or the future, repeat a block or
    rank wrongly."""
    B, N, G, Di, Bk, topk, L = 2, 400, 2, 16, 32, 5, 2
    q_idx, k_idx = torch.randn(B, N, G, Di).bfloat16(), torch.randn(B, N, Di).bfloat16()
    starts = block_starts(B, N, Bk)
    assert starts[0].tolist() == [0, 1, 1, 3] + [4] * 9 and starts[1].tolist() == [0] * 9 + [9, 10, 10, 10]
    ref = R.select_blocks(q_idx, k_idx, Bk, topk, local_blocks=L, block_start=starts)
    shuffled = torch.stack([row[torch.randperm(topk)] for row in ref.view(-1, topk)]).view_as(ref)
    assert_selection_up_to_ties(shuffled, q_idx, k_idx, Bk, topk, local_blocks=L, block_start=starts)
    t = 12 * Bk + 5  # row 0: block 12, document of blocks 4 .. 12, so slots for 4 of blocks 4 .. 11
    row = ref[0, t, 1].tolist()
    assert set(row) >= {12, 11} and len(set(row) - {-1}) == topk

    def replaced(old, new, b=0, t=t, g=1):
        bad = ref.clone()
        bad[b, t, g][bad[b, t, g] == old] = new
        return bad

    ranked = [i for i in row if i not in (11, 12)]
    unchosen = sorted(set(range(4, 11)) - set(row))
    bad_cases = {
        "forced block dropped": replaced(11, -1),
        "earlier document": replaced(ranked[0], 3),
        "future block": replaced(ranked[0], 13),
        "repeat": replaced(ranked[0], ranked[1]),
        "poison": replaced(ranked[0], POISON_INDEX),
        "a worse block": replaced(ranked[0], unchosen[0]),
        "no documents": R.select_blocks(q_idx, k_idx, Bk, topk, local_blocks=L),
        "local_blocks 1": R.select_blocks(q_idx, k_idx, Bk, topk, block_start=starts),
    }
    for name, bad in bad_cases.items():
        with pytest.raises(AssertionError):
            assert_selection_up_to_ties(bad, q_idx, k_idx, Bk, topk, local_blocks=L, block_start=starts)
            pytest.fail(name)  # not reached when the check raises


def test_the_gpu_checks_pass_on_the_cpu_reference():
    """The GPU tests' per-document checks, run on the CPU reference path in bf16 (its error is bf16 rounding)."""
    gen = torch.Generator().manual_seed(1)
    check_packed_attention([0, 1, 20, 16, 45, 0], 4, 2, 16, 16, 16, 2, 2, torch.bfloat16, "cpu", gen)
    for mode in ("sparse", "warmup"):
        check_packed_kl([1, 20, 0, 45], 4, 2, 16, 16, 16, 2, mode, torch.bfloat16, "cpu", gen, loss_rtol=1e-5,
                        grad_rtol=1e-2, lse_rtol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("local_blocks", [2, 4])
@pytest.mark.parametrize("S", [1, 5])
def test_decode_with_local_blocks_equals_the_forward_rows(S, local_blocks, fresh_seed):
    """reference.msa_decode(local_blocks=L) rows equal reference.msa_forward(local_blocks=L) over each cache row's
    tokens (ragged rows, one shorter than a block), msa_decode's too; L changes the selection."""
    gen = torch.Generator().manual_seed(fresh_seed)
    B, N, Hq, G, D, Di, Bk, topk = 3, 200, 4, 2, 16, 8, 16, 4
    lengths = [200, 117, 10]
    q, k, v, q_idx, k_idx = (torch.randn(*shape, generator=gen, dtype=f64) for shape in
                             ((B, N, Hq, D), (B, N, G, D), (B, N, G, D), (B, N, G, Di), (B, N, Di)))
    cache = fill_paged(k, v, k_idx, lengths, Bk, gen)
    q_new, q_idx_new = newest(q, lengths, S), newest(q_idx, lengths, S)
    o, lse, idx = R.msa_decode(q_new, q_idx_new, cache.k, cache.v, cache.k_idx, cache.block_table, lengths, Bk, topk,
                               local_blocks=local_blocks)
    want = [R.msa_forward(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], q_idx[b:b + 1, :n], k_idx[b:b + 1, :n],
                          Bk, topk, local_blocks=local_blocks) for b, n in enumerate(lengths)]
    want_o, want_lse, want_idx = (torch.cat([w[i][:, n - S:n] for w, n in zip(want, lengths)]) for i in range(3))
    assert torch.equal(idx, want_idx)
    assert (o - want_o).abs().max().item() <= 1e-12 and (lse - want_lse).abs().max().item() <= 1e-12
    api_o, api_idx = msa_tl.msa_decode(q_new, q_idx_new, cache, block_size=Bk, topk=topk, local_blocks=local_blocks,
                                       return_indices=True)
    assert torch.equal(api_idx, idx) and (api_o - o).abs().max().item() <= 1e-12
    assert_decode_selection_up_to_ties(api_idx, q_idx_new, cache, Bk, topk, local_blocks=local_blocks)
    one = R.msa_decode(q_new, q_idx_new, cache.k, cache.v, cache.k_idx, cache.block_table, lengths, Bk, topk)[2]
    assert not torch.equal(as_sets(one), as_sets(idx)), "local_blocks changes the selection"
    bad = api_idx.clone()
    bad[0, 0, 0][bad[0, 0, 0] == (lengths[0] - S) // Bk - 1] = -1  # drop the second-newest block of one row
    with pytest.raises(AssertionError):
        assert_decode_selection_up_to_ties(bad, q_idx_new, cache, Bk, topk, local_blocks=local_blocks)


# ----------------------------------------------------------------------------------------------------------------
# arguments


def call_packed(api, cu_seqlens, batch=1, **options):
    """One call of ``api`` on 25 packed float32 tokens (documents of 5 and 20 for the valid cu_seqlens)."""
    q, k, v, q_idx = (torch.randn(batch, 25, h, 4) for h in (2, 1, 1, 1))
    k_idx = torch.randn(batch, 25, 4)
    indices = torch.zeros(batch, 25, 1, 2, dtype=torch.int32)
    calls = {
        "msa_attention": lambda: msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=16, topk=2,
                                                      cu_seqlens=cu_seqlens, **options),
        "sparse_attention": lambda: msa_tl.sparse_attention(q, k, v, indices, block_size=16, cu_seqlens=cu_seqlens,
                                                            **options),
        "select_blocks": lambda: msa_tl.select_blocks(q_idx, k_idx, block_size=16, topk=2, cu_seqlens=cu_seqlens,
                                                      **options),
        "kl_alignment_loss": lambda: msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, None, block_size=16,
                                                              cu_seqlens=cu_seqlens, **options),
    }
    return calls[api]()


VALID_CU = [0, 5, 25]
APIS = ["msa_attention", "sparse_attention", "select_blocks", "kl_alignment_loss"]
BAD_CU_SEQLENS = [
    ("list", TypeError, "cu_seqlens must be a torch.Tensor", lambda: VALID_CU),
    ("int64", TypeError, "cu_seqlens must be int32", lambda: torch.tensor(VALID_CU)),
    ("2-D", ValueError, r"cu_seqlens must be \[num_docs \+ 1\]", lambda: torch.tensor([VALID_CU], dtype=torch.int32)),
    ("no-document", ValueError, r"cu_seqlens must be \[num_docs \+ 1\]", lambda: torch.tensor([0], dtype=torch.int32)),
    ("other-device", ValueError, "cu_seqlens is on meta", lambda: torch.tensor(VALID_CU, dtype=torch.int32).to("meta")),
    ("short-of-total", ValueError, "cu_seqlens must rise from 0 to the packed length 25", lambda: [0, 5, 24]),
    ("past-total", ValueError, "cu_seqlens must rise from 0 to the packed length 25", lambda: [0, 5, 30]),
    ("not-from-0", ValueError, "cu_seqlens must rise from 0", lambda: [2, 5, 25]),
    ("decreasing", ValueError, "cu_seqlens must rise from 0", lambda: [0, 20, 5, 25]),
]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case,error,match,make", BAD_CU_SEQLENS, ids=[c[0] for c in BAD_CU_SEQLENS])
def test_bad_cu_seqlens_is_rejected_naming_it(api, case, error, match, make):
    cu = make()
    if isinstance(cu, list) and case != "list":
        cu = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(error, match=match):
        call_packed(api, cu)


@pytest.mark.parametrize("api", APIS)
def test_cu_seqlens_needs_one_packed_row(api):
    call_packed(api, torch.tensor(VALID_CU, dtype=torch.int32))  # valid as it is
    with pytest.raises(ValueError, match="with cu_seqlens the documents are packed into one row: batch must be 1"):
        call_packed(api, torch.tensor(VALID_CU, dtype=torch.int32), batch=2)


@pytest.mark.parametrize("max_seqlen,match", [(19, "max_seqlen 19 is below the longest document"),
                                              (0, "max_seqlen must be"), (20.0, "max_seqlen must be"),
                                              (True, "max_seqlen must be")])
def test_bad_max_seqlen_is_rejected_naming_it(max_seqlen, match):
    cu = torch.tensor(VALID_CU, dtype=torch.int32)
    call_packed("kl_alignment_loss", cu, max_seqlen=20)  # the longest document: valid
    with pytest.raises(ValueError, match=match):
        call_packed("kl_alignment_loss", cu, max_seqlen=max_seqlen)


@pytest.mark.parametrize("local_blocks", [0, 3, -1, 1.0, True, "1"], ids=["0", "above-topk", "-1", "float", "bool",
                                                                          "str"])
@pytest.mark.parametrize("api", ["msa_attention", "select_blocks", "msa_decode"])
def test_bad_local_blocks_is_rejected_naming_it(api, local_blocks):
    cu = torch.tensor(VALID_CU, dtype=torch.int32)
    if api == "msa_decode":
        cache = MSACache.paged(1, 32, 1, 4, 4, page_size=16, dtype=torch.float32)
        cache.append(torch.randn(1, 20, 1, 4), torch.randn(1, 20, 1, 4), torch.randn(1, 20, 4))

        def call(**options):
            return msa_tl.msa_decode(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 1, 4), cache, block_size=16, topk=2,
                                     **options)
    else:
        def call(**options):
            return call_packed(api, cu, **options)
    call(local_blocks=2)  # local_blocks == topk is valid
    with pytest.raises(ValueError, match=r"local_blocks must be an int in \[1, topk = 2\]"):
        call(local_blocks=local_blocks)
