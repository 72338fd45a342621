"""Context parallelism (``msa_tl.ops.context_parallel``) over gloo: several CPU processes, each holding its zigzag
shard of one sequence, against the same sequence run in one process (float64 on the reference path, so the
comparison is tight). Forward (o, lse, indices, the KL), backward (every input's gradient, including those that
cross ranks), both K / V exchanges, the dense (warmup) mode, and the layer with ``process_group``.

Each test spawns its ranks once and runs its cases inside them; a failure in any rank fails the test with that
rank's traceback.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import msa_tl
from msa_tl.benchmark import end_spawned_rank
from msa_tl.ops.context_parallel import ALL_GATHER_SHARE, ZigzagLayout, context_parallel_msa, plan_exchange
from msa_tl.ops.layer import MSAAttention
from test_varlen import fresh_seed  # noqa: F401  (the fixed default seed, a fixture)

f64 = torch.float64


def spawn(check, world: int, *args):
    """Run ``check(rank, world, *args)`` on ``world`` gloo ranks (CPU processes), which meet through a fresh file
    (no port to race for)."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world, os.path.join(folder, "rendezvous"), check, args), nprocs=world, join=True)


def _rank_main(rank, world, rendezvous, check, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    check(rank, world, *args)
    end_spawned_rank()


def sequence(B, N, Hq, G, D, Di, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=f64)

    return rand(B, N, Hq, D), rand(B, N, G, D), rand(B, N, G, D), rand(B, N, G, Di), rand(B, N, Di), rand(B, N, Hq, D)


def one_process(q, k, v, q_idx, k_idx, w, *, dense, **options):
    """The single-process result: o, lse, indices, kl and the gradients of sum(o * w) + kl."""
    Bk = options["block_size"]
    leaves = [x.clone().requires_grad_() for x in (q, k, v, q_idx, k_idx)]
    if dense:
        o = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in leaves[:3]), is_causal=True,
                                                             enable_gqa=True).transpose(1, 2)
        idx = lse = None
        kl = msa_tl.kl_alignment_loss(leaves[0], leaves[1], leaves[3], leaves[4], None, block_size=Bk)
    else:
        o, lse, idx = msa_tl.msa_attention(*leaves, return_lse=True, return_indices=True, **options)
        kl = msa_tl.kl_alignment_loss(leaves[0], leaves[1], leaves[3], leaves[4], idx, block_size=Bk, lse=lse)
    ((o * w).sum() + kl).backward()
    return o.detach(), lse, idx, kl.detach(), [x.grad for x in leaves]


def _check_matches_one_process(rank, world, seed, B, N, Hq, G, D, Di, cases):
    q, k, v, q_idx, k_idx, w = sequence(B, N, Hq, G, D, Di, seed)
    for dense, kv_exchange, options in cases:
        layout = ZigzagLayout(N, world, rank, options["block_size"])
        o, lse, idx, kl, grads = one_process(q, k, v, q_idx, k_idx, w, dense=dense, **options)
        shards = [layout.shard(x).requires_grad_() for x in (q, k, v, q_idx, k_idx)]
        out = context_parallel_msa(*shards, process_group=None, dense=dense, compute_kl=True,
                                   kv_exchange=kv_exchange, **options)
        # each rank back-propagates its own losses; the ranks' KL means average to the whole sequence's
        ((out.o * layout.shard(w)).sum() + out.kl_loss / world).backward()
        case = f"rank {rank}/{world} dense={dense} {kv_exchange} {options}"
        torch.testing.assert_close(out.o, layout.shard(o), rtol=1e-12, atol=1e-12, msg=case)
        if not dense:
            assert torch.equal(out.indices, layout.shard(idx)), case
            assert torch.equal(out.lse, layout.shard(lse)), case
        losses = [torch.zeros((), dtype=f64) for _ in range(world)]
        dist.all_gather(losses, out.kl_loss.detach())
        torch.testing.assert_close(sum(losses) / world, kl, rtol=1e-6 if not dense else 1e-12, atol=0, msg=case)
        for name, shard, grad in zip(("dq", "dk", "dv", "dq_idx", "dk_idx"), shards, grads):
            # the KL's teacher normaliser is the float32 lse on both sides, the rest float64
            torch.testing.assert_close(shard.grad, layout.shard(grad), rtol=1e-6, atol=1e-9, msg=f"{name}: {case}")
        assert out.volume.index_keys == (N - 2 * layout.chunk) * B * Di * 8, case
        assert out.volume.dense_kv == (N - 2 * layout.chunk) * B * G * D * 2 * 8, case
        want_path = {"all_gather": "all_gather", "chosen": "chosen"}.get("all_gather" if dense else kv_exchange)
        assert out.volume.kv_path == want_path or (want_path is None and out.volume.kv <= out.volume.dense_kv), case


SPARSE = dict(block_size=16, topk=3, local_blocks=2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_msa_equals_one_process(world, fresh_seed):
    """Sparse (each exchange) and dense mode over 1, 2 and 3 ranks: every output and gradient equals the one-process
    run's rows of the rank's shard."""
    cases = [(False, "chosen", SPARSE), (False, "all_gather", SPARSE),
             (False, "auto", dict(block_size=16, topk=2, local_blocks=1)), (True, "all_gather", dict(block_size=16))]
    spawn(_check_matches_one_process, world, fresh_seed, 2, 16 * 2 * world * 2, 4, 2, 16, 8, cases)


def _check_chosen_exchange(rank, world, seed):
    """A long sequence with few blocks chosen: the chosen-block exchange moves less than dense CP's all-gather, the
    plan's sends and receives agree across ranks, and the results still equal the one-process run."""
    B, N, Hq, G, D, Di = 1, 16 * 2 * world * 6, 2, 1, 8, 8
    options = dict(block_size=16, topk=2, local_blocks=1)
    q, k, v, q_idx, k_idx, w = sequence(B, N, Hq, G, D, Di, seed)
    layout = ZigzagLayout(N, world, rank, 16)
    out = context_parallel_msa(*(layout.shard(x) for x in (q, k, v, q_idx, k_idx)), compute_kl=False,
                               kv_exchange="chosen", **options)
    assert out.volume.kv_path == "chosen" and 0 < out.volume.kv < out.volume.dense_kv, out.volume
    o, _, idx, _, _ = one_process(q, k, v, q_idx, k_idx, w, dense=False, **options)
    torch.testing.assert_close(out.o, layout.shard(o), rtol=1e-12, atol=1e-12)
    exchange = plan_exchange(out.indices, layout, None, "chosen")
    plans = [None] * world
    dist.all_gather_object(plans, [[ids.tolist() for ids in exchange.sends], [ids.tolist() for ids in exchange.receives]])
    for sender in range(world):
        for receiver in range(world):
            assert plans[sender][0][receiver] == plans[receiver][1][sender]
    owners = layout.block_owners()
    needed = set(layout.shard(idx)[layout.shard(idx) >= 0].tolist())
    fetched = {b for ids in exchange.receives for b in ids.tolist()}
    assert fetched == {b for b in needed if owners[b] != rank}
    assert out.volume.kv == len(fetched) * 16 * B * G * D * 2 * 8
    # auto keeps the chosen blocks unless all ranks together would fetch more than the share of an all-gather
    fetched_by_all = sum(len(ids) for plan in plans for ids in plan[1])
    auto = plan_exchange(out.indices, layout, None, "auto")
    assert (auto.sends is None) == (fetched_by_all > ALL_GATHER_SHARE * (world - 1) * (N // 16))


def test_the_chosen_block_exchange_fetches_only_chosen_blocks(fresh_seed):
    spawn(_check_chosen_exchange, 3, fresh_seed)


def _check_layer(rank, world, seed, mode):
    """MSAAttention(process_group=WORLD) on each rank's shard, with RoPE at the shard's positions, against the same
    layer on the whole sequence: output rows, the KL, and the parameter gradients summed over the ranks."""
    torch.manual_seed(seed)
    hidden, B, N = 32, 2, 16 * 2 * world * 2
    options = dict(num_heads=4, num_kv_heads=2, head_dim=8, index_head_dim=8, block_size=16, topk=2,
                   local_blocks=1, rotary_dim=8, index_rope=True, mode=mode, dtype=f64)
    dense = MSAAttention(hidden, **options)
    sharded = MSAAttention(hidden, process_group=dist.group.WORLD, **options)
    sharded.load_state_dict(dense.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, N, hidden, generator=gen, dtype=f64)
    w = torch.randn(B, N, hidden, generator=gen, dtype=f64)
    positions = torch.arange(N, dtype=f64)
    freqs = positions[:, None] / 10000 ** (torch.arange(0, 8, 2, dtype=f64) / 8)
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)  # [N, 8]

    whole = dense(x, (cos, sin), compute_kl=True)
    ((whole.output * w).sum() + whole.kl_loss).backward()

    layout = ZigzagLayout(N, world, rank, 16)
    at = layout.positions()
    mine = sharded(layout.shard(x), (cos[at], sin[at]), compute_kl=True)
    ((mine.output * layout.shard(w)).sum() + mine.kl_loss / world).backward()
    torch.testing.assert_close(mine.output, layout.shard(whole.output.detach()), rtol=1e-10, atol=1e-12)
    if mode == "sparse":
        assert torch.equal(mine.indices, layout.shard(whole.indices))
    losses = [torch.zeros((), dtype=f64) for _ in range(world)]
    dist.all_gather(losses, mine.kl_loss.detach())
    torch.testing.assert_close(sum(losses) / world, whole.kl_loss.detach(), rtol=1e-6, atol=0)
    for name, p in sharded.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)  # the data-parallel all-reduce a CP group joins
        torch.testing.assert_close(grad, dict(dense.named_parameters())[name].grad, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_the_context_parallel_layer_equals_the_layer(mode, fresh_seed):
    spawn(_check_layer, 2, fresh_seed, mode)


def test_zigzag_layout_balances_and_round_trips():
    layout = [ZigzagLayout(4 * 2 * 16, 4, r, 16) for r in range(4)]
    x = torch.arange(128).view(1, 128, 1)
    shards = [lay.shard(x) for lay in layout]
    assert torch.equal(layout[0].unshard(shards), x)
    for r, lay in enumerate(layout):
        assert torch.equal(lay.positions(), shards[r].view(-1))
        assert lay.chunk_starts() == (16 * r, 16 * (7 - r))
        assert sum(lay.positions().tolist()) == sum(layout[0].positions().tolist())  # the same causal work
        assert torch.equal(lay.block_owners()[lay.local_blocks()], torch.full((2,), r))
    with pytest.raises(ValueError, match="must be a multiple of 128"):
        ZigzagLayout(4 * 2 * 16 + 16, 4, 0, 16)


def _check_errors(rank, world):
    q = torch.randn(1, 2 * 16 + 1, 2, 8, dtype=f64)
    k = torch.randn(1, 2 * 16 + 1, 1, 8, dtype=f64)
    q_idx, k_idx = torch.randn(1, 33, 1, 8, dtype=f64), torch.randn(1, 33, 8, dtype=f64)
    with pytest.raises(ValueError, match="must be even"):
        context_parallel_msa(q, k, k, q_idx, k_idx, block_size=16, topk=2)
    q, k, q_idx, k_idx = (x[:, :24].contiguous() for x in (q, k, q_idx, k_idx))
    with pytest.raises(ValueError, match="whole 16-token blocks"):
        context_parallel_msa(q, k, k, q_idx, k_idx, block_size=16, topk=2)
    with pytest.raises(ValueError, match="kv_exchange must be one of"):
        plan_exchange(torch.zeros(1, 32, 1, 2, dtype=torch.int32), ZigzagLayout(32 * world, world, rank, 16), None,
                      "ring")
    layer = MSAAttention(16, num_heads=2, num_kv_heads=1, head_dim=8, index_head_dim=8, block_size=16, topk=2,
                         process_group=dist.group.WORLD, dtype=f64)
    with pytest.raises(ValueError, match="no cache, no packed documents"):
        layer(torch.randn(1, 32, 16, dtype=f64), cu_seqlens=torch.tensor([0, 32], dtype=torch.int32))


def test_bad_context_parallel_inputs_are_rejected_naming_them():
    spawn(_check_errors, 2)
