"""Context parallelism over NCCL (`pytest -m gpu`, a machine of two or more GPUs): each GPU holds its zigzag shard
of one bf16 sequence and runs the kernels (queries at an offset for its second chunk), against the float64
reference of the whole sequence over the selection the ranks made together: the selection up to ties, o, lse and
dq / dk / dv (dk / dv summed across the ranks by the exchange's backward) within FA3's calibration, the KL and its
index gradients within the packed KL test's tolerances. tests/test_context_parallel.py checks the same protocol
exactly on CPU processes.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msa_tl import reference as R
from msa_tl.benchmark import end_spawned_rank
from msa_tl.ops.context_parallel import ZigzagLayout, context_parallel_msa
from test_conformance_gpu import assert_within_calibration, dtype_baseline
from test_varlen import assert_selection_up_to_ties

pytestmark = pytest.mark.gpu

NO_MULTICAST = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def _rank_main(rank, world, rendezvous, seed, kv_exchange):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    _check(rank, world, seed, kv_exchange)
    end_spawned_rank()


def _check(rank, world, seed, kv_exchange):
    B, Hq, G, D, Di, Bk, topk = 1, 16, 4, 128, 128, 128, 16
    N = 2 * world * 1024
    device, dtype = torch.device("cuda", rank), torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(*shape, generator=gen).to(device, dtype) for shape in
                   ((B, N, Hq, D), (B, N, G, D), (B, N, G, D), (B, N, Hq, D)))
    q_idx, k_idx = (torch.randn(*shape, generator=gen).to(device, dtype) for shape in ((B, N, G, Di), (B, N, Di)))
    layout = ZigzagLayout(N, world, rank, Bk)
    shards = [layout.shard(x).requires_grad_() for x in (q, k, v, q_idx, k_idx)]
    out = context_parallel_msa(*shards, block_size=Bk, topk=topk, compute_kl=True, kv_exchange=kv_exchange)
    ((out.o.float() * layout.shard(do).float()).sum() + out.kl_loss / world).backward()

    def whole(x):  # every rank's shard of x -> the whole sequence
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return layout.unshard(parts)

    idx = whole(out.indices)
    assert_selection_up_to_ties(idx, q_idx, k_idx, Bk, topk)
    ref_o, ref_lse = R.sparse_attention(q, k, v, idx, Bk)
    refs = R.sparse_attention_backward(do, None, q, k, v, idx, Bk)
    base = dtype_baseline(q, k, v, idx, Bk, do)
    heads = torch.ones(B, N, Hq, dtype=torch.bool, device=device)
    tokens = torch.ones(B, N, dtype=torch.bool, device=device)
    assert_within_calibration("o", whole(out.o.detach()), ref_o, base[0], dtype, heads)
    assert_within_calibration("lse", whole(out.lse.detach()), ref_lse, base[1], dtype, heads)
    for name, shard, ref, baseline, keep in zip(("dq", "dk", "dv"), shards, refs, base[2:], (heads, tokens, tokens)):
        assert_within_calibration(name, whole(shard.grad), ref, baseline, dtype, keep)

    qr, kr = q_idx.double().requires_grad_(), k_idx.double().requires_grad_()
    want = R.kl_alignment_loss(q, k, qr, kr, idx, Bk)
    want.backward()
    losses = [torch.zeros((), device=device) for _ in range(world)]
    dist.all_gather(losses, out.kl_loss.detach().float())
    got = (sum(losses) / world).item()
    assert abs(got - want.item()) <= 1e-2 * abs(want.item()), (got, want.item())
    for name, shard, ref in (("dq_idx", shards[3], qr.grad), ("dk_idx", shards[4], kr.grad)):
        err = ((whole(shard.grad).double() - ref).norm() / ref.norm()).item()
        assert err <= 2e-2, f"{name} rel err {err:.2e}"


@pytest.mark.parametrize("kv_exchange", ["chosen", "all_gather"])
def test_sharded_msa_on_two_gpus_matches_the_reference(kv_exchange, fresh_seed):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (a multi-GPU device kind)")
    for name, value in NO_MULTICAST.items():
        os.environ[name] = value
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(2, os.path.join(folder, "rendezvous"), fresh_seed, kv_exchange), nprocs=2)
