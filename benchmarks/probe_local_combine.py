"""Where the local combine's time goes: its launches over every chunk timed alone, against its merge ablated and
against the persistent combine streaming the same chunks' partials.

    python -m benchmarks.probe_local_combine [--seq-len 131072] [--chunk 4096] [--rounds 3]

Paper shape, the "random" selection of ``profile_forward`` (canonical, own block first). Each chunk's partials are
the same random buffer (the kernels' time does not depend on their values; outputs are not checked); the RowFlags
come from the selection (:func:`msa_tl.attention.row_prep.prepare_rows`). Variants, each summed over the chunks,
in interleaved rounds (median):

- the local combine as shipped, with its O through shared memory (``tma_o``), and with ``ablate="merge"`` (its
  loads, rings and own-block attention, no merge: timing only, wrong outputs);
- the persistent combine of the partials path on the same buffer (every slot a pair, the own block's too).

Printed with the partial bytes each reads and the rate: where the local combine's rate stays under the persistent
combine's with the merge gone, its stream (not its consumer) is what is slow (NOTES.md, session 29).
"""

import argparse
import math
import statistics

import torch

from benchmarks.profile_forward import BK, D, G, HQ, TOPK, random_selection
from msa_tl.attention.combine import PERSISTENT_COMBINE_DEFAULTS, persistent_combine_program
from msa_tl.attention.local_combine import FLAG_SLOTS, LOCAL_COMBINE_DEFAULTS, local_combine_program
from msa_tl.attention.row_prep import prepare_rows
from msa_tl.benchmark import environment, time_ms
from msa_tl.tl_compile import compiled_kernel, sm_count

R = HQ // G


def slot_count(flags: torch.Tensor) -> int:
    """(query, KV head, slot) partials the RowFlags mark."""
    bits = torch.bitwise_right_shift(flags[..., None], torch.arange(FLAG_SLOTS, FLAG_SLOTS + TOPK,
                                                                   device=flags.device, dtype=torch.int32)) & 1
    return int(bits.sum())


def variants(N: int, chunk: int, device) -> tuple:
    """({name: run over every chunk}, {name: partial bytes read})."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, N, HQ, D, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, N, G, D, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, N, G, D, device=device, dtype=torch.bfloat16, generator=gen)
    _, _, flags = prepare_rows(random_selection(N, device), R, BK, tiles=True, local=True)
    o_part = torch.randn(1, chunk * HQ * TOPK, D, device=device, dtype=torch.bfloat16, generator=gen)
    l_part = torch.randn(1, chunk * G * TOPK, R, device=device, generator=gen)
    o, lse = torch.empty_like(q), torch.empty(1, N, HQ, device=device)
    scale = 1.0 / math.sqrt(D)
    dims = dict(heads=HQ, head_dim=D, topk=TOPK, groups=G, dtype="bfloat16", partial_dtype="bfloat16")
    local = {name: compiled_kernel(local_combine_program, **dims, block_size=BK, scale=scale,
                                   **{**LOCAL_COMBINE_DEFAULTS, **extra})
             for name, extra in (("local combine", {}), ("local combine, TMA O", dict(tma_o=True)),
                                 ("local combine, merge ablated", dict(ablate="merge")))}
    persistent = compiled_kernel(persistent_combine_program, **dims,
                                 **dict(PERSISTENT_COMBINE_DEFAULTS, ctas=sm_count(device)))
    starts = list(range(0, N, chunk))
    o_rows, lse_rows = o.view(1, N * HQ, D), lse.view(1, N * HQ)

    def local_run(kernel):
        return lambda: [kernel(q, k, v, flags, o_part, l_part, o, lse, t0, min(N, t0 + chunk)) for t0 in starts]

    def persistent_run():
        for t0 in starts:
            n = min(chunk, N - t0)
            persistent(o_part[:, : n * HQ * TOPK].view(1, n * G, TOPK, R, D),
                       l_part[:, : n * G * TOPK].view(1, n * G, TOPK, R), o_rows, lse_rows, t0)

    runs = {name: local_run(kernel) for name, kernel in local.items()}
    runs["persistent combine (every slot)"] = persistent_run
    box = R * D * 2
    read = {name: slot_count(flags) * box for name in local}
    read["persistent combine (every slot)"] = N * G * TOPK * box
    return runs, read


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print(environment(), flush=True)
    runs, read = variants(args.seq_len, args.chunk, "cuda")
    times = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(time_ms(run, rep_ms=500))
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{t[-1]:.2f}" for t in times.values()), flush=True)
    print(f"N={args.seq_len}, {args.chunk}-query chunks, paper shape, random selection")
    for name, t in times.items():
        ms = statistics.median(t)
        print(f"  {name:<36} {ms:8.2f} ms  partials read {read[name] / 1e9:6.1f} GB  {read[name] / ms / 1e9:5.2f} TB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
