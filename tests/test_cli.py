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
