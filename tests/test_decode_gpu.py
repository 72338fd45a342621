"""Decode kernels against the float64 reference (`pytest -m gpu`): the index scan over a paged cache."""

import math

import pytest
import torch

from msa_tl import reference as R

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("S,G", [(1, 4), (8, 4), (40, 2), (3, 1)], ids=["decode", "draft-8", "chunk-40", "G1"])
@pytest.mark.parametrize("Bk", [128, 64])
def test_decode_scores_match_the_reference_over_shuffled_pages(S, G, Bk, seed=0):
    """Ragged rows (one shorter than a block, one ending mid-block, one long), pages in random order, the grid
    from the cache's maxima: visible blocks to fp32 accumulation, every other entry -inf."""
    from msa_tl.decode_scores import decode_block_scores

    gen = torch.Generator(device="cuda").manual_seed(seed)
    lengths, Di, max_pages = [S + 40, 1000, 5 * Bk + 17], 128, 24
    B = len(lengths)
    pages = torch.randperm(B * max_pages, device="cuda", generator=gen)
    table = pages.view(B, max_pages).int()
    k_idx_pages = torch.randn(B * max_pages, Bk, Di, device="cuda", dtype=torch.bfloat16, generator=gen)
    q_idx = torch.randn(B, S, G, Di, device="cuda", dtype=torch.bfloat16, generator=gen)
    seqlens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
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
