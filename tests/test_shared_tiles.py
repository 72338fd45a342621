"""Which query tiles share their selection, and what the KV-outer path is left with (CPU)."""

import torch

from msa_tl.attention.shared_tiles import (list_shared_tiles, shared_rows, sharing_tiles, tile_queries, tile_rows,
                                          without_shared_tiles)


def block_pattern(B, N, G, Bk, topk):
    """Every query of a key block chooses the same blocks: its own, then the ones before it."""
    local = (torch.arange(N) // Bk)[None, :, None, None]
    cand = local - torch.arange(topk)
    return torch.where(cand >= 0, cand, -1).expand(B, N, G, topk).int().contiguous()


def test_tiles_are_128_rows_of_whole_queries_inside_one_key_block():
    assert (tile_rows(16, 128), tile_queries(16, 128)) == (128, 8)
    assert (tile_rows(1, 64), tile_queries(1, 64)) == (64, 64)  # 128 queries would span two blocks
    assert (tile_rows(64, 64), tile_queries(64, 64)) == (128, 2)


def test_a_tile_is_shared_only_where_all_its_rows_are_equal():
    B, N, G, Bk, topk, R = 2, 1000, 3, 64, 4, 16  # 8 queries a tile: 125 tiles
    indices = block_pattern(B, N, G, Bk, topk)
    indices[1, 13, 2, 3] = 0 if indices[1, 13, 2, 3] != 0 else 1  # query 13 (tile 1), group 2 of batch 1
    shared = sharing_tiles(indices, R, Bk)
    assert shared.shape == (B, 125, G) and shared.dtype == torch.int32
    expected = torch.ones(B, 125, G, dtype=torch.int32)
    expected[1, 1, 2] = 0
    assert torch.equal(shared, expected)


def test_the_ragged_tail_and_random_rows_are_not_shared():
    B, N, G, Bk, topk, R = 1, 1003, 2, 64, 4, 16
    indices = torch.randint(0, 8, (B, N, G, topk), dtype=torch.int32)
    shared = sharing_tiles(indices, R, Bk)
    assert shared.shape == (B, 125, G) and not shared.any()  # 1003 = 125 * 8 + 3: the tail is not a tile


def test_the_kv_outer_path_keeps_exactly_the_other_rows():
    B, N, G, Bk, topk, R = 1, 203, 2, 64, 4, 16
    indices = block_pattern(B, N, G, Bk, topk)
    indices[0, 40:48, 0] = torch.randint(0, 1, (8, topk), dtype=torch.int32).sort(-1).values  # tile 5: all 0s
    indices[0, 41, 0, 1] = -1  # ... now unequal
    shared = sharing_tiles(indices, R, Bk)
    rows = shared_rows(shared, N, R, Bk)
    assert rows.shape == (B, N, G) and rows.dtype == torch.bool and not rows[:, 200:].any()
    left = without_shared_tiles(indices, rows)
    rows_shared = shared.bool().repeat_interleave(8, dim=1)  # [B, 200, G]
    assert torch.equal(rows[:, :200], rows_shared)
    assert (left[:, :200][rows_shared] == -1).all()
    assert torch.equal(left[:, :200][~rows_shared], indices[:, :200][~rows_shared])
    assert torch.equal(left[:, 200:], indices[:, 200:])  # the tail tile runs KV-outer
    assert not rows_shared[0, 40:48, 0].any() and rows_shared[0, 40:48, 1].all()


def test_prepare_rows_by_torch_ops():
    """The forward's bookkeeping: shared tiles' rows and each query's own block leave the KV-outer copy, and the
    local combine's flags say which slots remain."""
    from msa_tl.attention.local_combine import FLAG_SKIP, FLAG_SLOTS
    from msa_tl.attention.row_prep import prepare_rows

    B, N, G, Bk, topk, R = 1, 20, 1, 8, 2, 16  # 8 queries a tile: tiles 0 and 1, a ragged tail of 4
    indices = block_pattern(B, N, G, Bk, topk)  # query t: its own block t // 8, then the one before
    indices[0, 9, 0] = torch.tensor([0, -1], dtype=torch.int32)  # tile 1 no longer shared; query 9 left its own out
    assert prepare_rows(indices, R, Bk, tiles=False, local=False) == (None, indices, None)
    shared, kv, flags = prepare_rows(indices, R, Bk, tiles=True, local=True)
    assert shared.tolist() == [[[1], [0]]]
    assert (kv[0, :8] == -1).all() and (flags[0, :8] == FLAG_SKIP).all()
    assert kv[0, 8, 0].tolist() == [-1, 0] and flags[0, 8, 0] == 1 | 2 | 1 << FLAG_SLOTS + 1  # own block out
    assert kv[0, 9, 0].tolist() == [0, -1] and flags[0, 9, 0] == 2 | 1 << FLAG_SLOTS  # no own term
    assert kv[0, 16, 0].tolist() == [-1, 1] and flags[0, 16, 0] == 1 | 2 | 1 << FLAG_SLOTS + 1  # the tail: KV-outer
    shared, kv, flags = prepare_rows(indices, R, Bk, tiles=True, local=False)
    assert flags is None and torch.equal(kv[0, 8:], indices[0, 8:]) and (kv[0, :8] == -1).all()


def test_the_shared_triples_are_listed_first_in_order_with_their_count():
    """The list the tile kernel's grid takes: every shared (tile, KV head, batch) triple as tile + n_tiles * (g + G b),
    in that order, then the rest; the count is the number of them (an empty shape lists nothing)."""
    torch.manual_seed(0)
    B, n_tiles, G = 2, 37, 3
    shared = (torch.rand(B, n_tiles, G) < 0.3).int()
    listed, count = list_shared_tiles(shared)
    live = [tile + n_tiles * (g + G * b) for b in range(B) for g in range(G) for tile in range(n_tiles)
            if shared[b, tile, g]]
    assert listed.shape == (B * n_tiles * G + 1,) and listed.dtype == torch.int32
    assert count.tolist() == [len(live)] and listed[: len(live)].tolist() == live
    listed, count = list_shared_tiles(torch.zeros(1, 0, 4, dtype=torch.int32))
    assert listed.shape == (1,) and int(count.sum()) == 0

