"""The order of launches, stream waits and events of the forward's overlapped combine (``combine_ctas``), and the
buffers each launch of the combine warps (``combine_warps``) merges, on the CPU:
streams, events and kernels are stand-ins that log what the driver issues, and the log is checked against the
protocol that keeps the double-buffered partials free of races."""

import contextlib

import pytest
import torch

import msa_tl.attention.kv_outer as kv_outer
from msa_tl import tl_compile

SMS = 132


class Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append((self.name, "wait_stream", other.name))

    def wait_event(self, event):
        self.log.append((self.name, "wait_event", event))

    def record_event(self):
        event = sum(1 for entry in self.log if entry[1] == "record")
        self.log.append((self.name, "record", event))
        return event


def forward_log(monkeypatch, N, chunk, combine_ctas, attention_config=None, **kw):
    """The log of one forward on CPU tensors: (stream, what, detail) entries; the attention and combine kernels log
    (stream, program, (ctas, partial buffer, t0), their arguments), others (stream, program, None, their arguments).
    ``kw``: more sparse_attention_forward keywords (shared tiles off unless given)."""
    log = []
    main, side = Stream("main", log), Stream("side", log)
    current = [main]

    def compiled(builder, items):
        config = dict(items)

        def launch(*args):
            if builder in (kv_outer.kv_outer_program, kv_outer.persistent_combine_program):
                partials = args[6] if builder is kv_outer.kv_outer_program else args[0]
                t0 = [a for a in args if isinstance(a, int)][0]
                log.append((current[-1].name, builder.__name__, (config.get("ctas"), partials.data_ptr(), t0), args))
            else:
                log.append((current[-1].name, builder.__name__, None, args))
        return launch

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    def counted(mask):
        return mask.sum(), type("Done", (), {"synchronize": lambda self: None})()

    monkeypatch.setattr(tl_compile, "_compiled", compiled)
    monkeypatch.setattr(kv_outer, "sm_count", lambda device: SMS)
    monkeypatch.setattr(kv_outer, "_side_stream", lambda device, role: side)
    monkeypatch.setattr(kv_outer, "_count_to_host", counted)
    monkeypatch.setattr(kv_outer, "tuned_config", lambda name, shape, defaults, device: dict(defaults))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", on)
    B, Hq, G, D, Bk, topk = 1, 64, 4, 128, 128, 16
    q = torch.randn(B, N, Hq, D, dtype=torch.bfloat16)
    k = torch.randn(B, N, G, D, dtype=torch.bfloat16)
    indices = torch.zeros(B, N, G, topk, dtype=torch.int32)
    kv_outer.sparse_attention_forward(q, k, k, indices, Bk, query_chunk=chunk, combine_ctas=combine_ctas,
                                      attention_config=attention_config, **{"shared_tiles": False, **kw})
    kernels = ("kv_outer_program", "persistent_combine_program") + (tuple(KERNELS) if kw else ())
    return [entry for entry in log if entry[1] in kernels or entry[1] in ("wait_stream", "wait_event", "record")]


# the other kernels the tiles_stream test follows
KERNELS = ("tile_attention_roles_program", "local_combine_program", "row_prep_program", "tiled_histogram_program",
           "plan_program", "staged_scatter_program")


@pytest.mark.parametrize("chunks", [2, 5])
def test_each_chunk_is_combined_beside_the_next_and_no_buffer_is_written_before_it_is_read(monkeypatch, chunks):
    chunk = 256
    log = forward_log(monkeypatch, chunks * chunk - 100, chunk, combine_ctas=24)
    attention = [(i, e) for i, e in enumerate(log) if e[1] == "kv_outer_program"]
    combines = [(i, e) for i, e in enumerate(log) if e[1] == "persistent_combine_program"]
    assert [e[0] for _, e in attention] == ["main"] * chunks
    assert [e[2][2] for _, e in attention] == [c * chunk for c in range(chunks)]
    buffers = [e[2][1] for _, e in attention]
    assert len(set(buffers)) == 2 and all(buffers[c] == buffers[c % 2] for c in range(chunks))  # double-buffered
    # every chunk but the last: combined on the side stream by 24 CTAs, after the side stream waited for the main
    # stream past that chunk's attention; the last one in line on every SM
    assert [(e[0], e[2][0]) for _, e in combines] == [("side", 24)] * (chunks - 1) + [("main", SMS)]
    for c in range(chunks - 1):
        at, (_, _, (_, buffer, t0), _) = combines[c]
        assert buffer == buffers[c] and t0 == c * chunk
        waits = [i for i, e in enumerate(log) if e[:3] == ("side", "wait_stream", "main") and i < at]
        assert waits and waits[-1] > attention[c][0]
    # chunk c + 2 reuses chunk c's buffer: the main stream waits for the event recorded after chunk c's side combine
    records = {e[2]: i for i, e in enumerate(log) if e[1] == "record"}
    for c in range(2, chunks):
        recorded = [event for event, i in records.items() if combines[c - 2][0] < i < combines[c - 1][0]]
        assert len(recorded) == 1
        waited = [i for i, e in enumerate(log) if e[:2] == ("main", "wait_event") and e[2] == recorded[0]]
        assert waited and waited[0] < attention[c][0]
    assert log[-1] == ("main", "wait_stream", "side")  # the caller's stream sees every combine


def test_in_line_combine_has_no_side_stream(monkeypatch):
    log = forward_log(monkeypatch, 1000, 256, combine_ctas=0)
    assert {e[0] for e in log} == {"main"}
    assert [e[2][0] for e in log if e[1] == "persistent_combine_program"] == [SMS] * 4


def test_the_persistent_attention_leaves_the_combine_its_sms(monkeypatch):
    log = forward_log(monkeypatch, 1000, 256, combine_ctas=24, attention_config=dict(persistent=True))
    assert {e[2][0] for e in log if e[1] == "kv_outer_program"} == {SMS - 24}
    asked = forward_log(monkeypatch, 1000, 256, combine_ctas=24, attention_config=dict(persistent=True, ctas=50))
    assert {e[2][0] for e in asked if e[1] == "kv_outer_program"} == {50}


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_each_chunk_is_merged_by_the_next_chunks_combine_warps(monkeypatch, chunks):
    """combine_warps: chunk c's attention launch merges chunk c - 1's partials (the other buffer: its partials, its
    LSE partials, its first query and query count), the first launch merges nothing, and only the last chunk goes
    through the combine kernel; all on the caller's stream."""
    chunk, Hq, G, topk, D = 256, 64, 4, 16, 128
    N = chunks * chunk - 100
    log = forward_log(monkeypatch, N, chunk, combine_ctas=0,
                      attention_config=dict(store_warp=True, combine_warps=True))
    attention = [e for e in log if e[1] == "kv_outer_program"]
    combines = [e for e in log if e[1] == "persistent_combine_program"]
    assert {e[0] for e in log} == {"main"} and len(attention) == chunks
    assert [(e[2][1], e[2][2]) for e in combines] == [attention[-1][2][1:]]  # the last chunk's partials, in line
    buffers = [e[2][1] for e in attention]
    assert len(set(buffers)) == min(chunks, 2) and all(buffers[c] == buffers[c % 2] for c in range(chunks))
    for c, (_, _, (_, _, t0), args) in enumerate(attention):
        prev_o, prev_l, o, lse, t_prev, n_prev = args[8:12] + args[13:15]
        assert t0 == c * chunk and o.shape == (1, N * Hq, D) and lse.shape == (1, N * Hq)
        if c == 0:
            assert n_prev == 0
            continue
        earlier = attention[c - 1][3]
        assert (prev_o.data_ptr(), prev_l.data_ptr()) == (earlier[6].data_ptr(), earlier[7].data_ptr())
        assert (t_prev, n_prev) == ((c - 1) * chunk, chunk)
        assert prev_o.shape == (1, chunk * Hq * topk, D) and prev_l.shape == (1, chunk * G * topk, Hq // G)


def test_the_shared_tiles_run_on_a_side_stream_from_the_start_and_the_caller_waits_for_them(monkeypatch):
    """tiles_stream, a CTA every triple: the shared tiles' kernel is the first launch after the row prep, on the side
    stream once it has waited for the caller's stream; every other kernel stays on the caller's stream, which waits
    for the side stream after its last launch."""
    log = forward_log(monkeypatch, 1000, 256, combine_ctas=0, local_combine=True, fused_prep=True, shared_tiles=True,
                      tiles_stream=True, tile_config=dict(listed=False))
    names = [(e[0], e[1]) for e in log]
    tiles = names.index(("side", "tile_attention_roles_program"))
    assert names[:tiles] == [("main", "row_prep_program"), ("side", "wait_stream")]
    assert log[tiles - 1] == ("side", "wait_stream", "main")
    assert [n for n in names if n[0] == "side"] == [("side", "wait_stream"), ("side", "tile_attention_roles_program")]
    assert names.count(("main", "local_combine_program")) == 4 and ("main", "staged_scatter_program") in names
    assert log[-1] == ("main", "wait_stream", "side")


def test_the_listed_shared_tiles_run_on_a_side_stream_after_the_chunks_are_queued(monkeypatch):
    """tiles_stream with the listed tiles (the default): the caller's stream records an event after the row prep
    (and the list); the chunks are queued; then the side stream waits for that event only (not for the chunks), runs
    the listed tile kernel over the shared triples, and the caller's stream waits for it last."""
    # the row prep by torch ops, so that the flags are real (a logged kernel does nothing): every query chose block 0
    # only, so every tile is shared
    log = forward_log(monkeypatch, 1000, 256, combine_ctas=0, local_combine=True, fused_prep=False, shared_tiles=True,
                      tiles_stream=True)
    names = [(e[0], e[1]) for e in log]
    record = names.index(("main", "record"))
    assert record < names.index(("main", "kv_outer_program")) and all(n[0] == "main" for n in names[:record])
    side = [(i, e) for i, e in enumerate(log) if e[0] == "side"]
    assert [e[1:] for _, e in side][:1] == [("wait_event", log[record][2])]
    assert [e[1] for _, e in side] == ["wait_event", "tile_attention_roles_program"]
    last_chunk = max(i for i, e in enumerate(log) if e[1] == "local_combine_program")
    assert side[0][0] > last_chunk and names.count(("main", "local_combine_program")) == 4
    listed = side[1][1][3][5]  # the kernel's Listed argument: the shared triples only
    assert torch.equal(listed, torch.arange((1000 // 8) * 4, dtype=torch.int32))
    assert log[-1] == ("main", "wait_stream", "side")


def test_tiles_stream_needs_the_local_combine(monkeypatch):
    with pytest.raises(ValueError, match="tiles_stream"):
        forward_log(monkeypatch, 1000, 256, combine_ctas=0, shared_tiles=True, tiles_stream=True)


@pytest.mark.parametrize("tiles_stream", [False, True], ids=["caller-stream", "side-stream"])
@pytest.mark.parametrize("listed", [True, False], ids=["listed", "every-triple"])
@pytest.mark.parametrize("local_combine", [True, False], ids=["local-combine", "partials"])
def test_the_shared_tiles_kernel_runs_once_a_forward(monkeypatch, listed, tiles_stream, local_combine):
    """One launch of the tile kernel a forward, whichever stream and grid it takes (listed: over the shared triples
    only, which the list holds first)."""
    if tiles_stream and not local_combine:
        pytest.skip("tiles_stream needs the local combine")
    log = forward_log(monkeypatch, 1000, 256, combine_ctas=0, local_combine=local_combine, fused_prep=False,
                      shared_tiles=True, tiles_stream=tiles_stream, tile_config=dict(listed=listed))
    launches = [e for e in log if e[1] == "tile_attention_roles_program"]
    assert len(launches) == 1
    assert launches[0][0] == ("side" if tiles_stream else "main")
    args = launches[0][3]
    assert (args[5].dtype == torch.int32 and args[5].dim() == 1) == listed  # the list, else o

