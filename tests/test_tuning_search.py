"""The Optuna search on SQLite: resume, pruned infeasible configs, failed trials (real, compile-only objective)."""

import optuna
import pytest

pytest.importorskip("tilelang")

from msa_tl.tuning.objective import lowering_cost  # noqa: E402
from msa_tl.tuning.search import precompile, run_search  # noqa: E402

PAPER = dict(groups=4, heads=64, head_dim=128, index_dim=128, block_size=128, topk=16, seq=131072)


def test_study_resumes_where_it_stopped(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    objective = lowering_cost("lse_combine", PAPER)
    first = run_search("lse_combine", PAPER, objective, n_trials=2, storage=storage, gpu="test")
    before = [(t.number, t.params, t.value) for t in first.trials]
    assert len(before) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in first.trials)
    # a new process would see the same: reload from the database and continue to 4 finished trials
    resumed = run_search("lse_combine", PAPER, objective, n_trials=4, storage=storage, gpu="test")
    after = [(t.number, t.params, t.value) for t in resumed.trials]
    assert after[:2] == before and len(after) == 4
    assert len(run_search("lse_combine", PAPER, objective, n_trials=4, storage=storage, gpu="test").trials) == 4


def test_infeasible_configs_are_pruned_and_errors_fail(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    wide = dict(PAPER, heads=24)  # 6 heads per group: no block_rows choice tiles whole queries

    def must_not_compile(config):
        raise AssertionError("an infeasible config reached the objective")

    study = run_search("kv_outer_attention", wide, must_not_compile, n_trials=3, storage=storage, gpu="test")
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    assert all("heads" in t.user_attrs["rejected"] for t in study.trials)

    def broken(config):
        raise RuntimeError("compile error")

    failed = run_search("lse_combine", PAPER, broken, n_trials=2, storage=storage, gpu="test-broken")
    assert [t.state for t in failed.trials] == [optuna.trial.TrialState.FAIL] * 2


@pytest.mark.parametrize("batch", [1, 4])
def test_default_first_repeats_reuse_values_and_stale_trials_fail(tmp_path, batch):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    calls = []

    def cost(config):  # a real function of the config, cheap enough to run many times
        calls.append(dict(config))
        return config["rows"] / config["threads"]

    default = dict(rows=64, threads=128)
    study = run_search("lse_combine", PAPER, cost, n_trials=12, storage=storage, gpu="t", default=default, batch=batch)
    assert study.trials[0].params == default and calls[0] == default
    assert len(study.trials) == 12
    assert len(calls) == len({tuple(sorted(c.items())) for c in calls}), "a config was evaluated twice"
    for t in study.trials:
        if "repeat_of" in t.user_attrs:
            assert t.value == study.trials[t.user_attrs["repeat_of"]].value
    assert study.best_params == dict(rows=32, threads=256)
    # a trial left RUNNING by a killed process is marked failed when the study resumes
    study.ask()
    resumed = run_search("lse_combine", PAPER, cost, n_trials=13, storage=storage, gpu="t")
    assert resumed.trials[12].state == optuna.trial.TrialState.FAIL
    assert resumed.trials[0].params == default, "the default is enqueued only for a new study"


def test_parallel_precompile_reports_errors_per_config(tmp_path, monkeypatch):
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path / "tl"))  # real nvcc runs
    compile_batch = precompile("lse_combine", PAPER, jobs=2, target="sm90")
    errors = compile_batch([dict(rows=64, threads=128), dict(rows=32, threads=128), dict(rows=64, threads=100)])
    assert errors[:2] == [None, None]
    assert errors[2] is not None and errors[2].startswith("compile:")


def test_search_records_compile_errors_as_failed_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study = run_search("lse_combine", PAPER, lambda config: 1.0, n_trials=3, storage=storage, gpu="t", batch=3,
                       precompile=lambda configs: ["compile: boom"] * len(configs))
    assert all(t.state == optuna.trial.TrialState.FAIL and t.user_attrs["error"] == "compile: boom"
               for t in study.trials if "repeat_of" not in t.user_attrs)


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_search_curves_replay_a_sweep_from_the_default(sampler):
    """benchmarks/bench_tuning.py's replay on a synthetic sweep of a real space: the curve has one point a trial,
    starts at the default's cost, never rises, and holds only costs the sweep measured; both samplers run."""
    from benchmarks.bench_tuning import search_curve
    from msa_tl.tuning.objective import defaults
    from msa_tl.tuning.spaces import SPACES

    program = "index_select_fused"
    configs = SPACES[program].feasible(PAPER)
    keys = [tuple(sorted(c.items())) for c in configs]
    measured = {key: 1.0 + sum(map(ord, repr(key))) % 97 / 97 for key in keys}  # a fixed, rugged landscape
    curve = search_curve(program, PAPER, measured, 10, seed=3, sampler=sampler)
    assert len(curve) == 10
    assert curve[0] == measured[tuple(sorted(defaults(program, PAPER).items()))]
    assert all(b <= a for a, b in zip(curve, curve[1:]))
    assert set(curve) <= set(measured.values())
    with pytest.raises(ValueError, match="sampler must be one of"):
        run_search(program, PAPER, lambda config: 1.0, n_trials=1, storage=optuna.storages.InMemoryStorage(),
                   sampler="grid")


@pytest.mark.parametrize("flag", ["--batch", "--queries"])
def test_bench_tuning_names_a_decode_bucket_below_one(flag, capsys):
    """benchmarks/bench_tuning.py's decode buckets (--batch, --queries) are checked before any GPU work."""
    from benchmarks.bench_tuning import main

    with pytest.raises(SystemExit):
        main([flag, "0"])
    assert "--batch and --queries must be at least 1" in capsys.readouterr().err
