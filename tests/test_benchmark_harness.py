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
