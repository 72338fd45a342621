"""``msa-tl tune``: search each program at each length, print default vs tuned, save the winners.

For every (program, seq) it runs :func:`msa_tl.tuning.search.run_search`. The default config is
the first trial, and candidates are compiled ``jobs`` at a time on the CPU, then checked and timed
on the GPU. The best config is written to the user cache (:mod:`msa_tl.tuning.cache`), which every
kernel reads from then on. ``objective="lowering"`` runs the same machinery on a machine without a
GPU and minimises lowering time instead. Those winners mean nothing for speed, so they are never saved.
"""

import datetime
import math
import sys
from importlib import metadata

import optuna
import pandas as pd

from msa_tl.tuning import cache
from msa_tl.tuning.objective import PAPER_SHAPE, defaults, gpu_objective, lowering_cost
from msa_tl.tuning.search import precompile, run_search

State = optuna.trial.TrialState


def _progress(total: int, label: str):
    """A tqdm bar on stderr (tqdm comes with optuna) showing the best value so far."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=label, file=sys.stderr, leave=True, dynamic_ncols=True)
    best = [math.inf]

    def on_trial(trial):
        if trial.state == State.COMPLETE and trial.value < best[0]:
            best[0] = trial.value
        bar.set_postfix_str(f"best {best[0]:.4g}" + (f", #{trial.number} {trial.state.name.lower()}"
                                                      if trial.state != State.COMPLETE else ""))
        bar.update(1)

    return bar, on_trial


def tune(programs, seq_lens, *, shape=None, trials: int = 30, timeout=None, jobs: int = 4,
         objective: str = "gpu", storage=None, save: bool = True, seed: int = 0) -> pd.DataFrame:
    """Tune ``programs`` at each of ``seq_lens``; one row per (program, seq): default vs tuned."""
    import torch

    base = dict(PAPER_SHAPE, **(shape or {}))
    on_gpu = objective == "gpu"
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError("tuning on the GPU needs a CUDA GPU; --objective lowering runs the search on the CPU")
    gpu = cache.device_gpu_key(0) if on_gpu else "cpu-lowering"
    unit = "ms" if on_gpu else "s (lowering)"
    rows = []
    for program in programs:
        for seq in seq_lens:
            shape_ = dict(base, seq=seq)
            cost = gpu_objective(program, shape_) if on_gpu else lowering_cost(program, shape_)
            default = defaults(program, shape_)
            bar, on_trial = _progress(trials, f"{program} N={seq}")
            study = run_search(program, shape_, cost, n_trials=trials, gpu=gpu, timeout=timeout, storage=storage,
                               seed=seed, default=default, batch=max(1, jobs), on_trial=on_trial,
                               precompile=precompile(program, shape_, jobs=jobs,
                                                     target="cuda" if on_gpu else "sm90"))
            bar.close()
            rows.append(_summary(study, program, seq, default, unit))
            best = rows[-1]
            if save and on_gpu and best["tuned"] == best["tuned"]:  # not NaN: some trial completed
                cache.user_cache().put(gpu, cache.shape_key(program, shape_), {
                    "config": best["config"], "ms": best["tuned"], "default_ms": best["default"],
                    "trials": best["trials"], "date": datetime.date.today().isoformat(),
                    "torch": torch.__version__, "tilelang": metadata.version("tilelang")})
                cache.forget_resolved()
            del cost
            if on_gpu:
                torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def _summary(study, program, seq, default, unit) -> dict:
    trials = study.trials
    complete = [t for t in trials if t.state == State.COMPLETE]
    default_trial = next((t for t in complete if t.params == default), None)
    best = min(complete, key=lambda t: t.value) if complete else None
    default_value = default_trial.value if default_trial else math.nan
    tuned = best.value if best else math.nan
    return {
        "program": program, "seq": seq, "unit": unit, "default": default_value, "tuned": tuned,
        "speedup": default_value / tuned if best else math.nan, "trials": len(trials),
        "evaluated": sum("repeat_of" not in t.user_attrs for t in complete),
        "failed": sum(t.state == State.FAIL for t in trials), "pruned": sum(t.state == State.PRUNED for t in trials),
        "config": dict(best.params) if best else {},
    }


def cached_entries():
    """[(source, gpu, key, entry)] of the user cache then the shipped files, for ``msa-tl info``."""
    found = []
    for source, caches in (("user", [cache.user_cache()]), ("shipped", cache.shipped_caches())):
        for c in caches:
            for gpu, entries in c.load().items():
                for key, entry in sorted(entries.items()):
                    found.append((source, gpu, key, entry))
    return found
