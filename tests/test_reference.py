"""The float64 reference against independent facts: loops, SDPA, invariants, gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F

from msa_tl import reference as R

f64 = dict(dtype=torch.float64)


def make_inputs(B, N, Hq, G, D, Di, requires_grad=False):
    q = torch.randn(B, N, Hq, D, **f64)
    k = torch.randn(B, N, G, D, **f64)
    v = torch.randn(B, N, G, D, **f64)
    q_idx = torch.randn(B, N, G, Di, **f64)
    k_idx = torch.randn(B, N, Di, **f64)
    if requires_grad:
        for t in (q, k, v, q_idx, k_idx):
            t.requires_grad_(True)
    return q, k, v, q_idx, k_idx


def sdpa_causal(q, k, v):
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return o.transpose(1, 2)


def chosen_sets(indices):
    """indices [B, N, G, k] -> dict (b, t, g) -> set of chosen ids, checking -1 only trails."""
    out = {}
    B, N, G, K = indices.shape
    for b in range(B):
        for t in range(N):
            for g in range(G):
                row = indices[b, t, g].tolist()
                used = [x for x in row if x >= 0]
                assert row == used + [-1] * (K - len(used)), f"-1 must fill trailing slots: {row}"
                assert len(set(used)) == len(used), f"duplicate block in {row}"
                out[b, t, g] = set(used)
    return out


def test_block_scores_equal_explicit_loops():
    B, N, G, Di, Bk = 2, 37, 3, 8, 8
    _, _, _, q_idx, k_idx = make_inputs(B, N, 1, G, 1, Di)
    S = R.block_scores(q_idx, k_idx, Bk)
    nblk = math.ceil(N / Bk)
    assert S.shape == (B, G, N, nblk) and S.dtype == torch.float64
    for b in range(B):
        for g in range(G):
            for t in range(N):
                for blk in range(nblk):
                    keys = [j for j in range(blk * Bk, min(N, (blk + 1) * Bk)) if j <= t]
                    want = max((float(q_idx[b, t, g] @ k_idx[b, j]) / math.sqrt(Di) for j in keys), default=-math.inf)
                    assert S[b, g, t, blk].item() == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("N,Bk,topk,G", [(70, 8, 3, 2), (33, 16, 4, 1), (50, 8, 16, 4), (9, 16, 2, 2)])
def test_topk_matches_brute_force(N, Bk, topk, G):
    B, Di = 2, 16
    _, _, _, q_idx, k_idx = make_inputs(B, N, 1, G, 1, Di)
    S = R.block_scores(q_idx, k_idx, Bk)
    indices = R.topk_blocks(S, topk, Bk)
    assert indices.dtype == torch.int32 and indices.shape == (B, N, G, topk)
    sets = chosen_sets(indices)
    for (b, t, g), got in sets.items():
        local = t // Bk
        others = sorted(range(local), key=lambda blk: -S[b, g, t, blk].item())
        assert got == {local, *others[: topk - 1]}, (b, t, g)
        assert indices[b, t, g, : len(got)].tolist() == sorted(got), "chosen ids must be ascending"


@pytest.mark.parametrize(
    "B,N,G,Bk,topk",
    [(1, 300, 4, 16, 4), (2, 129, 2, 32, 16), (2, 20, 1, 16, 16), (1, 100, 8, 16, 3)],
    ids=["long", "ragged-batch2", "N<Bk", "G8"],
)
def test_selection_invariants(B, N, G, Bk, topk):
    _, _, _, q_idx, k_idx = make_inputs(B, N, 1, G, 1, 16)
    indices = R.select_blocks(q_idx, k_idx, Bk, topk)
    for (b, t, g), got in chosen_sets(indices).items():
        local = t // Bk
        assert local in got, "the local block is always chosen"
        assert max(got) <= local, "no block from the future"
        assert len(got) == min(topk, local + 1), "fewer than topk visible means all of them"


def test_select_blocks_equals_block_scores_then_topk():
    _, _, _, q_idx, k_idx = make_inputs(2, 90, 1, 2, 1, 8)
    direct = R.topk_blocks(R.block_scores(q_idx, k_idx, 16), 3, 16)
    assert torch.equal(R.select_blocks(q_idx, k_idx, 16, 3), direct)


@pytest.mark.parametrize("N,Bk,Hq,G", [(64, 16, 4, 4), (77, 16, 8, 2), (100, 32, 6, 1), (13, 16, 2, 2)])
def test_full_budget_equals_dense_causal_sdpa(N, Bk, Hq, G):
    B, D = 2, 16
    q, k, v, q_idx, k_idx = make_inputs(B, N, Hq, G, D, 8)
    o, lse, indices = R.msa_forward(q, k, v, q_idx, k_idx, Bk, topk=math.ceil(N / Bk))
    torch.testing.assert_close(o, sdpa_causal(q, k, v), rtol=1e-10, atol=1e-10)
    s = torch.einsum("bthd,bjhd->bhtj", q, k.repeat_interleave(Hq // G, dim=2)) / math.sqrt(D)
    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).transpose(1, 2), rtol=1e-10, atol=1e-10)
    assert (indices[:, -1] >= 0).all(), "the last query sees every block"


def test_sparse_attention_equals_per_query_gather():
    B, N, Hq, G, D, Bk, topk = 2, 45, 4, 2, 8, 8, 2
    q, k, v, q_idx, k_idx = make_inputs(B, N, Hq, G, D, 8)
    indices = R.select_blocks(q_idx, k_idx, Bk, topk)
    o, lse = R.sparse_attention(q, k, v, indices, Bk)
    for b in range(B):
        for t in range(N):
            for h in range(Hq):
                g = h // (Hq // G)
                keys = [j for blk in indices[b, t, g].tolist() if blk >= 0
                        for j in range(blk * Bk, min(N, (blk + 1) * Bk)) if j <= t]
                logits = k[b, keys, g] @ q[b, t, h] / math.sqrt(D)
                assert lse[b, t, h].item() == pytest.approx(torch.logsumexp(logits, 0).item(), rel=1e-12)
                torch.testing.assert_close(o[b, t, h], torch.softmax(logits, 0) @ v[b, keys, g])


def test_split_blocks_attend_to_the_same_tokens():
    """The wide-head forward's block split: each chosen block's visible halves, a half in the query's future -1, so
    the float64 reference over the halves equals the one over the blocks (with -1 slots and a ragged end)."""
    from msa_tl.attention.kv_outer import split_blocks

    B, N, Hq, G, D, Bk, topk = 2, 45, 4, 2, 8, 8, 3
    q, k, v, q_idx, k_idx = make_inputs(B, N, Hq, G, D, 8)
    indices = R.select_blocks(q_idx, k_idx, Bk, topk)
    indices[0, 30, 1, 1] = -1
    halves = split_blocks(indices, Bk, Bk // 2)
    assert halves.shape == (B, N, G, 2 * topk) and halves.dtype == torch.int32
    local = (torch.arange(N) // (Bk // 2)).view(1, N, 1, 1)
    assert ((halves == -1) | ((halves >= 0) & (halves <= local))).all()
    assert ((halves // 2 == indices.repeat_interleave(2, -1)) | (halves == -1)).all()
    o, lse = R.sparse_attention(q, k, v, indices, Bk)
    o_halves, lse_halves = R.sparse_attention(q, k, v, halves, Bk // 2)
    torch.testing.assert_close(o_halves, o)
    torch.testing.assert_close(lse_halves, lse)


def test_unused_slots_and_duplicate_free_indices_are_honoured():
    """Given indices (not from top-k): -1 slots contribute nothing, a row with only -1 gives o = 0, lse = -inf."""
    B, N, Hq, G, D, Bk = 1, 32, 2, 1, 8, 8
    q, k, v, _, _ = make_inputs(B, N, Hq, G, D, 8)
    indices = torch.full((B, N, G, 3), -1, dtype=torch.int32)
    indices[0, 8:, 0, 0] = 0  # queries 8.. attend to block 0 only; queries 0..7 attend to nothing
    o, lse = R.sparse_attention(q, k, v, indices, Bk)
    assert torch.all(o[0, :8] == 0) and torch.all(lse[0, :8] == -math.inf)
    logits = torch.einsum("thd,jd->htj", q[0, 8:], k[0, :8, 0]) / math.sqrt(D)
    torch.testing.assert_close(o[0, 8:], torch.einsum("htj,jd->thd", torch.softmax(logits, -1), v[0, :8, 0]))


def test_chunking_does_not_change_results(monkeypatch):
    B, N, Hq, G, D, Bk, topk = 2, 150, 4, 2, 8, 16, 3
    q, k, v, q_idx, k_idx = make_inputs(B, N, Hq, G, D, 8)
    whole = R.msa_forward(q, k, v, q_idx, k_idx, Bk, topk)
    whole_kl = R.kl_alignment_loss(q, k, q_idx, k_idx, whole[2], Bk)
    monkeypatch.setattr(R, "_CHUNK_ELEMENTS", 7 * B * Hq * N)  # 7-query chunks, not block-aligned
    chunked = R.msa_forward(q, k, v, q_idx, k_idx, Bk, topk)
    assert torch.equal(chunked[2], whole[2])
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(R.kl_alignment_loss(q, k, q_idx, k_idx, whole[2], Bk), whole_kl)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "warmup"])
def test_kl_is_zero_when_student_equals_teacher(sparse):
    # one group, two identical heads, index projections equal to the main ones: student == teacher
    B, N, D, Bk = 2, 60, 16, 8
    q1 = torch.randn(B, N, 1, D, **f64)
    q = q1.expand(B, N, 2, D).contiguous()
    k = torch.randn(B, N, 1, D, **f64)
    indices = R.select_blocks(q1, k[:, :, 0], Bk, 3) if sparse else None
    loss = R.kl_alignment_loss(q, k, q1, k[:, :, 0], indices, Bk)
    assert abs(loss.item()) < 1e-12


def test_kl_equals_per_row_formula_and_is_positive():
    B, N, Hq, G, D, Di, Bk = 1, 40, 4, 2, 8, 8, 8
    q, k, _, q_idx, k_idx = make_inputs(B, N, Hq, G, D, Di)
    indices = R.select_blocks(q_idx, k_idx, Bk, 2)
    loss = R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk)
    total, R_ = 0.0, Hq // G
    for t in range(N):
        for g in range(G):
            keys = [j for blk in indices[0, t, g].tolist() if blk >= 0
                    for j in range(blk * Bk, min(N, (blk + 1) * Bk)) if j <= t]
            teacher = torch.stack([torch.softmax(k[0, keys, g] @ q[0, t, h] / math.sqrt(D), 0)
                                   for h in range(g * R_, (g + 1) * R_)]).mean(0)
            student = torch.log_softmax(k_idx[0, keys] @ q_idx[0, t, g] / math.sqrt(Di), 0)
            total += float((teacher * (teacher.log() - student)).sum())
    assert loss.item() == pytest.approx(total / (N * G), rel=1e-10)
    assert loss.item() > 0
    loss_again, student_lse = R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk, return_student_lse=True)
    assert loss_again.item() == loss.item() and student_lse.shape == (B, N, G)
    for t, g in ((0, 0), (17, 1), (N - 1, 0)):
        keys = [j for blk in indices[0, t, g].tolist() if blk >= 0
                for j in range(blk * Bk, min(N, (blk + 1) * Bk)) if j <= t]
        want = torch.logsumexp(k_idx[0, keys] @ q_idx[0, t, g] / math.sqrt(Di), 0)
        assert student_lse[0, t, g].item() == pytest.approx(want.item(), rel=1e-12)


def test_warmup_kl_equals_sparse_kl_with_every_block():
    B, N, Hq, G, D, Bk = 2, 50, 4, 2, 8, 16
    q, k, _, q_idx, k_idx = make_inputs(B, N, Hq, G, D, 8)
    every = R.select_blocks(q_idx, k_idx, Bk, math.ceil(N / Bk))
    torch.testing.assert_close(
        R.kl_alignment_loss(q, k, q_idx, k_idx, None, Bk), R.kl_alignment_loss(q, k, q_idx, k_idx, every, Bk)
    )


def test_kl_gradient_reaches_index_inputs_only():
    q, k, v, q_idx, k_idx = make_inputs(1, 40, 4, 2, 8, 8, requires_grad=True)
    indices = R.select_blocks(q_idx.detach(), k_idx.detach(), 8, 2)
    R.kl_alignment_loss(q, k, q_idx, k_idx, indices, 8).backward()
    assert q.grad is None and k.grad is None
    assert q_idx.grad.abs().sum() > 0 and k_idx.grad.abs().sum() > 0


def test_dense_attention_equals_sdpa():
    q, k, v, _, _ = make_inputs(2, 33, 6, 3, 8, 8)
    o, _ = R.dense_attention(q, k, v)
    torch.testing.assert_close(o, sdpa_causal(q, k, v), rtol=1e-10, atol=1e-10)


def test_gradcheck_sparse_attention():
    q, k, v, q_idx, k_idx = make_inputs(1, 12, 4, 2, 4, 4, requires_grad=True)
    indices = R.select_blocks(q_idx.detach(), k_idx.detach(), 4, 2)
    assert torch.autograd.gradcheck(lambda q, k, v: R.sparse_attention(q, k, v, indices, 4), (q, k, v))


def test_gradcheck_kl_loss_sparse_and_warmup():
    q, k, _, q_idx, k_idx = make_inputs(1, 12, 4, 2, 4, 4, requires_grad=True)
    indices = R.select_blocks(q_idx.detach(), k_idx.detach(), 4, 2)
    for chosen in (indices, None):
        assert torch.autograd.gradcheck(
            lambda qi, ki: R.kl_alignment_loss(q.detach(), k.detach(), qi, ki, chosen, 4), (q_idx, k_idx)
        )


def test_reference_accepts_low_precision_inputs_and_computes_in_float64():
    q, k, v, q_idx, k_idx = (t.to(torch.bfloat16) for t in make_inputs(1, 40, 4, 2, 8, 8))
    o, lse, indices = R.msa_forward(q, k, v, q_idx, k_idx, 16, 2)
    assert o.dtype == torch.float64 and lse.dtype == torch.float64
    o64, lse64, idx64 = R.msa_forward(*(t.double() for t in (q, k, v, q_idx, k_idx)), 16, 2)
    assert torch.equal(indices, idx64) and torch.equal(o, o64) and torch.equal(lse, lse64)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_written_out_backward_matches_autograd(dense):
    B, N, Hq, G, D, Di, Bk, topk = 2, 70, 4, 2, 8, 5, 16, 3
    q, k, v = (torch.randn(B, N, h, D, dtype=torch.float64, requires_grad=True) for h in (Hq, G, G))
    q_idx = torch.randn(B, N, G, Di, dtype=torch.float64, requires_grad=True)
    k_idx = torch.randn(B, N, Di, dtype=torch.float64, requires_grad=True)
    indices = None if dense else R.select_blocks(q_idx.detach(), k_idx.detach(), Bk, topk)
    o, lse = R.sparse_attention(q, k, v, indices, Bk, 0.3)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    ((o * do).sum() + (lse * dlse).sum()).backward()
    grads = R.sparse_attention_backward(do, dlse, q.detach(), k.detach(), v.detach(), indices, Bk, 0.3)
    for got, leaf in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-12)
    loss = R.kl_alignment_loss(q.detach(), k.detach(), q_idx, k_idx, indices, Bk, 0.3, 0.7)
    (2.5 * loss).backward()
    dq_idx, dk_idx = R.kl_alignment_loss_backward(2.5, q.detach(), k.detach(), q_idx.detach(), k_idx.detach(),
                                                  indices, Bk, 0.3, 0.7)
    torch.testing.assert_close(dq_idx, q_idx.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dk_idx, k_idx.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "warmup"])
def test_kl_takes_the_given_lse_as_the_teachers_normaliser(dense):
    """With the main branch's own lse the loss is the KL; with any lse the written-out backward is its gradient."""
    B, N, Hq, G, D, Di, Bk, topk = 2, 50, 4, 2, 8, 5, 16, 2
    q, k, v = (torch.randn(B, N, h, D, dtype=torch.float64) for h in (Hq, G, G))
    q_idx = torch.randn(B, N, G, Di, dtype=torch.float64)
    k_idx = torch.randn(B, N, Di, dtype=torch.float64)
    indices = None if dense else R.select_blocks(q_idx, k_idx, Bk, topk)
    _, lse = R.sparse_attention(q, k, v, indices, Bk, 0.3)
    kl = R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk, 0.3, 0.7)
    torch.testing.assert_close(R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk, 0.3, 0.7, lse=lse), kl)
    for given in (lse, lse + 0.3 * torch.randn_like(lse)):
        qi, ki = q_idx.clone().requires_grad_(True), k_idx.clone().requires_grad_(True)
        loss = R.kl_alignment_loss(q, k, qi, ki, indices, Bk, 0.3, 0.7, lse=given)
        loss.backward()
        dq_idx, dk_idx = R.kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, indices, Bk, 0.3, 0.7, lse=given)
        torch.testing.assert_close(dq_idx, qi.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(dk_idx, ki.grad, rtol=1e-10, atol=1e-14)
    assert (R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk, 0.3, 0.7, lse=lse + 1.0) - kl).abs() > 1e-2


def test_selection_check_takes_any_slot_order_and_catches_bad_rows():
    from msa_tl.checks import assert_same_selection_up_to_ties

    q_idx, k_idx = torch.randn(1, 300, 2, 16).bfloat16(), torch.randn(1, 300, 16).bfloat16()
    idx = R.select_blocks(q_idx, k_idx, 32, 4).int()
    shuffled = torch.stack([row[torch.randperm(4)] for row in idx.view(-1, 4)]).view_as(idx)
    assert_same_selection_up_to_ties(shuffled, q_idx, k_idx, 32, 4)  # slot order is not part of the contract
    no_local = idx.clone()
    no_local[0, 200, 0][no_local[0, 200, 0] == 200 // 32] = -1
    future = idx.clone()
    future[0, 40, 0, 3] = 5  # query 40 (block 1) has two free slots
    negative = idx.clone()
    negative[0, 250, 0][negative[0, 250, 0] != 250 // 32] = -3
    for bad in (no_local, future, negative):
        with pytest.raises(AssertionError):
            assert_same_selection_up_to_ties(bad, q_idx, k_idx, 32, 4)


def test_indices_outside_the_visible_blocks_are_ignored_and_duplicates_count_once():
    """The reference side of the indices contract: only ids in [0, the query's block] select keys."""
    B, N, Hq, G, D, Bk = 1, 90, 4, 2, 8, 16
    q, k, v = (torch.randn(B, N, h, D, dtype=torch.float64) for h in (Hq, G, G))
    local = (torch.arange(N) // Bk).int()[None, :, None].expand(B, N, G)
    clean = torch.stack([local, torch.zeros_like(local), torch.full_like(local, -1)], -1).contiguous()
    clean[..., 1] = torch.where(local > 0, 0, -1)
    messy = clean.clone()
    messy[..., 2] = torch.where(local > 0, clean[..., 1], local + 1)  # a duplicate, or the next (future) block
    messy[:, ::7, :, 2] = 1000  # past the last block
    for got, want in zip(R.sparse_attention(q, k, v, messy, Bk), R.sparse_attention(q, k, v, clean, Bk)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    do = torch.randn(B, N, Hq, D, dtype=torch.float64)
    for got, want in zip(R.sparse_attention_backward(do, None, q, k, v, messy, Bk),
                         R.sparse_attention_backward(do, None, q, k, v, clean, Bk)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_nan_and_inf_index_scores_never_cost_the_local_block():
    B, G, N, Bk, topk = 1, 1, 256, 16, 4
    nblk = N // Bk
    scores = torch.randn(B, G, N, nblk, dtype=torch.float64)
    scores[..., ::2] = float("nan")  # half the blocks score NaN for every query
    scores[..., 1::4] = float("inf")
    indices = R.topk_blocks(scores, topk, Bk)
    local = (torch.arange(N) // Bk)[None, :, None]
    assert (indices == local[..., None]).any(-1).all(), "the local block is always chosen"
    chosen_nan = ((indices >= 0) & (indices % 2 == 0) & (indices != local[..., None])).any()
    assert not chosen_nan, "a NaN score never chooses its block"
    late = indices[0, 200, 0].tolist()  # block 12: the +inf blocks 1, 5, 9 win the other three slots
    assert sorted(late) == [1, 5, 9, 12]


def test_a_nan_key_reaches_only_the_gradients_of_tokens_its_rows_chose():
    """dk / dv of a key that no NaN row chose stay finite (a NaN row's delta times a zero probability is not
    let through); dq is NaN for exactly the rows that see the NaN."""
    B, N, Hq, G, D, Bk = 1, 96, 4, 2, 8, 16
    q, k, v = torch.randn(B, N, Hq, D), torch.randn(B, N, G, D), torch.randn(B, N, G, D)
    k[0, 90, 1, 3] = float("nan")  # block 5, seen by queries 90..95 of group 1
    local = (torch.arange(N) // Bk)[None, :, None, None]
    indices = torch.cat([local, torch.zeros_like(local)], dim=-1).expand(B, N, G, 2).int()  # own block and block 0
    dq, dk, dv = R.sparse_attention_backward(torch.randn(B, N, Hq, D), None, q, k, v, indices, Bk)
    poisoned = torch.isnan(R.sparse_attention(q, k, v, indices, Bk)[1])
    assert torch.equal(torch.isnan(dq).any(-1), poisoned) and poisoned[0, 90:, 2:].all() and not poisoned[0, :90].any()
    nan_keys = torch.isnan(dk).any(-1)[0]  # [N, G]
    assert nan_keys[80:96, 1].any() and nan_keys[:16, 1].any()  # the NaN rows' own block and block 0
    assert not nan_keys[16:80].any() and not nan_keys[:, 0].any()  # keys they never chose, the other group
    assert not torch.isnan(dv[0, 16:80]).any()


@pytest.mark.parametrize("where", ["k_idx", "k"], ids=["nan-index-key", "nan-key"])
def test_a_nan_reaches_only_the_index_gradients_of_rows_that_chose_it(where):
    """KL backward: a NaN index key (the student) or key (the teacher) at token j makes dq_idx NaN for exactly the
    (query, group) rows that chose it, and dk_idx NaN only at tokens those rows chose; every other gradient equals
    the NaN-free one (0 * NaN of tokens a row never chose is not let through)."""
    B, N, Hq, G, D, Di, Bk, topk = 1, 96, 4, 2, 8, 6, 16, 2
    q, k = torch.randn(B, N, Hq, D, dtype=torch.float64), torch.randn(B, N, G, D, dtype=torch.float64)
    q_idx, k_idx = torch.randn(B, N, G, Di, dtype=torch.float64), torch.randn(B, N, Di, dtype=torch.float64)
    local = (torch.arange(N) // Bk)[None, :, None, None]
    indices = torch.cat([local, torch.zeros_like(local)], dim=-1).expand(B, N, G, topk).int()  # own block, block 0
    clean = R.kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, indices, Bk)
    if where == "k_idx":
        k_idx[0, 90, 2] = float("nan")  # every group's rows 90.. of block 5 see it
        chose = torch.zeros(B, N, G, dtype=torch.bool)
        chose[0, 90:] = True
    else:
        k[0, 90, 1, 3] = float("nan")  # group 1's rows 90.. see it
        chose = torch.zeros(B, N, G, dtype=torch.bool)
        chose[0, 90:, 1] = True
    dq_idx, dk_idx = R.kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, indices, Bk)
    assert torch.equal(torch.isnan(dq_idx).any(-1), chose) and torch.isnan(dq_idx[chose]).all()
    torch.testing.assert_close(dq_idx[~chose], clean[0][~chose])
    nan_tokens = torch.isnan(dk_idx).any(-1)[0]  # [N]
    assert nan_tokens[80:96].any() and nan_tokens[:16].any() and not nan_tokens[16:80].any()
    torch.testing.assert_close(dk_idx[0, 16:80], clean[1][0, 16:80])
    assert torch.isnan(R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk))
