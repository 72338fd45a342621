"""MSA with its sequence sharded over GPUs (context parallelism, NCCL) against one GPU, in one run.

    python -m benchmarks.bench_context_parallel [--world 2] [--seqs 131072 1048576] [--backward]

Paper shape (Hq=64, G=4, D=Di=128, Bk=128, k=16, bf16, B=1). One process a GPU; rank 0 first times the whole
sequence on its GPU alone (``msa_attention``, and with ``--backward`` the main branch's and the KL's backward), then
every rank times ``context_parallel_msa`` on its zigzag shard, then (forward only) each of its phases alone: the
index keys' all-gather, the selects, the K / V exchange and the attention, per rank. A sequence one GPU cannot
hold is recorded as ``oom``. The sharded time is the slowest rank's median of a fixed number of runs (every rank must run the same
collectives, so no adaptive repeat count). Also reported: bytes each rank receives (index keys, K / V) against
the K / V all-gather dense context parallelism needs, and each rank's peak memory. Writes
``context_parallel.csv``. ``--cpu-smoke`` runs the whole flow on CPU processes over gloo at a toy shape.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and its siblings are set for the ranks), as the device notes ask.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import msa_tl
from msa_tl.benchmark import BenchTable, end_spawned_rank
from msa_tl.ops.context_parallel import ZigzagLayout, context_parallel_msa, fetch_kv, gather_sequence, plan_exchange

PAPER = dict(heads=64, groups=4, head_dim=128, index_dim=128, block_size=128, topk=16)
TOY = dict(heads=4, groups=2, head_dim=16, index_dim=16, block_size=16, topk=2)
NO_MULTICAST = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def make_inputs(N, shape, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*dims):
        return torch.randn(*dims, generator=gen).to(device, dtype)

    H, G, D, Di = shape["heads"], shape["groups"], shape["head_dim"], shape["index_dim"]
    return rand(1, N, H, D), rand(1, N, G, D), rand(1, N, G, D), rand(1, N, G, Di), rand(1, N, Di)


def timed_runs(fn, device, warmup: int, runs: int, together: bool = True) -> list[float]:
    """Milliseconds of each of ``runs`` calls after ``warmup``; ``together``: every call starts at a barrier of the
    whole group (the ranks start each run together)."""
    times = []
    for i in range(warmup + runs):
        if together:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
    return times


def step(call, inputs, backward: bool):
    """One forward (and backward of sum(o * do) + KL) of ``call(*leaves) -> (o, kl)``."""
    leaves = [x.detach().requires_grad_(backward) for x in inputs]
    with torch.set_grad_enabled(backward):
        o, kl = call(*leaves)
        if backward:
            (o.float().square().mean() + kl).backward()


def one_gpu(inputs, shape, backward):
    options = dict(block_size=shape["block_size"], topk=shape["topk"])

    def call(q, k, v, q_idx, k_idx):
        o, lse, idx = msa_tl.msa_attention(q, k, v, q_idx, k_idx, return_lse=True, return_indices=True, **options)
        kl = msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, idx, lse=lse, block_size=options["block_size"]) \
            if backward else o.new_zeros(())
        return o, kl

    return lambda: step(call, inputs, backward)


def sharded(shards, shape, backward, kv_exchange, record):
    def call(q, k, v, q_idx, k_idx):
        out = context_parallel_msa(q, k, v, q_idx, k_idx, block_size=shape["block_size"], topk=shape["topk"],
                                   compute_kl=backward, kv_exchange=kv_exchange)
        record.append(out.volume)
        return out.o, out.kl_loss if backward else out.o.new_zeros(())

    return lambda: step(call, shards, backward)


def phase_times(shards, shape, layout, kv_exchange, device, runs) -> dict:
    """Median ms of each forward phase on this rank, each timed alone (every rank runs the same collectives):
    the index keys' all-gather, the two chunks' selects, the K / V exchange (plan and fetch), their attention."""
    q, k, v, q_idx, k_idx = shards
    C, Bk, topk = layout.chunk, shape["block_size"], shape["topk"]
    whole_k_idx = gather_sequence(k_idx, layout)

    def select():
        return [msa_tl.select_blocks(q_idx[:, h * C:(h + 1) * C].contiguous(), whole_k_idx[:, :t0 + C].contiguous(),
                                     block_size=Bk, topk=topk, query_start=t0)
                for h, t0 in enumerate(layout.chunk_starts())]

    indices = select()
    exchange = plan_exchange(torch.cat(indices, dim=1), layout, None, kv_exchange)
    whole_k, whole_v = fetch_kv(k, v, layout, exchange)

    def attend():
        for h, t0 in enumerate(layout.chunk_starts()):
            msa_tl.sparse_attention(q[:, h * C:(h + 1) * C].contiguous(), whole_k[:, :t0 + C].contiguous(),
                                    whole_v[:, :t0 + C].contiguous(), indices[h], block_size=Bk, query_start=t0)

    phases = dict(gather_index_keys=lambda: gather_sequence(k_idx, layout), select=select,
                  exchange=lambda: fetch_kv(k, v, layout, plan_exchange(torch.cat(indices, dim=1), layout, None,
                                                                        kv_exchange)),
                  attention=attend)
    with torch.no_grad():
        return {name: statistics.median(timed_runs(fn, device, 1, runs)) for name, fn in phases.items()}


def rank_main(rank, world, rendezvous, args, results):
    cuda = not args.cpu_smoke
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    shape = TOY if args.cpu_smoke else PAPER
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    rows = []
    for N in args.seqs:
        inputs = make_inputs(N, shape, device, dtype)
        alone = None
        if rank == 0:
            try:
                alone = statistics.median(timed_runs(one_gpu(inputs, shape, args.backward), device, 1, args.runs,
                                                     together=False))
            except torch.OutOfMemoryError:
                alone = "oom"
            if cuda:
                torch.cuda.empty_cache()
        dist.barrier()  # the other ranks wait while rank 0 runs alone
        layout = ZigzagLayout(N, world, rank, shape["block_size"])
        shards = [layout.shard(x) for x in inputs]
        del inputs
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for kv_exchange in args.exchanges:
            volumes = []
            times = timed_runs(sharded(shards, shape, args.backward, kv_exchange, volumes), device, 1, args.runs)
            medians = [None] * world
            dist.all_gather_object(medians, statistics.median(times))
            peaks = [None] * world
            dist.all_gather_object(peaks, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0)
            phases = [None] * world
            dist.all_gather_object(phases, phase_times(shards, shape, layout, kv_exchange, device, args.runs)
                                   if not args.backward else {})
            if rank == 0:
                ms = max(medians)
                volume = volumes[-1]
                rows.append(dict(seq=N, world=world, backward=args.backward, kv_exchange=kv_exchange,
                                 kv_path=volume.kv_path, one_gpu_ms=alone, sharded_ms=ms,
                                 speedup=(alone / ms) if isinstance(alone, float) else None,
                                 rank_ms="/".join(f"{m:.2f}" for m in medians),
                                 index_keys_mb=volume.index_keys / 2**20, kv_mb=volume.kv / 2**20,
                                 dense_kv_mb=volume.dense_kv / 2**20, peak_gib=max(peaks),
                                 **{f"{name}_ms": "/".join(f"{p[name]:.2f}" for p in phases) for name in phases[0]}))
                print(rows[-1], flush=True)
    if rank == 0:
        results.extend(rows)
    end_spawned_rank()  # the rows are delivered


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--seqs", type=int, nargs="+", default=[131072, 1048576])
    parser.add_argument("--exchanges", nargs="+", default=["auto"], choices=["auto", "chosen", "all_gather"])
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--results-root", default=None)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.seqs = [16 * 2 * args.world * 4]
    elif torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    for name, value in NO_MULTICAST.items():
        os.environ[name] = value  # the spawned ranks inherit it
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.list()
        mp.spawn(rank_main, args=(args.world, os.path.join(folder, "rendezvous"), args, results), nprocs=args.world)
        table = BenchTable("context_parallel" + ("_backward" if args.backward else ""))
        for row in results:
            table.add(**row)
    print(table.markdown())
    if not args.cpu_smoke:
        print("wrote", table.write_csv(args.results_root))
    return table


if __name__ == "__main__":
    main()
