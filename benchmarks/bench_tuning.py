"""Autotuner evidence: exhaustive sweep vs TPE with <= 25% of its trials, per program, on this GPU.

    python -m benchmarks.bench_tuning [--programs ...] [--seq 131072] [--batch 1] [--queries 1] [--jobs 16] [--seeds 5]

For each program at the paper shape (B=1, Hq=64, G=4, D=Di=128, Bk=128, k=16, bf16; ``--batch`` and ``--queries``, the
newest tokens a row, are the decode programs' buckets):
1. compile every feasible config of its search space in parallel on the CPU, then check each one
   against the float64 reference and time it (``gpu_objective``: do_bench median);
2. run the TPE search, and random search as its baseline, ``--seeds`` times each with a budget of ceil(25% of the
   feasible configs) trials, on a replay of those measurements. The comparison is then about the search alone,
   not run-to-run noise;
3. report default, exhaustive best, TPE best and random best (median and worst over seeds) as % of the best.
Writes ``tuning_sweep.csv`` (every config), ``tuning_evidence.csv`` (one row per program), ``tuning_curves.csv``
(the best-so-far of every search after each trial; ``tuning_curves.png`` beside it where matplotlib is installed)
and ``configs.json`` (the exhaustive winners, in the shipped-config format) under the results folder.
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
        table.add(program=program, seq=shape["seq"], batch=shape["batch"], queries=shape["queries"],
                  config=str(dict(key)), ms=measured[key], error=error or "")
        print(f"  {program} {dict(key)}: " + (f"{ms:.4g} ms" if error is None else f"FAILED {error}"), flush=True)
    return measured


def search_curve(program, shape, measured, budget, seed, sampler="tpe") -> list:
    """The best value a ``sampler`` search has found after each of its ``budget`` trials (inf before the first
    success), replaying the sweep's measurements (both samplers start from the default config, as the tuner does)."""
    def replay(config):
        value = measured[tuple(sorted(config.items()))]
        if value is None:
            raise RuntimeError("failed in the sweep")
        return value

    study = run_search(program, shape, replay, n_trials=budget, gpu=f"replay-{sampler}-{seed}",
                       storage=optuna.storages.InMemoryStorage(), seed=seed, default=defaults(program, shape),
                       sampler=sampler)
    curve, best = [], math.inf
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            best = min(best, trial.value)
        curve.append(best)
    return curve


def plot_curves(curves: BenchTable, path) -> bool:
    """Best-so-far (% of the exhaustive best, median over seeds) against trials, a panel per program; False where
    matplotlib is not installed (it is not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    frame = curves.frame()
    programs = list(dict.fromkeys(frame.program))
    fig, axes = plt.subplots(1, len(programs), figsize=(4 * len(programs), 3.2), squeeze=False)
    for ax, program in zip(axes[0], programs):
        for sampler, rows in frame[frame.program == program].groupby("sampler"):
            median = rows.groupby("trial").pct_of_best.median()
            ax.plot(median.index, median.values, label=sampler)
        ax.set(title=program, xlabel="trial", ylabel="% of exhaustive best", ylim=(0, 101))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(root, sweep_table, evidence, gpu, winners, curves=None):
    """The sweep, evidence and curve CSVs (and the curves' plot), and the winners as ``configs.json`` beside them."""
    for table in (sweep_table, evidence, *([curves] if curves is not None else [])):
        path = table.write_csv(root)
    if curves is not None:
        plot_curves(curves, path.parent / "tuning_curves.png")
    out = cache.ConfigCache(path.parent / "configs.json")
    for key, entry in winners.items():
        out.put(gpu, key, entry)
    print("wrote", path.parent, f"(configs.json for {gpu_slug(gpu)}: copy it to tuning/configs/ to ship it)", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    parser.add_argument("--seq", type=int, default=PAPER_SHAPE["seq"])
    parser.add_argument("--batch", type=int, default=PAPER_SHAPE["batch"], help="rows of a decode step")
    parser.add_argument("--queries", type=int, default=PAPER_SHAPE["queries"], help="newest tokens a decode row")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--results-root", default=None)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.queries < 1:
        parser.error("--batch and --queries must be at least 1")
    shape = dict(PAPER_SHAPE, seq=args.seq, batch=args.batch, queries=args.queries)
    sweep_table, evidence, curves = BenchTable("tuning_sweep"), BenchTable("tuning_evidence"), BenchTable("tuning_curves")
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
        found = {}
        for sampler in ("tpe", "random"):
            for seed in range(args.seeds):
                curve = search_curve(program, shape, measured, budget, seed, sampler)
                for trial, best in enumerate(curve):
                    curves.add(program=program, seq=args.seq, batch=args.batch, sampler=sampler, seed=seed, trial=trial,
                               best_ms=best, pct_of_best=100 * ok[best_key] / best)
                found.setdefault(sampler, []).append(curve[-1])
        (median, worst), (random_median, random_worst) = (
            (sorted(found[s])[len(found[s]) // 2], max(found[s])) for s in ("tpe", "random"))
        evidence.add(program=program, seq=args.seq, batch=args.batch, queries=args.queries, feasible=len(measured),
                     failed=len(measured) - len(ok), default_ms=default_ms, exhaustive_best_ms=ok[best_key], exhaustive_best=str(dict(best_key)),
                     tpe_trials=budget, tpe_median_ms=median, tpe_worst_ms=worst,
                     tpe_median_pct_of_best=100 * ok[best_key] / median, tpe_worst_pct_of_best=100 * ok[best_key] / worst,
                     random_median_ms=random_median, random_worst_ms=random_worst,
                     tpe_beats_random=median <= random_median,
                     default_pct_of_best=100 * ok[best_key] / default_ms if default_ms else math.nan)
        winners[cache.shape_key(program, shape)] = {"config": dict(best_key), "ms": ok[best_key],
                                                    "default_ms": default_ms, "trials": len(measured)}
        print(f"{program}: default {default_ms} ms, best {ok[best_key]:.4g} ms {dict(best_key)}; TPE with {budget} "
              f"trials: median {median:.4g}, worst {worst:.4g} ms; random: median {random_median:.4g}", flush=True)
        # after every program: a cut run keeps what it has
        write_results(args.results_root, sweep_table, evidence, gpu, winners, curves)
    print(evidence.markdown(["program", "feasible", "default_ms", "exhaustive_best_ms", "tpe_trials", "tpe_median_ms",
                             "tpe_worst_pct_of_best", "random_median_ms", "tpe_beats_random"]))


if __name__ == "__main__":
    main()
