"""MSA decode over a paged cache (issue 14): the cache's layout and appends, and decode equal to the full forward's
rows at the newest positions (the float64 reference on the CPU; the GPU kernels come later)."""

import math

import pytest
import torch

import msa_tl
from msa_tl import reference as R
from msa_tl.ops.cache import MSACache

f64 = torch.float64


def fill_paged(k, v, k_idx, lengths, page_size, gen):
    """A cache whose rows hold the first lengths[b] tokens of k, v, k_idx [B, N, ...], pages in random order."""
    B, N, G, D = k.shape
    per_row = math.ceil(N / page_size)
    table = torch.randperm(B * per_row, generator=gen).view(B, per_row).int()
    cache = MSACache.paged(B, N, G, D, k_idx.shape[-1], page_size=page_size, block_table=table, dtype=k.dtype)
    for b, n in enumerate(lengths):
        for i in range(math.ceil(n / page_size)):
            tokens = slice(i * page_size, min(n, (i + 1) * page_size))
            rows = tokens.stop - tokens.start
            for mine, full in ((cache.k, k), (cache.v, v), (cache.k_idx, k_idx)):
                mine[table[b, i], :rows] = full[b, tokens]
    return MSACache(cache.k, cache.v, cache.k_idx, table, lengths)


def inputs(B, N, Hq, G, D, Di, gen):
    return [torch.randn(*shape, generator=gen, dtype=f64) for shape in
            ((B, N, Hq, D), (B, N, G, D), (B, N, G, D), (B, N, G, Di), (B, N, Di))]


def newest(x, lengths, S):
    """The rows of x [B, N, ...] at each row's last S positions: [B, S, ...]."""
    return torch.stack([x[b, n - S:n] for b, n in enumerate(lengths)])


def forward_rows(q, k, v, q_idx, k_idx, lengths, S, Bk, topk):
    """msa_attention over each row's first lengths[b] tokens, at its last S positions."""
    outs = []
    for b, n in enumerate(lengths):
        o, lse, idx = msa_tl.msa_attention(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], q_idx[b:b + 1, :n],
                                           k_idx[b:b + 1, :n], block_size=Bk, topk=topk, return_lse=True,
                                           return_indices=True)
        outs.append((o[0, n - S:], lse[0, n - S:], idx[0, n - S:]))
    return [torch.stack(x) for x in zip(*outs)]


@pytest.mark.parametrize("S", [1, 3, 8])
@pytest.mark.parametrize("Bk,page_size", [(128, 128), (64, 64), (64, 128)])
def test_decode_equals_the_forward_rows_over_ragged_paged_rows(S, Bk, page_size, seed=0):
    """Ragged rows (one shorter than a block, one ending mid-block), pages in random order."""
    gen = torch.Generator().manual_seed(seed)
    B, N, Hq, G, D, Di, topk = 3, 700, 8, 2, 32, 16, 4
    lengths = [700, 517, 70]
    q, k, v, q_idx, k_idx = inputs(B, N, Hq, G, D, Di, gen)
    cache = fill_paged(k, v, k_idx, lengths, page_size, gen)
    o, lse, idx = msa_tl.msa_decode(newest(q, lengths, S), newest(q_idx, lengths, S), cache, block_size=Bk,
                                    topk=topk, return_lse=True, return_indices=True)
    want_o, want_lse, want_idx = forward_rows(q, k, v, q_idx, k_idx, lengths, S, Bk, topk)
    assert torch.equal(idx, want_idx)
    assert (o - want_o).abs().max().item() <= 1e-12 and (lse - want_lse).abs().max().item() <= 1e-12


def test_appends_then_decode_steps_follow_the_forward(seed=0):
    """Prefill by appends, then token-by-token decode steps and an 8-token draft: each equals the forward's rows."""
    gen = torch.Generator().manual_seed(seed)
    B, N, Hq, G, D, Di, Bk, topk = 2, 400, 4, 1, 16, 16, 64, 3
    q, k, v, q_idx, k_idx = inputs(B, N, Hq, G, D, Di, gen)
    table = torch.randperm(2 * math.ceil(N / Bk) + 3, generator=gen)[:B * math.ceil(N / Bk)].view(B, -1).int()
    cache = MSACache.paged(B, N, G, D, Di, page_size=Bk, num_pages=2 * math.ceil(N / Bk) + 3, block_table=table,
                           dtype=f64)
    n = 300
    for t0 in range(0, n, 128):  # chunked prefill
        t1 = min(n, t0 + 128)
        cache.append(k[:, t0:t1], v[:, t0:t1], k_idx[:, t0:t1])
    for S in (1, 1, 8, 1):
        cache.append(k[:, n:n + S], v[:, n:n + S], k_idx[:, n:n + S])
        n += S
        assert cache.lengths == [n, n] and cache.seqlens.tolist() == [n, n]
        o = msa_tl.msa_decode(q[:, n - S:n].contiguous(), q_idx[:, n - S:n].contiguous(), cache, block_size=Bk,
                              topk=topk)
        want_o, _, _ = forward_rows(q, k, v, q_idx, k_idx, [n, n], S, Bk, topk)
        assert (o - want_o).abs().max().item() <= 1e-12


def test_the_contiguous_cache_is_the_paged_one_with_pages_in_row_order():
    gen = torch.Generator().manual_seed(0)
    B, N, G, D, Di = 2, 300, 2, 8, 4
    cache = MSACache.contiguous(B, N, G, D, Di, page_size=64, dtype=f64)
    k, v, k_idx = (torch.randn(*s, generator=gen, dtype=f64) for s in ((B, 200, G, D), (B, 200, G, D), (B, 200, Di)))
    cache.append(k, v, k_idx)
    assert torch.equal(cache.k.view(B, -1, G, D)[:, :200], k) and torch.equal(cache.k_idx.view(B, -1, Di)[:, :200],
                                                                             k_idx)
    assert torch.equal(R.cached_rows(cache.v, cache.block_table, 1, 200), v[1])


def test_decode_and_the_cache_name_what_is_wrong():
    B, N, Hq, G, D, Di = 2, 256, 4, 2, 16, 8
    cache = MSACache.paged(B, N, G, D, Di, page_size=64, dtype=torch.float32)
    k, v, k_idx = torch.zeros(B, 3, G, D), torch.zeros(B, 3, G, D), torch.zeros(B, 3, Di)
    cache.append(k, v, k_idx)
    q, q_idx = torch.randn(B, 1, Hq, D), torch.randn(B, 1, G, Di)
    with pytest.raises(ValueError, match="append them first"):
        msa_tl.msa_decode(torch.randn(B, 4, Hq, D), torch.randn(B, 4, G, Di), cache, block_size=64)
    with pytest.raises(ValueError, match="q_idx must be"):
        msa_tl.msa_decode(q, torch.randn(B, 1, G, Di + 1), cache, block_size=64)
    with pytest.raises(ValueError, match="head dim"):
        msa_tl.msa_decode(torch.randn(B, 1, Hq, D + 1), q_idx, cache, block_size=64)
    with pytest.raises(TypeError, match="dtype"):
        msa_tl.msa_decode(q.double(), q_idx.double(), cache, block_size=64)
    with pytest.raises(TypeError, match="MSACache"):
        msa_tl.msa_decode(q, q_idx, object(), block_size=64)
    with pytest.raises(ValueError, match="exceeds"):
        cache.append(torch.zeros(B, N, G, D), torch.zeros(B, N, G, D), torch.zeros(B, N, Di))
    with pytest.raises(ValueError, match="append takes"):
        cache.append(torch.zeros(B, 1, G, D + 1), torch.zeros(B, 1, G, D + 1), torch.zeros(B, 1, Di))
    with pytest.raises(ValueError, match="page ids outside"):
        MSACache.paged(B, N, G, D, Di, page_size=64, num_pages=8, block_table=torch.full((B, 4), 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="cannot hold"):
        MSACache.paged(B, N, G, D, Di, page_size=64, num_pages=7)


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_the_layer_generates_the_full_forward_rows_with_a_cache(mode, seed=0):
    """Prefill into an empty paged cache, then single tokens and a 3-token chunk: every output row equals the
    full-sequence forward's row at that position, in both modes."""
    gen = torch.Generator().manual_seed(seed)
    B, N, hidden, H, G, D, Di, Bk, topk = 2, 300, 32, 4, 2, 8, 8, 64, 3
    layer = msa_tl.MSAAttention(hidden, H, G, D, Di, block_size=Bk, topk=topk, mode=mode, dtype=f64).eval()
    x = torch.randn(B, N, hidden, generator=gen, dtype=f64)
    with torch.no_grad():
        full = layer(x)
        cache = MSACache.paged(B, N, G, D, Di, page_size=Bk, dtype=f64,
                               block_table=torch.randperm(B * 5, generator=gen).view(B, 5).int())
        steps, t = [200, 1, 1, 3, 1], 0
        for S in steps:
            out = layer(x[:, t:t + S], cache=cache)
            assert (out.output - full.output[:, t:t + S]).abs().max().item() <= 1e-10, (mode, t, S)
            if mode == "sparse":
                assert torch.equal(out.indices, full.indices[:, t:t + S])
            t += S
        assert cache.lengths == [t] * B
    with pytest.raises(ValueError, match="KL loss"):
        layer.train()(x[:, :1], cache=cache)


def test_fp8_index_keys_are_stored_as_codes_with_a_scale_per_token(seed=0):
    """Appends quantise each token's index key (amax / 448 scale); decode selects over the dequantised keys with
    q_idx quantised per row the same way: equal to the forward rows over those values."""
    gen = torch.Generator().manual_seed(seed)
    B, N, Hq, G, D, Di, Bk, topk, S = 2, 600, 4, 2, 16, 32, 64, 4, 3
    q, k, v, q_idx, k_idx = inputs(B, N, Hq, G, D, Di, gen)
    k_idx[0, 7] = 0.0  # a row of zeros keeps scale 1 and codes 0
    cache = MSACache.paged(B, N, G, D, Di, page_size=Bk, dtype=f64, index_dtype=torch.float8_e4m3fn,
                           block_table=torch.randperm(B * 10, generator=gen).view(B, 10).int())
    cache.append(k, v, k_idx)
    assert cache.index_fp8 and cache.k_idx.dtype == torch.float8_e4m3fn and cache.k_idx_scale.dtype == torch.float32
    stored = torch.stack([R.cached_rows(cache.index_keys(), cache.block_table, b, N) for b in range(B)])
    amax = k_idx.abs().amax(-1, keepdim=True)
    assert ((stored - k_idx).abs() <= amax * 2.0**-4).all()  # e4m3: 3 mantissa bits, half an ulp at most
    assert torch.equal(stored[0, 7], torch.zeros(Di, dtype=f64))
    assert R.cached_rows(cache.k_idx_scale[..., None], cache.block_table, 0, N)[7].item() == 1.0
    lengths = [N, N - 77]
    cache = MSACache(cache.k, cache.v, cache.k_idx, cache.block_table, lengths, k_idx_scale=cache.k_idx_scale)
    o, idx = msa_tl.msa_decode(newest(q, lengths, S), newest(q_idx, lengths, S), cache, block_size=Bk, topk=topk,
                               return_indices=True)
    want_o, _, want_idx = forward_rows(q, k, v, R.fake_quantize_fp8(q_idx), stored, lengths, S, Bk, topk)
    assert torch.equal(idx, want_idx) and (o - want_o).abs().max().item() <= 1e-12


def test_fp8_index_keys_need_their_scales():
    B, G, D, Di = 1, 2, 8, 16
    k = torch.zeros(4, 64, G, D)
    codes = torch.zeros(4, 64, Di, dtype=torch.float8_e4m3fn)
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    with pytest.raises(ValueError, match="k_idx_scale"):
        MSACache(k, k.clone(), codes, table, [0])
    with pytest.raises(ValueError, match="k_idx_scale"):
        MSACache(k, k.clone(), codes, table, [0], k_idx_scale=torch.ones(4, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="k's dtype"):
        MSACache(k, k.clone(), torch.zeros(4, 64, Di, dtype=torch.float64), table, [0])


def test_rescore_selection_is_the_exact_top_k_among_the_candidates(seed=0):
    """The second stage against a loop over each row: the forced blocks, then the best exact scores among the
    candidates (NaN never chosen); with every visible block a candidate it is the exact selection itself."""
    gen = torch.Generator().manual_seed(seed)
    B, G, C, Bk, topk, L, t0 = 2, 2, 5, 16, 4, 2, 200
    nblk = (t0 + C - 1) // Bk + 1
    exact = torch.randn(B, G, C, nblk, generator=gen, dtype=f64)
    exact[0, 1, 2, 3] = float("nan")
    fp8 = exact + 0.3 * torch.randn(B, G, C, nblk, generator=gen, dtype=f64)
    everything = R.topk_blocks(fp8, nblk, Bk, query_start=t0, local_blocks=L)
    assert torch.equal(R.rescore_selection(exact, everything, topk, Bk, t0, L),
                       R.topk_blocks(exact, topk, Bk, query_start=t0, local_blocks=L))
    candidates = R.topk_blocks(fp8, L + 3, Bk, query_start=t0, local_blocks=L)
    got = R.rescore_selection(exact, candidates, topk, Bk, t0, L)
    for b in range(B):
        for c in range(C):
            local = (t0 + c) // Bk
            for g in range(G):
                ranked = [i for i in candidates[b, c, g].tolist() if 0 <= i <= local - L
                          and not math.isnan(exact[b, g, c, i])]
                ranked = sorted(ranked, key=lambda i: -exact[b, g, c, i].item())[:topk - L]
                assert set(got[b, c, g].tolist()) - {-1} == set(range(local - L + 1, local + 1)) | set(ranked)


def test_a_rescoring_fp8_cache_selects_as_its_exact_keys_do(seed=0):
    """FP8 keys alone change some rows' selection; a cache made with rescore=True keeps the exact keys beside the
    codes, and its decode equals the forward rows over the exact keys wherever the exact choice lies within the FP8
    stage's 2 (k - 1) best blocks (here every row; FP8 alone changes 4 of the 32)."""
    from msa_tl.ops.cache import default_candidates

    gen = torch.Generator().manual_seed(seed)
    B, N, Hq, G, D, Di, Bk, topk, S = 2, 900, 4, 2, 16, 32, 16, 8, 8
    q, k, v, q_idx, k_idx = inputs(B, N, Hq, G, D, Di, gen)
    table = torch.randperm(B * 60, generator=gen).view(B, 60).int()
    cache = MSACache.paged(B, N, G, D, Di, page_size=Bk, dtype=f64, index_dtype=torch.float8_e4m3fn, rescore=True,
                           num_pages=B * 60, block_table=table)
    cache.append(k, v, k_idx)
    assert cache.rescore and cache.k_idx_exact.dtype == f64
    assert torch.equal(torch.stack([R.cached_rows(cache.k_idx_exact, table, b, N) for b in range(B)]), k_idx)
    lengths = [N, N - 77]
    cache = MSACache(cache.k, cache.v, cache.k_idx, table, lengths, k_idx_scale=cache.k_idx_scale,
                     k_idx_exact=cache.k_idx_exact)
    o, idx = msa_tl.msa_decode(newest(q, lengths, S), newest(q_idx, lengths, S), cache, block_size=Bk, topk=topk,
                               return_indices=True)
    want_o, _, want_idx = forward_rows(q, k, v, q_idx, k_idx, lengths, S, Bk, topk)
    fp8_only = MSACache(cache.k, cache.v, cache.k_idx, table, lengths, k_idx_scale=cache.k_idx_scale)
    fp8_idx = msa_tl.msa_decode(newest(q, lengths, S), newest(q_idx, lengths, S), fp8_only, block_size=Bk,
                                topk=topk, return_indices=True)[1]
    assert not torch.equal(fp8_idx, want_idx), "FP8 alone chose as the exact keys do: the case tests nothing"
    assert torch.equal(idx, want_idx) and (o - want_o).abs().max().item() <= 1e-12
    assert default_candidates(topk) == 14 and default_candidates(16) == 30 and default_candidates(32) == 31


def test_rescoring_needs_fp8_keys_and_exact_keys_of_their_shape():
    G, D, Di = 2, 8, 16
    k = torch.zeros(4, 64, G, D)
    codes = torch.zeros(4, 64, Di, dtype=torch.float8_e4m3fn)
    scale = torch.ones(4, 64)
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    with pytest.raises(ValueError, match="k_idx_exact"):
        MSACache(k, k.clone(), codes, table, [0], k_idx_scale=scale, k_idx_exact=torch.zeros(4, 64, Di + 1))
    with pytest.raises(ValueError, match="k_idx_exact"):
        MSACache(k, k.clone(), torch.zeros(4, 64, Di), table, [0], k_idx_exact=torch.zeros(4, 64, Di))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        MSACache.paged(1, 256, G, D, Di, page_size=64, rescore=True)
    with pytest.raises(ValueError, match="rescore=True"):
        MSACache.paged(1, 256, G, D, Di, page_size=64, index_dtype=torch.float8_e4m3fn).plan(
            queries=1, heads=4, rescore_candidates=8)


@pytest.mark.parametrize("waves", [0, 3, 2.0], ids=["zero", "not-a-divisor", "float"])
def test_a_plan_in_waves_needs_a_divisor_of_the_batch(waves):
    """DecodePlan(waves=...) splits the rows into equal waves: anything else is named before a kernel is built."""
    from msa_tl.decode.plan import DecodePlan

    table, seqlens = torch.zeros(8, 4, dtype=torch.int32), torch.full((8,), 100, dtype=torch.int32)
    with pytest.raises(ValueError, match="waves must divide the batch"):
        DecodePlan(table, seqlens, queries=1, heads=64, groups=4, head_dim=128, index_dim=128, waves=waves)
