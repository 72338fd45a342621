import pandas as pd
import pytest

from msa_tl.benchmark import BenchTable, environment, gpu_slug, markdown_table


@pytest.mark.parametrize(
    "name,slug",
    [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA H100 PCIe", "h100"),
     ("NVIDIA A100-SXM4-80GB", "a100"), ("cpu", "cpu"), ("Some GPU!", "some-gpu")],
)
def test_gpu_slug(name, slug):
    assert gpu_slug(name) == slug


def test_rows_carry_environment_and_csv_lands_under_gpu_folder(tmp_path):
    env = dict(environment(), gpu="NVIDIA H100 80GB HBM3")
    table = BenchTable("example", env=env)
    table.add(op="x", N=1024, ms=1.5)
    table.add(op="y", N=2048, ms=3.25)
    path = table.write_csv(tmp_path)
    assert path == tmp_path / "h100" / "example.csv"
    frame = pd.read_csv(path)
    assert list(frame["N"]) == [1024, 2048]
    for column in ("gpu", "date", "torch", "tilelang", "capability"):
        assert column in frame.columns
    assert (frame["gpu"] == "NVIDIA H100 80GB HBM3").all()


def test_markdown_table():
    text = markdown_table(pd.DataFrame({"N": [8192], "ms": [27.61234]}))
    assert text.splitlines() == ["| N | ms |", "|---|---|", "| 8192 | 27.61 |"]


def test_kv_recall_training_script_runs_all_three_phases(tmp_path):
    import pandas as pd

    from benchmarks import train_kv_recall

    argv = ["--device", "cpu", "--seq", "128", "--min-back", "32", "--pairs", "2", "--batch", "2", "--dense-steps", "2", "--steps", "2",
            "--eval-every", "1", "--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
            "--head-dim", "8", "--block-size", "16", "--topk", "2", "--results-root", str(tmp_path)]
    assert train_kv_recall.main(argv) == 0
    frame = pd.read_csv(tmp_path / "cpu" / "kv_recall_training.csv")
    assert list(frame.phase.unique()) == ["dense", "warmup", "sparse"]
    assert (frame[frame.phase == "dense"].kl_loss == 0).all() and (frame[frame.phase != "dense"].kl_loss > 0).all()
    for column in ("lm_loss", "recall", "sparse_accuracy", "dense_accuracy"):
        assert frame[column].notna().all() and frame[column].between(0, 100).all(), column


def test_dense_curriculum_doubles_to_the_full_length():
    from benchmarks.train_kv_recall import curriculum_seq

    lengths = [curriculum_seq(step, 700, 128, 8192) for step in range(700)]
    assert lengths[0] == 128 and lengths[-1] == 8192
    assert sorted(set(lengths)) == [128 * 2 ** i for i in range(7)]  # every doubling, none skipped
    assert all(b in (a, 2 * a) for a, b in zip(lengths, lengths[1:]))  # never shrinks, doubles at most
    assert lengths.count(8192) >= 100  # the last part of the phase trains at the full length
    assert {curriculum_seq(step, 10, 8192, 8192) for step in range(10)} == {8192}
    assert [curriculum_seq(step, 5, 100, 1000) for step in range(5)] == [100, 200, 400, 800, 1000]  # capped at N
