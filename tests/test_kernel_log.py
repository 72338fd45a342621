"""The kernel log: each distinct kernel a run compiles is written once, and its builder resolves again."""

import json

import pytest

pytest.importorskip("tilelang")

from msa_tl import tl_compile  # noqa: E402
from msa_tl.attention import scheduler  # noqa: E402


def test_compiled_kernels_are_logged_once_and_resolve(tmp_path, monkeypatch):
    log = tmp_path / "kernels.jsonl"
    monkeypatch.setenv("MSA_TL_KERNEL_LOG", str(log))
    built = []
    monkeypatch.setattr(tl_compile, "compile_program", lambda builder, config: built.append(config) or object())
    tl_compile._compiled.cache_clear()
    try:
        first = tl_compile.compiled_kernel(scheduler.histogram_program, groups=3, topk=5)
        again = tl_compile.compiled_kernel(scheduler.histogram_program, topk=5, groups=3)
        tl_compile.compiled_kernel(scheduler.plan_program, item_queries=96)
    finally:
        tl_compile._compiled.cache_clear()
    assert first is again and len(built) == 2
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries == [
        {"builder": "msa_tl.attention.scheduler:histogram_program", "config": {"groups": 3, "topk": 5}},
        {"builder": "msa_tl.attention.scheduler:plan_program", "config": {"item_queries": 96}},
    ]
    assert [tl_compile.builder_by_name(e["builder"]) for e in entries] == [scheduler.histogram_program,
                                                                          scheduler.plan_program]
