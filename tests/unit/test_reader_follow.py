"""The reader's incremental mode (``Follower``) and ``guard_event``, on literal timeline text."""

from memdiag.commands.top import RunWatch, render
from memdiag.timeline import FORMAT_VERSION, Follower, TimelineWriter, guard_event, node_path
from memdiag.timeline import format as fmt
from memdiag.timeline.reader import read_run

HEADER = b'{"kind":"header","t":0,"format_version":"%s","rank":0,"host":"n0"}\n' % FORMAT_VERSION.encode()
SAMPLE_1 = b'{"kind":"sample","t":1,"rss_bytes":100}\n'
SAMPLE_2 = b'{"kind":"sample","t":2,"rss_bytes":200}\n'


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_follower_returns_only_the_records_appended_since_the_last_call(tmp_path):
    path = tmp_path / "rank-0.jsonl"
    follower = Follower(path)
    assert follower.new_records() == []  # not written yet: no error, nothing
    append(path, HEADER + SAMPLE_1)
    assert [r["kind"] for r in follower.new_records()] == ["header", "sample"]
    assert follower.new_records() == []
    append(path, SAMPLE_2)
    assert [r["t"] for r in follower.new_records()] == [2]
    assert follower.problems == []


def test_follower_holds_a_torn_last_line_until_its_end_is_written(tmp_path):
    path = tmp_path / "rank-0.jsonl"
    append(path, HEADER + b'{"kind":"sample","t":3,"rss')
    follower = Follower(path)
    assert [r["kind"] for r in follower.new_records()] == ["header"]
    assert follower.new_records() == []
    append(path, b'_bytes":300}\n')
    assert follower.new_records() == [{"kind": "sample", "t": 3, "rss_bytes": 300}]
    assert follower.problems == [], "a line still being written is not a skipped line"


def test_follower_skips_and_counts_garbage_and_wrong_shapes_by_cause(tmp_path):
    path = tmp_path / "rank-0.jsonl"
    follower = Follower(path)
    append(path, SAMPLE_1)  # before the header
    append(path, HEADER)
    append(path, b"\x00\xffgarbage\n" * 2)
    append(path, b'{"kind":"sample","t":"oops","rss_bytes":5}\n')
    append(path, b'{"kind":"phase_begin","t":4,"phase":7}\n')
    append(path, b"[1,2]\n")
    assert [r["kind"] for r in follower.new_records()] == ["header"]
    append(path, b"not json either\n" + SAMPLE_2)
    assert [r["t"] for r in follower.new_records()] == [2]
    (summary,) = follower.problems
    assert summary.startswith("rank-0.jsonl: skipped ")
    assert "3 lines not JSON" in summary, "causes add up over calls"
    assert "1 line before the header" in summary
    assert "1 line of the wrong shape (t is not an integer)" in summary
    assert "1 line of the wrong shape (phase is not a string)" in summary
    assert "1 line of the wrong shape (not an object)" in summary


def test_follower_and_read_run_judge_the_same_lines_alike(tmp_path):
    (tmp_path / "timeline").mkdir()
    path = tmp_path / "timeline" / "rank-0.jsonl"
    append(path, HEADER + SAMPLE_1 + b"garbage\n" + b'{"kind":"phase_end","t":5,"phase":null}\n' + SAMPLE_2)
    follower = Follower(path)
    followed = follower.new_records()
    run = read_run(tmp_path)
    assert [r["t"] for r in followed if r["kind"] == "sample"] == list(run.ranks[0].t_ns) == [1, 2]
    assert follower.problems == [p for p in run.problems if p.startswith("rank-0.jsonl")]


def test_follower_refuses_an_unknown_major_version_without_raising(tmp_path):
    path = tmp_path / "rank-0.jsonl"
    append(path, b'{"kind":"header","t":0,"format_version":"99.0","rank":0}\n' + SAMPLE_1)
    follower = Follower(path)
    assert follower.new_records() == []
    assert follower.refused is not None and "99.0" in follower.refused
    append(path, SAMPLE_2)
    assert follower.new_records() == [], "nothing of a refused file, even what comes later"
    assert follower.problems == [follower.refused]


def test_follower_accepts_another_minor_version(tmp_path):
    path = tmp_path / "rank-0.jsonl"
    major = FORMAT_VERSION.split(".")[0]
    append(path, b'{"kind":"header","t":0,"format_version":"%s.99"}\n' % major.encode() + SAMPLE_1)
    follower = Follower(path)
    assert [r["kind"] for r in follower.new_records()] == ["header", "sample"]
    assert follower.refused is None


def test_top_says_which_file_it_cannot_read_and_shows_the_others(tmp_path):
    from rich.console import Console

    timeline = tmp_path / "timeline"
    timeline.mkdir()
    append(timeline / "rank-0.jsonl", HEADER + SAMPLE_1)
    append(timeline / "rank-1.jsonl", b'{"kind":"header","t":0,"format_version":"99.0","rank":1,"host":"n0"}\n' + SAMPLE_2)
    watch = RunWatch(tmp_path)
    watch.refresh()
    assert sorted(watch.ranks) == [0], "no row made up for a file it could not read"
    assert watch.ranks[0].rss_now == 100
    console = Console(width=300, record=True)
    console.print(render(watch))
    screen = console.export_text()
    assert "rank-1.jsonl has timeline format 99.0" in screen


def write_node_as_the_watcher_does(run_dir, records):
    """The node watcher's header and records, through the writer node.py uses."""
    writer = TimelineWriter(node_path(run_dir, "n0"), {"host": "n0", "guard": {"limit_bytes": 1000, "fraction": 0.9}})
    for record in records:
        writer.write(record)
    writer.flush(force=True)
    writer.close()


NODE_SAMPLE = {"kind": fmt.SAMPLE, "t": 10, "mem_available_bytes": 50, "ranks": {"0": {"rss_bytes": 900}}}
GUARD = {
    "kind": fmt.GUARD,
    "t": 10,
    "reason": "ranks use 900 B, over 90% of the 1000 B limit",
    "node_rss_bytes": 900,
    "limit_bytes": 1000,
    "mem_available_bytes": 50,
    "stacks": {"0": "stacks/rank-0.txt"},
    "action": "SIGTERM to ranks [0], SIGKILL after 5 s",
}


def test_guard_event_finds_the_watchers_guard_record(tmp_path):
    write_node_as_the_watcher_does(tmp_path, [NODE_SAMPLE, GUARD, {**NODE_SAMPLE, "t": 11}])
    assert guard_event(tmp_path) == GUARD


def test_guard_event_is_none_without_a_guard_record_even_if_the_header_mentions_the_guard(tmp_path):
    write_node_as_the_watcher_does(tmp_path, [NODE_SAMPLE])
    assert b'"guard"' in node_path(tmp_path, "n0").read_bytes()  # the header's guard settings
    assert guard_event(tmp_path) is None
    assert guard_event(tmp_path / "no-such-run") is None


def test_guard_event_ignores_garbage_and_wrong_shapes_that_contain_the_guard_kind(tmp_path):
    write_node_as_the_watcher_does(tmp_path, [NODE_SAMPLE])
    append(node_path(tmp_path, "n0"), b'\x00garbage {"kind":"guard","t":1}\n')
    append(node_path(tmp_path, "n0"), b'{"kind":"guard","t":"soon"}\n')  # t must be an integer
    append(node_path(tmp_path, "n0"), b'{"kind":"guard","t":12,"rea')  # torn: the watcher was cut off
    assert b'"kind":"guard"' in node_path(tmp_path, "n0").read_bytes()
    assert guard_event(tmp_path) is None


def test_guard_event_ignores_a_node_file_of_an_unknown_major_version(tmp_path):
    path = node_path(tmp_path, "n0")
    path.parent.mkdir(parents=True)
    append(path, b'{"kind":"header","t":0,"format_version":"99.0","host":"n0"}\n{"kind":"guard","t":10,"reason":"x"}\n')
    assert guard_event(tmp_path) is None
    append(node_path(tmp_path, "n1"), HEADER + b'{"kind":"guard","t":11,"reason":"y"}\n')
    assert guard_event(tmp_path) == {"kind": "guard", "t": 11, "reason": "y"}
