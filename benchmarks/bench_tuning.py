"""Autotuner evidence: exhaustive sweep vs TPE with <= 25% of its trials, per program, on this GPU.

    python -m benchmarks.bench_tuning [--programs ...] [--seq 131072] [--jobs 16] [--seeds 5]

For each program at the paper shape (B=1, Hq=64, G=4, D=Di=128, Bk=128, k=16, bf16):
1. compile every feasible config of its search space in parallel on the CPU, then check each one
   against the float64 reference and time it (``gpu_objective``: do_bench median);
2. run the TPE search ``--seeds`` times with a budget of ceil(25% of the feasible configs) trials,
   on a replay of those measurements. The comparison is then about the search alone, not run-to-run noise;
3. report default, exhaustive best, and TPE best (median and worst over seeds) as % of the best.
Writes ``tuning_sweep.csv`` (every config), ``tuning_evidence.csv`` (one row per program) and
``configs.json`` (the exhaustive winners, in the shipped-config format) under the results folder.
"""

import argparse
import math

import optuna

from msa_tl.benchmark import BenchTable, gpu_slug
from msa_tl.tuning import cache
from msa_tl.tuning.objective import PAPER_SHAPE, PROGRAMS, defaults, gpu_objective
from msa_tl.tuning.search import precompile, run_search
from msa_tl.tuning.spaces import SPACES


def sweep(program, shape, jobs, table):
    """{config key: ms or None (failed)} over the feasible grid, each config checked then timed."""
    configs = SPACES[program].feasible(shape)
    errors = precompile(program, shape, jobs=jobs)(configs)
    objective = gpu_objective(program, shape)
    measured = {}
    for config, error in zip(configs, errors):
        if error is None:
            try:
                ms = objective(config)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
        key = tuple(sorted(config.items()))
        measured[key] = None if error else ms
        table.add(program=program, seq=shape["seq"], config=str(dict(key)), ms=measured[key], error=error or "")
        print(f"  {program} {dict(key)}: " + (f"{ms:.4g} ms" if error is None else f"FAILED {error}"), flush=True)
    return measured


def tpe_best(program, shape, measured, budget, seed):
    """Best value TPE finds within ``budget`` trials, replaying the sweep's measurements."""
    def replay(config):
        value = measured[tuple(sorted(config.items()))]
        if value is None:
            raise RuntimeError("failed in the sweep")
        return value

    study = run_search(program, shape, replay, n_trials=budget, gpu=f"replay-{seed}",
                       storage=optuna.storages.InMemoryStorage(), seed=seed, default=defaults(program, shape))
    return min(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)


def write_results(root, sweep_table, evidence, gpu, winners):
    """The sweep and evidence CSVs, and the winners as ``configs.json`` beside them."""
    for table in (sweep_table, evidence):
        path = table.write_csv(root)
    out = cache.ConfigCache(path.parent / "configs.json")
    for key, entry in winners.items():
        out.put(gpu, key, entry)
    print("wrote", path.parent, f"(configs.json for {gpu_slug(gpu)}: copy it to tuning/configs/ to ship it)", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    parser.add_argument("--seq", type=int, default=PAPER_SHAPE["seq"])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--results-root", default=None)
    args = parser.parse_args(argv)
    shape = dict(PAPER_SHAPE, seq=args.seq)
    sweep_table, evidence = BenchTable("tuning_sweep"), BenchTable("tuning_evidence")
    winners = {}
    gpu = cache.device_gpu_key(0)
    for program in args.programs:
        print(f"{program}: sweeping {len(SPACES[program].feasible(shape))} feasible configs", flush=True)
        measured = sweep(program, shape, args.jobs, sweep_table)
        ok = {k: v for k, v in measured.items() if v is not None}
        if not ok:
            continue
        best_key = min(ok, key=ok.get)
        default_ms = measured.get(tuple(sorted(defaults(program, shape).items())))
        budget = max(2, math.ceil(0.25 * len(measured)))
        found = sorted(tpe_best(program, shape, measured, budget, seed) for seed in range(args.seeds))
        median, worst = found[len(found) // 2], found[-1]
        evidence.add(program=program, seq=args.seq, feasible=len(measured), failed=len(measured) - len(ok),
                     default_ms=default_ms, exhaustive_best_ms=ok[best_key], exhaustive_best=str(dict(best_key)),
                     tpe_trials=budget, tpe_median_ms=median, tpe_worst_ms=worst,
                     tpe_median_pct_of_best=100 * ok[best_key] / median, tpe_worst_pct_of_best=100 * ok[best_key] / worst,
                     default_pct_of_best=100 * ok[best_key] / default_ms if default_ms else math.nan)
        winners[cache.shape_key(program, shape)] = {"config": dict(best_key), "ms": ok[best_key],
                                                    "default_ms": default_ms, "trials": len(measured)}
        print(f"{program}: default {default_ms} ms, best {ok[best_key]:.4g} ms {dict(best_key)}; TPE with {budget} "
              f"trials: median {median:.4g}, worst {worst:.4g} ms", flush=True)
        write_results(args.results_root, sweep_table, evidence, gpu, winners)  # after every program: a cut run keeps what it has
    print(evidence.markdown(["program", "feasible", "default_ms", "exhaustive_best_ms", "tpe_trials", "tpe_median_ms",
                             "tpe_worst_pct_of_best"]))


if __name__ == "__main__":
    main()
