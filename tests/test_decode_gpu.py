"""Decode kernels against the float64 reference (`pytest -m gpu`): the index scan over a paged cache, the top-k."""

import pytest
import torch

from msa_tl import reference as R

pytestmark = pytest.mark.gpu


CASES = pytest.mark.parametrize("S,G", [(1, 4), (8, 4), (40, 2), (3, 1)], ids=["decode", "draft-8", "chunk-40", "G1"])
BLOCKS = pytest.mark.parametrize("Bk", [128, 64])


def paged_index_keys(S, G, Bk, seed, lengths=None, max_pages=24, Di=128):
    """Ragged rows (one shorter than a block, one ending mid-block, one long) of index keys in shuffled pages."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lengths = lengths or [S + 40, 1000, 5 * Bk + 17]
    B = len(lengths)
    table = torch.randperm(B * max_pages, device="cuda", generator=gen).view(B, max_pages).int()
    k_idx_pages = torch.randn(B * max_pages, Bk, Di, device="cuda", dtype=torch.bfloat16, generator=gen)
    q_idx = torch.randn(B, S, G, Di, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q_idx, k_idx_pages, table, torch.tensor(lengths, device="cuda", dtype=torch.int32), lengths


@CASES
@BLOCKS
def test_decode_scores_match_the_reference_over_shuffled_pages(S, G, Bk, seed=0):
    """Ragged rows (one shorter than a block, one ending mid-block, one long), pages in random order, the grid
    from the cache's maxima: visible blocks to fp32 accumulation, every other entry -inf."""
    from msa_tl.decode_scores import decode_block_scores

    q_idx, k_idx_pages, table, seqlens, lengths = paged_index_keys(S, G, Bk, seed)
    B, max_pages = len(lengths), table.shape[1]
    got = decode_block_scores(q_idx, k_idx_pages, table, seqlens, Bk)
    assert got.shape == (B, S, G, max_pages)
    for b, n in enumerate(lengths):
        keys = R.cached_rows(k_idx_pages, table, b, n)[None]
        want = R._pool_blocks(R.index_token_scores(q_idx[b:b + 1], keys, None, n - S), Bk)[0]  # [G, S, nblk]
        want = torch.nn.functional.pad(want, (0, max_pages - want.shape[-1]), value=float("-inf"))
        row = got[b].permute(1, 0, 2).double()  # [G, S, max_pages]
        assert torch.equal(torch.isneginf(row), torch.isneginf(want)), f"row {b}: -inf entries differ"
        seen = torch.isfinite(want)
        assert (row[seen] - want[seen]).abs().max().item() <= 1e-4, f"row {b}"


@CASES
@BLOCKS
@pytest.mark.parametrize("topk", [16, 5])
def test_decode_select_takes_the_local_block_and_the_best_earlier_ones(S, G, Bk, topk, seed=0):
    """On the kernel's own block scores (some poisoned with NaN, which never wins): slot 0 the local block, the
    other slots the reference's top-k set (rows with fewer earlier blocks than k - 1 pad with -1)."""
    from msa_tl.decode_scores import decode_block_scores
    from msa_tl.decode_topk import decode_select

    q_idx, k_idx_pages, table, seqlens, lengths = paged_index_keys(S, G, Bk, seed, lengths=[S, 1000, 3000], max_pages=48)
    scores = decode_block_scores(q_idx, k_idx_pages, table, seqlens, Bk)
    scores.view(-1)[::97] = float("nan")
    idx = decode_select(scores, seqlens, Bk, topk)
    assert idx.shape == (len(lengths), S, G, topk)
    for b, n in enumerate(lengths):
        local = (n - S + torch.arange(S, device="cuda")) // Bk
        assert torch.equal(idx[b, :, :, 0], local[:, None].expand(S, G).int()), f"row {b}: slot 0"
        want = R.topk_blocks(scores[b].permute(1, 0, 2)[None].double(), topk, Bk, query_start=n - S)[0]
        big = torch.iinfo(torch.int32).max  # -1 (unused) sorts last on both sides
        got_set = torch.where(idx[b] < 0, big, idx[b]).sort(-1).values
        want_set = torch.where(want < 0, big, want).sort(-1).values
        assert torch.equal(got_set, want_set), f"row {b}"


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("S,G,Hq,D,Bk,topk", [(1, 4, 64, 128, 128, 16), (8, 4, 64, 128, 128, 16),
                                              (3, 2, 8, 64, 64, 5), (2, 1, 16, 128, 64, 6)],
                         ids=["decode-paper", "draft-8-paper", "R4-D64-Bk64", "G1-R16"])
def test_decode_attention_matches_the_reference_over_shuffled_pages(S, G, Hq, D, Bk, topk, splits, seed=0):
    """Each row's newest tokens over the reference's own selection (-1 slots in the short row), the slots split
    over CTAs and combined: outputs and LSE against the float64 reference (the library's main-branch bounds)."""
    from msa_tl.checks import LSE_ATOL, OUTPUT_RTOL, relative_error
    from msa_tl.decode_attention import decode_attention

    gen = torch.Generator(device="cuda").manual_seed(seed)
    lengths, max_pages, Di = [S + 3, 1500, 4 * Bk + 9], 24, 64
    B = len(lengths)
    table = torch.randperm(B * max_pages, device="cuda", generator=gen).view(B, max_pages).int()
    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    k_pages, v_pages, k_idx_pages = rand(B * max_pages, Bk, G, D), rand(B * max_pages, Bk, G, D), \
        rand(B * max_pages, Bk, Di)
    q, q_idx = rand(B, S, Hq, D), rand(B, S, G, Di)
    seqlens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    ref_o, ref_lse, indices = R.msa_decode(q, q_idx, k_pages, v_pages, k_idx_pages, table, lengths, Bk, topk)
    o, lse = decode_attention(q, k_pages, v_pages, table, seqlens, indices, Bk, splits=splits)
    assert o.dtype == q.dtype and torch.isfinite(o).all() and torch.isfinite(lse).all()
    rel = relative_error(o, ref_o)
    assert rel <= OUTPUT_RTOL, f"output rel err {rel:.2e}"
    assert (lse.double() - ref_lse).abs().max().item() <= LSE_ATOL
