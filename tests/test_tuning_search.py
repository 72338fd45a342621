"""The Optuna search on SQLite: resume, pruned infeasible configs, failed trials (real, compile-only objective)."""

import optuna
import pytest

pytest.importorskip("tilelang")

from msa_tl.tuning.search import lowering_cost, run_search  # noqa: E402

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
