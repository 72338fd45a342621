"""Queries at an offset into their keys (``query_start``): the rows of a chunk of a longer sequence, as chunked
prefill and context parallelism run them. Each stage's chunk must equal the same rows of the whole sequence.

CPU: the float64 reference path, compared with the whole sequence's rows tightly. GPU (`pytest -m gpu`): the
kernels (which read and write the query side at the offset: no rows before the chunk are allocated) against the
float64 reference at the offset, held to FA3's calibration.
"""

import pytest
import torch

import msa_tl
from msa_tl import reference as R
from msa_tl.ops import dispatch
from test_conformance_gpu import assert_within_calibration, dtype_baseline
from test_varlen import assert_selection_up_to_ties, fresh_seed  # noqa: F401  (fresh_seed: the fixed default seed)

f64 = torch.float64
CUDA = torch.device("cuda")


def inputs(B, N, Hq, G, D, Di, dtype=f64, device="cpu", gen=None):
    """q, k, v, q_idx, k_idx of a whole sequence of N tokens."""
    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=f64).to(device, dtype)

    return rand(B, N, Hq, D), rand(B, N, G, D), rand(B, N, G, D), rand(B, N, G, Di), rand(B, N, Di)


# ----------------------------------------------------------------------------------------------------------------
# CPU: a chunk equals the whole sequence's rows


CHUNKS = pytest.mark.parametrize("t0,t1", [(0, 40), (32, 80), (37, 96), (95, 96)],
                                 ids=["first", "block-aligned", "mid-block", "last-token"])


@CHUNKS
@pytest.mark.parametrize("local_blocks", [1, 2])
def test_a_chunk_selects_and_attends_as_the_whole_sequence_does(t0, t1, local_blocks):
    B, N, Hq, G, D, Di, Bk, topk = 2, 96, 4, 2, 16, 8, 16, 3
    q, k, v, q_idx, k_idx = inputs(B, N, Hq, G, D, Di)
    o, lse, idx = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=Bk, topk=topk, local_blocks=local_blocks,
                                       return_lse=True, return_indices=True)
    chunk = msa_tl.msa_attention(q[:, t0:t1].contiguous(), k[:, :t1].contiguous(), v[:, :t1].contiguous(),
                                 q_idx[:, t0:t1].contiguous(), k_idx[:, :t1].contiguous(), block_size=Bk, topk=topk,
                                 local_blocks=local_blocks, return_lse=True, return_indices=True, query_start=t0)
    assert torch.equal(chunk[2], idx[:, t0:t1])
    torch.testing.assert_close(chunk[0], o[:, t0:t1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunk[1], lse[:, t0:t1], rtol=0, atol=0)  # lse is float32 on both


@CHUNKS
def test_chunk_gradients_are_the_whole_sequences_rows(t0, t1):
    """Back-propagating the chunk's rows of a loss gives the whole sequence's gradients of those rows: dq on the
    chunk, dk / dv on the keys before its end (none after it)."""
    B, N, Hq, G, D, Di, Bk, topk = 2, 96, 4, 2, 16, 8, 16, 3
    q, k, v, q_idx, k_idx = inputs(B, N, Hq, G, D, Di)
    idx = msa_tl.select_blocks(q_idx, k_idx, block_size=Bk, topk=topk)
    do, dlse = torch.randn(B, N, Hq, D, dtype=f64), torch.randn(B, N, Hq, dtype=f64)
    keep = torch.zeros(1, N, 1, dtype=f64)
    keep[:, t0:t1] = 1

    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    o, lse = msa_tl.sparse_attention(*whole, idx, block_size=Bk, return_lse=True)
    ((o * do).sum(-1) * keep + lse * dlse * keep).sum().backward()

    part = [q[:, t0:t1].clone().requires_grad_(), k[:, :t1].clone().requires_grad_(),
            v[:, :t1].clone().requires_grad_()]
    o_c, lse_c = msa_tl.sparse_attention(*part, idx[:, t0:t1].contiguous(), block_size=Bk, return_lse=True,
                                         query_start=t0)
    ((o_c * do[:, t0:t1]).sum() + (lse_c * dlse[:, t0:t1]).sum()).backward()
    torch.testing.assert_close(part[0].grad, whole[0].grad[:, t0:t1], rtol=1e-10, atol=1e-12)
    for name, got, want in (("dk", part[1].grad, whole[1].grad), ("dv", part[2].grad, whole[2].grad)):
        torch.testing.assert_close(got, want[:, :t1], rtol=1e-10, atol=1e-12, msg=name)
        assert not want[:, t1:].any(), f"{name}: keys after the chunk got a gradient from it"


@CHUNKS
@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_chunk_kl_is_the_mean_over_its_rows(t0, t1, mode):
    """The chunk's loss times its share of the rows, plus the same for the rows before it, is the whole loss; the
    index gradients likewise (dk_idx summed over the two)."""
    B, N, Hq, G, D, Di, Bk, topk = 2, 96, 4, 2, 16, 8, 16, 3
    q, k, _, q_idx, k_idx = inputs(B, N, Hq, G, D, Di)
    idx = msa_tl.select_blocks(q_idx, k_idx, block_size=Bk, topk=topk) if mode == "sparse" else None

    def rows(x, a, b):
        return None if x is None else x[:, a:b].contiguous()

    qi, ki = q_idx.clone().requires_grad_(), k_idx.clone().requires_grad_()
    whole = msa_tl.kl_alignment_loss(q, k, qi, ki, idx, block_size=Bk)
    whole.backward()
    total = 0
    grads_q, grad_k = [], torch.zeros_like(k_idx)
    for a, b in ((0, t0), (t0, N)):
        if a == b:
            continue
        pqi, pki = rows(q_idx, a, b).requires_grad_(), k_idx[:, :b].clone().requires_grad_()
        loss = msa_tl.kl_alignment_loss(rows(q, a, b), k[:, :b].contiguous(), pqi, pki, rows(idx, a, b),
                                        block_size=Bk, query_start=a)
        (loss * (b - a) / N).backward()
        total = total + loss * (b - a) / N
        grads_q.append(pqi.grad)
        grad_k[:, :b] += pki.grad
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat(grads_q, dim=1), qi.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad_k, ki.grad, rtol=1e-10, atol=1e-14)


def test_query_start_with_the_whole_sequence_changes_nothing():
    B, N, Hq, G, D, Di, Bk, topk = 1, 64, 4, 2, 16, 8, 16, 3
    q, k, v, q_idx, k_idx = inputs(B, N, Hq, G, D, Di)
    a = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=Bk, topk=topk, return_indices=True)
    b = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=Bk, topk=topk, return_indices=True, query_start=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_indices_in_the_chunks_future_are_ignored():
    """The indices contract at an offset: an id past a query's own block is dropped, as for the whole sequence."""
    B, N, Hq, G, D, Bk, t0 = 1, 64, 2, 1, 8, 16, 32
    q, k, v, _, _ = inputs(B, N, Hq, G, D, 8)
    own = (torch.arange(t0, N) // Bk).view(1, N - t0, 1, 1).int()
    honest = torch.cat([own, torch.full_like(own, -1)], dim=-1).contiguous()
    future = torch.cat([own, own + 1], dim=-1).contiguous()  # the block after each query's own
    args = (q[:, t0:].contiguous(), k, v)
    a = msa_tl.sparse_attention(*args, honest, block_size=Bk, query_start=t0)
    b = msa_tl.sparse_attention(*args, future, block_size=Bk, query_start=t0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("api", ["select_blocks", "sparse_attention", "kl_alignment_loss", "msa_attention"])
@pytest.mark.parametrize("case,match", [
    ("negative", "query_start must be an int >= 0"),
    ("float", "query_start must be an int >= 0"),
    ("short_keys", "up to the last query"),
    ("long_keys", "up to the last query"),
    ("packed", "query_start and cu_seqlens do not mix"),
])
def test_bad_query_start_is_rejected_naming_it(api, case, match):
    B, N, Hq, G, D, Di, Bk, topk, t0 = 1, 32, 2, 1, 8, 8, 16, 2, 16
    q, k, v, q_idx, k_idx = inputs(B, N, Hq, G, D, Di)
    start = {"negative": -1, "float": 16.0}.get(case, t0)
    keys = {"short_keys": N - 1, "long_keys": N + 1}.get(case, N)
    if keys > N:
        k, v, k_idx = (torch.cat([x, x[:, :1]], dim=1) for x in (k, v, k_idx))
    k, v, k_idx = (x[:, :keys].contiguous() for x in (k, v, k_idx))
    qc, qic = q[:, t0:].contiguous(), q_idx[:, t0:].contiguous()
    extra = dict(cu_seqlens=torch.tensor([0, N - t0], dtype=torch.int32)) if case == "packed" else {}
    idx = torch.zeros(B, N - t0, G, topk, dtype=torch.int32)
    call = {
        "select_blocks": lambda: msa_tl.select_blocks(qic, k_idx, block_size=Bk, topk=topk, query_start=start,
                                                      **extra),
        "sparse_attention": lambda: msa_tl.sparse_attention(qc, k, v, idx, block_size=Bk, query_start=start,
                                                            **extra),
        "kl_alignment_loss": lambda: msa_tl.kl_alignment_loss(qc, k, qic, k_idx, idx, block_size=Bk,
                                                              query_start=start, **extra),
        "msa_attention": lambda: msa_tl.msa_attention(qc, k, v, qic, k_idx, block_size=Bk, topk=topk,
                                                      query_start=start, **extra),
    }[api]
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------------------------
# GPU: the kernels at an offset against the float64 reference at the offset


def padded(x, t0, value=0):
    """x [B, C, ...] -> [B, t0 + C, ...], ``value`` before (the calibration baseline takes rows from 0)."""
    out = x.new_full((x.shape[0], t0 + x.shape[1], *x.shape[2:]), value)
    out[:, t0:] = x
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("t0,C", [(1024, 1024), (2944, 512), (1000, 600)], ids=["aligned", "long-prefix", "mid-block"])
@pytest.mark.parametrize("G,Bk,topk", [(4, 128, 16), (2, 64, 8)], ids=["G4-Bk128", "G2-Bk64"])
def test_kernels_at_an_offset_match_the_reference(t0, C, G, Bk, topk, fresh_seed):
    """select_blocks (two-pass from the offset), sparse_attention forward and backward and the KL at query_start
    t0 on bf16 inputs: the selection up to ties (as the chunk's rows of the whole sequence), o / lse / dq / dk / dv
    within FA3's calibration, the loss and index gradients against the float64 reference at the offset."""
    B, Hq, D, Di = 2, 4 * G, 128, 128
    dtype = torch.bfloat16
    shape = dict(dtype=dtype, heads=Hq, groups=G, head_dim=D, index_dim=Di, block_size=Bk, topk=topk, seq=t0 + C,
                 query_start=t0)
    for stage in ("select_blocks", "sparse_attention", "sparse_attention_backward", "kl_alignment_loss",
                  "kl_alignment_loss_backward"):
        assert dispatch.kernel_for(stage, CUDA, **shape) is not None, f"{stage} would run the reference"
    gen = torch.Generator().manual_seed(fresh_seed)
    q, k, v, q_idx, k_idx = inputs(B, t0 + C, Hq, G, D, Di, dtype, CUDA, gen)
    qc, qic = q[:, t0:].contiguous(), q_idx[:, t0:].contiguous()
    idx = msa_tl.select_blocks(qic, k_idx, block_size=Bk, topk=topk, query_start=t0)
    assert idx.shape == (B, C, G, topk)
    whole = msa_tl.select_blocks(q_idx, k_idx, block_size=Bk, topk=topk).clone()
    whole[:, t0:] = idx
    assert_selection_up_to_ties(whole, q_idx, k_idx, Bk, topk)

    leaves = [x.clone().requires_grad_() for x in (qc, k, v)]
    o, lse = msa_tl.sparse_attention(*leaves, idx, block_size=Bk, return_lse=True, query_start=t0)
    do = torch.randn(o.shape, generator=gen).to(CUDA, dtype)
    o.backward(do)
    ref_o, ref_lse = R.sparse_attention(qc, k, v, idx, Bk, query_start=t0)
    refs = R.sparse_attention_backward(do, None, qc, k, v, idx, Bk, query_start=t0)
    base = dtype_baseline(padded(qc, t0), k, v, padded(idx, t0, -1), Bk, padded(do, t0))
    heads = torch.ones(B, C, Hq, dtype=torch.bool, device=CUDA)
    tokens = torch.ones(B, t0 + C, dtype=torch.bool, device=CUDA)
    assert_within_calibration("o", o.detach(), ref_o, base[0][:, t0:], dtype, heads)
    assert_within_calibration("lse", lse.detach(), ref_lse, base[1][:, t0:], dtype, heads)
    assert_within_calibration("dq", leaves[0].grad, refs[0], base[2][:, t0:], dtype, heads)
    assert_within_calibration("dk", leaves[1].grad, refs[1], base[3], dtype, tokens)
    assert_within_calibration("dv", leaves[2].grad, refs[2], base[4], dtype, tokens)

    qi, ki = qic.clone().requires_grad_(), k_idx.clone().requires_grad_()
    loss = msa_tl.kl_alignment_loss(qc, k, qi, ki, idx, block_size=Bk, lse=lse.detach(), query_start=t0)
    loss.backward()
    qr, kr = qic.double().requires_grad_(), k_idx.double().requires_grad_()
    want = R.kl_alignment_loss(qc, k, qr, kr, idx, Bk, query_start=t0)
    want.backward()
    # the tolerances of the packed KL's GPU test (tests/test_varlen_gpu.py)
    assert abs(loss.item() - want.item()) <= 1e-2 * abs(want.item()), (loss.item(), want.item())
    for name, got, ref in (("dq_idx", qi.grad, qr.grad), ("dk_idx", ki.grad, kr.grad)):
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err <= 2e-2, f"{name} rel err {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("G,Hq,Bk,topk", [(4, 64, 128, 16), (4, 4, 64, 8)], ids=["128-row-tiles", "64-row-tiles"])
def test_shared_tiles_at_a_block_boundary_offset_match_the_reference(G, Hq, Bk, topk, fresh_seed):
    """Every query chooses its own block and the first topk - 1: the queries of a tile share their row, so the whole
    chunk at t0 (a block boundary) runs on the shared-tile kernels at the offset (the FA3-ordered one where a tile
    has 128 rows, the plain one where it has 64); o and lse within FA3's calibration of the float64 reference."""
    from msa_tl.attention.kv_outer import sparse_attention_forward
    from msa_tl.attention.shared_tiles import sharing_tiles
    from msa_tl.ops.validation import canonical_indices

    B, D, t0, C = 2, 128, 4 * Bk, 3 * Bk
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(fresh_seed)
    q, k, v, _, _ = inputs(B, t0 + C, Hq, G, D, 64, dtype, CUDA, gen)
    qc = q[:, t0:].contiguous()
    local = (torch.arange(t0, t0 + C, device=CUDA) // Bk).view(1, C, 1, 1)
    earlier = torch.arange(topk - 1, device=CUDA).view(1, 1, 1, -1)
    idx = torch.cat([local, earlier.expand(1, C, 1, -1)], dim=-1).expand(B, C, G, topk).int().contiguous()
    # the kernels take the contract's canonical form: the own block is among the first topk - 1 here, so a row
    # names it twice (and blocks past it), which the reference reads as a set
    canonical = canonical_indices(idx, Bk, t0)
    assert sharing_tiles(canonical, Hq // G, Bk).all(), "every tile shares its row"
    o, lse = sparse_attention_forward(qc, k, v, canonical, Bk, query_start=t0, shared_tiles=True)
    ref_o, ref_lse = R.sparse_attention(qc, k, v, idx, Bk, query_start=t0)
    base = dtype_baseline(padded(qc, t0), k, v, padded(idx, t0, -1), Bk)
    heads = torch.ones(B, C, Hq, dtype=torch.bool, device=CUDA)
    assert_within_calibration("o", o, ref_o, base[0][:, t0:], dtype, heads)
    assert_within_calibration("lse", lse, ref_lse, base[1][:, t0:], dtype, heads)


@pytest.mark.gpu
def test_a_chunk_far_into_its_keys_allocates_no_query_rows_before_it(fresh_seed):
    """1024 queries at position 64K (paper shape): select, forward, backward and KL at the offset allocate for the
    chunk's rows and the keys, not for the 64K query rows before the chunk. One query-side tensor padded to the keys
    (q, o, dO or dq) would be 1 GiB; running the chunk as the tail of a padded row took four of them."""
    B, Hq, G, D, Di, Bk, topk, t0, C = 1, 64, 4, 128, 128, 128, 16, 65536, 1024
    dtype = torch.bfloat16
    shape = dict(dtype=dtype, heads=Hq, groups=G, head_dim=D, index_dim=Di, block_size=Bk, topk=topk, seq=t0 + C,
                 query_start=t0)
    for stage in ("sparse_attention", "sparse_attention_backward", "kl_alignment_loss", "kl_alignment_loss_backward"):
        assert dispatch.kernel_for(stage, CUDA, **shape) is not None, f"{stage} would run the reference"
    gen = torch.Generator(device=CUDA).manual_seed(fresh_seed)

    def rand(*dims):
        return torch.randn(*dims, generator=gen, device=CUDA, dtype=dtype)

    q, k, v, q_idx, k_idx, do = (rand(B, C, Hq, D), rand(B, t0 + C, G, D), rand(B, t0 + C, G, D), rand(B, C, G, Di),
                                 rand(B, t0 + C, Di), rand(B, C, Hq, D))
    idx = msa_tl.select_blocks(q_idx, k_idx, block_size=Bk, topk=topk, query_start=t0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, q_idx, k_idx)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    o, lse = msa_tl.sparse_attention(*leaves[:3], idx, block_size=Bk, return_lse=True, query_start=t0)
    o.backward(do)
    loss = msa_tl.kl_alignment_loss(leaves[0].detach(), leaves[1].detach(), leaves[3], leaves[4], idx, block_size=Bk,
                                    lse=lse.detach(), query_start=t0)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    padded_tensor = t0 * Hq * D * dtype.itemsize
    assert peak < 1.5 * padded_tensor, f"peak {peak / 2**30:.2f} GiB: query rows before the chunk were allocated"
    assert torch.isfinite(o).all() and torch.isfinite(loss) and all(torch.isfinite(x.grad).all() for x in leaves)


def test_the_kernel_drivers_name_a_bad_offset():
    """The GPU drivers check an offset before anything runs: keys must reach the chunk's last query, and shared tiles
    take queries from a block boundary only."""
    from msa_tl.attention.backward import sparse_attention_backward
    from msa_tl.attention.kv_outer import sparse_attention_forward
    from msa_tl.kl_loss import kl_alignment_loss_forward

    q = torch.zeros(1, 10, 4, 64, dtype=torch.bfloat16)
    k = torch.zeros(1, 47, 1, 64, dtype=torch.bfloat16)
    idx = torch.full((1, 10, 1, 2), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match="block boundary"):
        sparse_attention_forward(q, k, k, idx, 16, query_start=37, shared_tiles=True)
    with pytest.raises(ValueError, match="keys up to the last query"):
        sparse_attention_forward(q, k, k, idx, 16, query_start=30)
    with pytest.raises(ValueError, match="keys up to the last query"):
        sparse_attention_backward(q, None, q, k, k, idx, q, torch.zeros(1, 10, 4), 16, query_start=30)
    with pytest.raises(ValueError, match="keys up to the last query"):
        kl_alignment_loss_forward(q, k, torch.zeros(1, 10, 1, 64), torch.zeros(1, 47, 64), idx, 16, 0.125, 0.125,
                                  torch.zeros(1, 10, 4), query_start=30)


# ----------------------------------------------------------------------------------------------------------------
# CPU: the GPU select driver at an offset, with the reference standing in for its kernels


@pytest.mark.parametrize("t0,method", [(32, None), (37, None), (48, "two_pass")],
                         ids=["aligned-pipelined", "mid-block-two-pass", "aligned-two-pass"])
def test_the_select_driver_at_an_offset_passes_the_chunk_to_its_kernels(monkeypatch, t0, method):
    """msa_tl.index.select.select_blocks(query_start=t0) with fake kernels that compute the reference for exactly
    the rows and offset they are handed: the pipelined select (t0 a multiple of Bk) gets the chunk's rows and t0;
    the two-pass one a zero-padded row, scored from the offset's block on; both give the chunk's selection."""
    import msa_tl.index.select as S

    B, N, G, Di, Bk, topk = 2, 96, 8, 16, 16, 3  # G * Bk = 128 rows a key block: the pipelined select runs
    q_idx, k_idx = torch.randn(B, N, G, Di, dtype=f64), torch.randn(B, N, Di, dtype=f64)
    calls = []

    def pipelined(q, k, idx, start):  # Q [B, C*G, Di], K [B, N, Di], Idx [B, C*G, topk], t0
        calls.append(("pipelined", q.shape[1] // G, start))
        idx.copy_(R.select_blocks(q.view(B, -1, G, Di), k, Bk, topk, query_start=start).view(idx.shape))

    def scores(q, k, block_size, scale, start, count, out=None):  # rows start .. start + count of a whole row
        calls.append(("scores", start, count))
        s = R._pool_blocks(R.index_token_scores(q[:, start:start + count], k, scale, start), block_size)
        return s.permute(0, 2, 1, 3).float().contiguous()  # [B, count, G, nblk]

    def topk_kernel(s, idx, start):  # S [B, count*G, nblk] -> Idx rows start*G .. of [B, N*G, topk]
        count = s.shape[1] // G
        rows = R.topk_blocks(s.view(B, count, G, -1).permute(0, 2, 1, 3), topk, Bk, query_start=start)
        idx.view(B, N, G, topk)[:, start:start + count] = rows

    def compiled(builder, **config):
        if builder is S.pipelined_select_program:
            assert config["offset"] is True
            return pipelined
        assert builder is S.topk_program
        return topk_kernel

    monkeypatch.setattr(S, "compiled_kernel", compiled)
    monkeypatch.setattr(S, "block_scores", scores)
    monkeypatch.setattr(S, "tuned_config", lambda program, shape, defaults, device: dict(defaults))
    monkeypatch.setattr(S, "tl_dtype", str)  # float64 here: no TileLang dtype is compiled
    got = S.select_blocks(q_idx[:, t0:].contiguous(), k_idx, Bk, topk, query_start=t0, method=method,
                          query_chunk=32)
    assert got.shape == (B, N - t0, G, topk) and got.is_contiguous()
    assert torch.equal(got, R.select_blocks(q_idx, k_idx, Bk, topk)[:, t0:])
    if t0 % Bk == 0 and method is None:
        assert calls == [("pipelined", N - t0, t0)]
    else:  # chunks of 32 queries from the offset's block on
        first = t0 // Bk * Bk
        assert calls == [("scores", a, min(32, N - a)) for a in range(first, N, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("index_fp8", [False, True], ids=["bf16", "fp8"])
def test_the_select_at_a_block_boundary_equals_the_whole_sequences_rows(index_fp8, fresh_seed):
    """The pipelined select's offset build (bf16 and FP8) scores each chunk row exactly as the whole-sequence build
    does (the same key blocks, the same row-local quantisation), so the selections are identical, not only equal up
    to ties; both then match the reference up to ties."""
    B, N, G, Di, Bk, topk, t0 = 2, 4096, 4, 128, 128, 16, 2560
    gen = torch.Generator().manual_seed(fresh_seed)
    q_idx = torch.randn(B, N, G, Di, generator=gen).to(CUDA, torch.bfloat16)
    k_idx = torch.randn(B, N, Di, generator=gen).to(CUDA, torch.bfloat16)
    shape = dict(dtype=torch.bfloat16, groups=G, index_dim=Di, block_size=Bk, topk=topk, index_fp8=index_fp8,
                 query_start=t0)
    assert dispatch.kernel_for("select_blocks", CUDA, **shape) is not None, "the select would run the reference"
    whole = msa_tl.select_blocks(q_idx, k_idx, block_size=Bk, topk=topk, index_fp8=index_fp8)
    chunk = msa_tl.select_blocks(q_idx[:, t0:].contiguous(), k_idx, block_size=Bk, topk=topk, index_fp8=index_fp8,
                                 query_start=t0)
    assert torch.equal(chunk, whole[:, t0:])
    if not index_fp8:
        assert_selection_up_to_ties(whole, q_idx, k_idx, Bk, topk)
