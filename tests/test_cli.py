import pytest

from msa_tl.cli import main


def test_info_reports_versions_and_stage_paths(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "tilelang", "select_blocks", "sparse_attention", "kl_alignment_loss", "tuned configs"):
        assert word in out


def test_demo_runs_forward_backward_and_matches_dense(capsys):
    assert main(["demo", "--seq-len", "256", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "vs dense SDPA" in out and "OK" in out


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


@pytest.mark.parametrize("flags", [["--seq-lens", "-5"], ["--seq-lens", "0"], ["--topk", "1000"], ["--topk", "0"],
                                   ["--block-size", "100"], ["--trials", "0"], ["--jobs", "0"], ["--timeout", "0"],
                                   ["--heads", "30", "--groups", "4"], ["--head-dim", "0"]])
def test_tune_rejects_bad_flags_before_running(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--programs", "lse_combine", "--objective", "lowering", *flags])
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_demo_rejects_a_bad_sequence_length(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--seq-len", "0"])
    assert exit_info.value.code == 2


@pytest.fixture
def tuning_dirs(tmp_path, monkeypatch):
    from msa_tl.tuning import cache

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "user"))
    monkeypatch.setattr(cache, "SHIPPED_DIR", tmp_path / "shipped")
    return tmp_path


def test_tune_runs_a_real_search_on_the_cpu_and_prints_default_vs_tuned(tuning_dirs, capsys):
    pytest.importorskip("tilelang")
    argv = ["tune", "--programs", "lse_combine", "--trials", "4", "--objective", "lowering", "--jobs", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "| program | seq |" in captured.out and "lse_combine" in captured.out and "rows=" in captured.out
    assert "lse_combine N=131072" in captured.err, "a progress bar per (program, N)"
    assert (tuning_dirs / "user" / "studies.db").exists(), "the study is kept for resuming"
    assert not (tuning_dirs / "user" / "configs.json").exists(), "lowering-cost winners are never saved"


def test_tune_on_the_gpu_objective_without_a_gpu_says_so(tuning_dirs, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["tune", "--programs", "lse_combine", "--trials", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_info_lists_cached_configs(tuning_dirs, capsys):
    from msa_tl.tuning import cache

    gpu = cache.gpu_key("NVIDIA H100 80GB HBM3", "9.0")
    key = cache.shape_key("kv_outer_attention", dict(groups=4, heads=64, head_dim=128, block_size=128, topk=16,
                                                     seq=131072))
    cache.user_cache().put(gpu, key, {"config": {"block_rows": 128, "threads": 128}, "ms": 11.0, "default_ms": 12.5})
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tuned configs: 1" in out and f"[user] {gpu} | {key}" in out and "11 ms vs default 12.5 ms" in out
