"""The accumulating forward's host side (CPU): what it schedules, which layouts it takes, what fits shared memory."""

import pytest
import torch

pytest.importorskip("tilelang")

from msa_tl.attention.accumulate import (ACCUMULATE_DEFAULTS, accumulate_shared_bytes,  # noqa: E402
                                         accumulate_unsupported, split_own_block)
from msa_tl.tl_compile import SMEM_LIMIT  # noqa: E402


def test_the_own_block_goes_to_the_local_launch_and_the_rest_to_the_schedule():
    torch.manual_seed(0)
    B, N, G, topk, Bk = 2, 700, 3, 5, 64
    own = (torch.arange(N) // Bk).view(1, N, 1, 1)
    indices = torch.randint(-1, N // Bk + 1, (B, N, G, topk), dtype=torch.int32)
    indices = torch.minimum(indices, own.int())  # no future ids; repeats do not matter here
    indices[0, 100, 1] = torch.tensor([1, -1, 0, -1, -1], dtype=torch.int32)  # block 1 is query 100's own (Bk 64)
    others, own_chosen = split_own_block(indices, Bk)
    assert own_chosen.dtype == torch.int32 and own_chosen.shape == (B, N, G)
    assert torch.equal(own_chosen.bool(), (indices == own).any(dim=3))
    assert not (others == own).any()
    kept = indices != own
    assert torch.equal(others[kept], indices[kept]) and (others[~kept] == -1).all()
    assert own_chosen[0, 100, 1] == 1 and others[0, 100, 1].tolist() == [-1, -1, 0, -1, -1]


@pytest.mark.parametrize("R,D,dtype,query_start,reason", [
    (16, 128, torch.bfloat16, 0, None), (8, 64, torch.float16, 0, None), (64, 128, torch.bfloat16, 0, None),
    (4, 128, torch.bfloat16, 0, "query heads per KV head"), (12, 128, torch.bfloat16, 0, "query heads per KV head"),
    (16, 96, torch.bfloat16, 0, "head dims"), (16, 128, torch.float32, 0, "bf16 / fp16"),
    (16, 128, torch.bfloat16, 256, "query offset")])
def test_the_layouts_it_takes_and_why_not_the_others(R, D, dtype, query_start, reason):
    why = accumulate_unsupported(R, D, dtype, query_start)
    assert (why is None) if reason is None else (reason in why)


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("item_queries", [128, 256, 512])
def test_the_configs_it_takes_fit_shared_memory(stages, item_queries):
    assert accumulate_shared_bytes(128, 128, item_queries, stages) <= SMEM_LIMIT
    assert accumulate_shared_bytes(128, 128, ACCUMULATE_DEFAULTS["item_queries"], ACCUMULATE_DEFAULTS["stages"]) \
        <= SMEM_LIMIT
