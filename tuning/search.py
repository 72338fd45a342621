"""The Optuna search: TPE over a program's search space, studies kept in SQLite so a stopped run resumes.

``run_search(program, shape, objective, n_trials=...)`` asks the TPE sampler for configs, ``batch``
at a time:
- A config that the space's constraints reject is pruned before anything is compiled, and the
  reason is stored.
- The rest are compiled together on the CPU cores (``precompile``, e.g. :func:`precompile`) and then
  handed to ``objective`` one by one.
- A compile error, or an objective that raises (output that failed its reference check), becomes a
  failed trial with the error stored.
- A config seen before reuses its value. The trial still counts, marked ``repeat_of``.

The returned value (milliseconds on the GPU, or any cost) is minimised. The first trial of a new
study is the documented default, when one is given. The study lives in ``sqlite:///<cache
dir>/studies.db`` unless ``storage`` says otherwise. Running again with the same name continues
until ``n_trials`` trials have finished. Trials left running by a killed process are marked failed.
"""

import concurrent.futures
import multiprocessing
import time

import optuna

from msa_tl.tuning.cache import cache_dir, shape_key
from msa_tl.tuning.spaces import SPACES

State = optuna.trial.TrialState


def storage_url(path=None) -> str:
    path = path or cache_dir() / "studies.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def study_name(program: str, shape: dict, gpu: str) -> str:
    return f"{gpu}|{shape_key(program, shape)}"


def _finished(study) -> int:
    return sum(t.state.is_finished() for t in study.trials)


SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}


def run_search(program: str, shape: dict, objective, *, n_trials: int, gpu: str = "", timeout=None,
               storage=None, seed: int = 0, default=None, precompile=None, batch: int = 1,
               on_trial=None, sampler: str = "tpe") -> optuna.Study:
    """Run ``program``'s study at ``shape`` until ``n_trials`` trials have finished (or ``timeout`` s pass).

    ``precompile(configs) -> [error or None]`` compiles a batch before timing. ``on_trial(trial)`` is
    called after each finished trial (progress output). ``sampler``: "tpe" (the tuner's) or "random" (the
    baseline the tuning evidence compares it with).
    """
    space = SPACES[program]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    study = optuna.create_study(study_name=study_name(program, shape, gpu), storage=storage or storage_url(),
                                sampler=SAMPLERS[sampler](seed=seed), direction="minimize",
                                load_if_exists=True)
    for stale in [t for t in study.trials if t.state == State.RUNNING]:
        study.tell(stale.number, state=State.FAIL)  # a killed run's trial: it never reported
    if default is not None and not study.trials:
        study.enqueue_trial(default)
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = {tuple(sorted(t.params.items())): t for t in study.trials if t.state == State.COMPLETE}
    while _finished(study) < n_trials and (deadline is None or time.monotonic() < deadline):
        pending, repeats = [], []
        for _ in range(min(batch, n_trials - _finished(study))):
            trial = study.ask()
            config = {name: trial.suggest_categorical(name, list(choices)) for name, choices in space.params.items()}
            reason = space.reject(config, shape)
            if reason is not None:
                trial.set_user_attr("rejected", reason)
                _tell(study, trial, on_trial, state=State.PRUNED)
                continue
            key = tuple(sorted(config.items()))
            if key in seen or any(key == tuple(sorted(c.items())) for _, c in pending):
                repeats.append((trial, key))  # told after the batch, with the first evaluation's value
                continue
            pending.append((trial, config))
        errors = precompile([c for _, c in pending]) if precompile and pending else [None] * len(pending)
        for (trial, config), error in zip(pending, errors):
            if error is None:
                try:
                    value = float(objective(config))
                except Exception as exc:  # a wrong result or a runtime error: a failed trial, not a crash
                    error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                trial.set_user_attr("error", error[:1000])
                _tell(study, trial, on_trial, state=State.FAIL)
                continue
            _tell(study, trial, on_trial, value=value)
            seen[tuple(sorted(config.items()))] = study.trials[trial.number]
        for trial, key in repeats:
            if key in seen:
                trial.set_user_attr("repeat_of", seen[key].number)
                _tell(study, trial, on_trial, value=seen[key].value)
            else:
                trial.set_user_attr("error", "repeat of a config that failed")
                _tell(study, trial, on_trial, state=State.FAIL)
    return study


def _tell(study, trial, on_trial, *, value=None, state=None):
    if state is None:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)
    if on_trial is not None:
        on_trial(study.trials[trial.number])


def _compile_config(program: str, shape: dict, config: dict, target: str):
    """Worker: compile every unit of ``config`` (filling TileLang's on-disk kernel cache); the error or None."""
    try:
        from msa_tl.tl_compile import compile_program, sm90_target
        from msa_tl.tuning.objective import compile_units

        for builder, args in compile_units(program, shape, config):
            compile_program(builder, args, target=sm90_target() if target == "sm90" else target)
        return None
    except Exception as exc:
        return f"compile: {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"


def precompile(program: str, shape: dict, *, jobs: int, target: str = "cuda"):
    """A ``precompile`` for :func:`run_search`: compile a batch of configs in ``jobs`` processes.

    ``target="cuda"`` compiles for the GPU present, exactly as the kernels later ask, so their
    ``tilelang.compile`` finds each kernel in the on-disk cache. ``"sm90"`` compiles for Hopper without
    a GPU.
    """
    def run(configs):
        if jobs <= 1:
            return [_compile_config(program, shape, c, target) for c in configs]
        context = multiprocessing.get_context("spawn")  # no CUDA state forked into the workers
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(jobs, len(configs)), mp_context=context) as pool:
            return list(pool.map(_compile_config, *zip(*[(program, shape, c, target) for c in configs])))

    return run
