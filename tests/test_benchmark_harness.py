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
    assert frame.fp8_recall.between(0, 1).all()


def test_dense_curriculum_doubles_to_the_full_length():
    from benchmarks.train_kv_recall import curriculum_seq

    lengths = [curriculum_seq(step, 700, 128, 8192) for step in range(700)]
    assert lengths[0] == 128 and lengths[-1] == 8192
    assert sorted(set(lengths)) == [128 * 2 ** i for i in range(7)]  # every doubling, none skipped
    assert all(b in (a, 2 * a) for a, b in zip(lengths, lengths[1:]))  # never shrinks, doubles at most
    assert lengths.count(8192) >= 100  # the last part of the phase trains at the full length
    assert {curriculum_seq(step, 10, 8192, 8192) for step in range(10)} == {8192}
    assert [curriculum_seq(step, 5, 100, 1000) for step in range(5)] == [100, 200, 400, 800, 1000]  # capped at N


def test_packed_llama_training_script_runs_all_three_phases(tmp_path):
    """benchmarks/train_packed_llama.py end to end on the CPU: a tiny Llama on packed documents, dense, then
    converted (warmup, KL on), then sparse; the CSV holds every phase and its columns in range."""
    pytest.importorskip("transformers")
    from benchmarks import train_packed_llama

    argv = ["--device", "cpu", "--seq", "192", "--min-doc", "32", "--max-doc", "96", "--dense-doc-start", "32",
            "--pairs", "2", "--keys", "8", "--vocab", "96", "--dense-steps", "2", "--steps", "2", "--eval-every", "1",
            "--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--head-dim", "8",
            "--block-size", "16", "--topk", "2", "--results-root", str(tmp_path)]
    assert train_packed_llama.main(argv) == 0
    frame = pd.read_csv(tmp_path / "cpu" / "packed_llama_training.csv")
    assert list(frame.phase.unique()) == ["dense", "warmup", "sparse"]
    assert (frame.groupby("phase", sort=False).size() == 2).all()  # steps 0 and 1 of each phase
    assert (frame[frame.phase == "dense"].kl_loss == 0).all() and (frame[frame.phase != "dense"].kl_loss > 0).all()
    assert (frame.docs >= 2).all() and (frame.longest_doc <= 96 + 32).all()
    assert (frame.lm_loss > 0).all() and frame.lm_loss.notna().all()
    for column in ("train_accuracy", "recall", "sparse_accuracy", "dense_accuracy"):
        assert frame[column].notna().all() and frame[column].between(0, 1).all(), column


def test_packed_llama_batches_answer_each_query_in_its_own_document():
    """The packed batch is DataCollatorWithFlattening's (positions restart where cu_seq_lens says, int32, the
    longest document as max_length), and every query is answerable from its own document only: its key sits
    there as a needle followed by the answer, and a key shared by documents has a different value in each."""
    pytest.importorskip("transformers")
    import torch

    from benchmarks.train_packed_llama import IGNORE, curriculum, make_packed_batch

    keys, values, shared = 16, 40, 0
    for seed in range(6):
        low, high = [(9, 16), (32, 64), (48, 300)][seed % 3]
        batch = make_packed_batch(1000, low, high, 6, keys, values, 200, torch.Generator().manual_seed(seed))
        ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
        cu = batch["cu_seq_lens_q"]
        assert cu.dtype == batch["cu_seq_lens_k"].dtype == torch.int32 and torch.equal(cu, batch["cu_seq_lens_k"])
        assert ids.shape == labels.shape == positions.shape == (1000,) and cu[0] == 0 and cu[-1] == 1000
        bounds = cu.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
        assert all(n >= low for n in lengths) and all(n <= high for n in lengths[:-1]) and lengths[-1] <= high + low
        assert torch.equal(positions, torch.cat([torch.arange(n) for n in lengths]))
        value_of = {}  # key -> {document: value}
        for d, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            doc, answers = ids[a:b].tolist(), (labels[a:b] != IGNORE).nonzero()[:, 0].tolist()
            assert answers and answers[0] > 1 and labels[a] == IGNORE  # nothing answered across the border
            for p in answers:
                key, answer = doc[p - 1], int(labels[a + p])
                assert 1 <= key <= keys and keys < answer <= keys + values and doc[p] == answer
                first = doc.index(key)  # the needle, earlier in the same document
                assert first < p - 1 and doc[first + 1] == answer and doc.count(key) == 2
                value_of.setdefault(key, {})[d] = answer
        for key, by_doc in value_of.items():
            assert len(set(by_doc.values())) == len(by_doc), (seed, key, by_doc)  # another document misleads
            shared += len(by_doc) > 1
    assert shared > 10  # keys are reused across documents
    assert curriculum(0, 100, 32, 256, 4096) == (16, 32) and curriculum(99, 100, 32, 256, 4096) == (256, 4096)
    assert curriculum(0, 100, 8192, 256, 4096) == (256, 4096)


def test_context_parallel_benchmark_runs_every_exchange_on_cpu_ranks():
    """benchmarks/bench_context_parallel.py end to end on two gloo ranks at its toy shape: a row per exchange with
    both timings, the path each took, the volumes (the chosen blocks never more than dense CP's all-gather) and
    each rank's phase times."""
    from benchmarks import bench_context_parallel

    table = bench_context_parallel.main(["--cpu-smoke", "--world", "2", "--runs", "1", "--exchanges", "chosen",
                                         "all_gather"])
    frame = table.frame()
    assert list(frame.kv_exchange) == ["chosen", "all_gather"] and list(frame.kv_path) == ["chosen", "all_gather"]
    assert (frame.one_gpu_ms > 0).all() and (frame.sharded_ms > 0).all()
    assert (frame.kv_mb <= frame.dense_kv_mb).all() and (frame.index_keys_mb > 0).all()
    assert (frame.world == 2).all() and (frame.seq == 16 * 2 * 2 * 4).all()
    for phase in ("gather_index_keys_ms", "select_ms", "exchange_ms", "attention_ms"):  # per rank, "a/b"
        assert all(len(str(cell).split("/")) == 2 and min(map(float, str(cell).split("/"))) > 0
                   for cell in frame[phase]), phase


@pytest.mark.parametrize("N", [1000, 5000])
def test_profile_forward_selection_is_canonical_with_the_own_block(N):
    import torch

    from benchmarks.profile_forward import BK, TOPK, random_selection
    from msa_tl.ops.validation import canonical_indices

    idx = random_selection(N, "cpu")
    assert idx.shape == (1, N, 4, TOPK) and idx.dtype == torch.int32
    own = torch.arange(N) // BK
    assert (idx[0, :, :, 0] == own[:, None]).all()  # the own block, first in descending order
    assert torch.equal(canonical_indices(idx, BK, 0), idx)  # no repeats, nothing in a query's future
    visible = torch.minimum(own + 1, torch.tensor(TOPK))
    assert ((idx[0] >= 0).sum(-1) == visible[:, None]).all()  # every slot used where enough blocks are visible


def test_profile_forward_sums_the_gaps_between_kernels(capsys):
    """Idle time only where no kernel runs (an overlapped kernel leaves no gap), summed by the pair around it."""
    from benchmarks.profile_forward import print_gaps

    spans = [("fill", 0.0, 10.0), ("attention", 14.0, 50.0), ("side", 20.0, 60.0), ("fill", 61.0, 70.0),
             ("attention", 73.0, 90.0)]
    print_gaps(spans, top=2)
    out = capsys.readouterr().out
    assert "gaps between kernels (the whole trace): 3, 0.008 ms" in out  # 4 + 1 + 3 us; none inside 14-60
    assert "0.007 ms    2 x  fill -> attention" in out and "0.001 ms    1 x  side -> fill" in out
    assert "longest:      4.0 us before kernel 1: fill -> attention" in out


def test_probe_local_combine_counts_the_slots_the_flags_mark():
    import torch

    from benchmarks.probe_local_combine import slot_count
    from msa_tl.attention.local_combine import FLAG_SKIP, FLAG_SLOTS

    flags = torch.tensor([[[1 | 2 | 1 << FLAG_SLOTS | 1 << FLAG_SLOTS + 15], [1], [FLAG_SKIP], [2 | 1 << FLAG_SLOTS + 3]]],
                         dtype=torch.int32)  # [1, 4, 1]: own bits, skip bits and the row bits are not slots
    assert slot_count(flags) == 3
