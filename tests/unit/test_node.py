"""Node watcher: parsers on literal /proc text, rank discovery on a real process tree."""

import json
import os
import subprocess
import sys
import time

from memdiag.node import NodeWatcher, find_ranks, parse_environ_rank
from memdiag.procs import parse_stat, parse_stat_ppid
from memdiag.timeline import read_run

# a real /proc/<pid>/stat line, its command name made awkward
STAT = (
    "4242 (python3 -m my (odd) name) S 4200 4242 1143 0 -1 4194304 103 0 0 0 0 0 0 0 20 0 1 0 78107 "
    "3133440 389 18446744073709551615 94438931243008 94438931262889 140720610971440 0 0 0 0 0 0 0 0 0 17 "
    "1 0 0 0 0 0 94438931278896 94438931280512 94439508615168 140720610978519 140720610978539 "
    "140720610978539 140720610979819 0"
)


def test_parse_stat_ppid_with_parens_and_spaces_in_the_name():
    assert parse_stat_ppid(STAT) == 4200
    assert parse_stat(STAT) == ("S", 4200, 78107)  # state, ppid, start time in clock ticks
    assert parse_stat(STAT.replace(") S ", ") Z ")) [0] == "Z"


def test_parse_environ_rank():
    assert parse_environ_rank(b"PATH=/usr/bin\0RANK=3\0LOCAL_RANK=1\0") == 3
    assert parse_environ_rank(b"PATH=/usr/bin\0LOCAL_RANK=1\0") is None
    assert parse_environ_rank(b"RANK=x\0") is None
    # the one process of `memdiag run -- python x.py`: rank 0, whatever order environ lists it in
    assert parse_environ_rank(b"PATH=/usr/bin\0MEMDIAG_SINGLE_PROCESS=1\0") == 0
    assert parse_environ_rank(b"MEMDIAG_SINGLE_PROCESS=1\0RANK=2\0") == 2
    assert parse_environ_rank(b"MEMDIAG_SINGLE_PROCESS=0\0") is None


CHILD = """
import os, subprocess, sys, time
if os.environ.get("SPAWN_HELPER") == "1":
    env = dict(os.environ, SPAWN_HELPER="0")
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
block = bytearray(int(os.environ["RANK"]) * 30 * 2**20 + 2**20)
time.sleep(30)
"""


def test_find_ranks_and_sample_on_a_real_tree(tmp_path):
    """A launcher-like parent without RANK starts two ranks; rank 1 starts a helper child."""
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            f"child = {CHILD!r}\n"
            "procs = [subprocess.Popen([sys.executable, '-c', child], env=dict(os.environ, RANK=str(r), SPAWN_HELPER=str(r))) for r in (0, 1)]\n"
            "time.sleep(30)\n",
        ],
        env={k: v for k, v in os.environ.items() if k != "RANK"},
    )
    try:
        deadline = time.time() + 15
        ranks = {}
        while time.time() < deadline:
            ranks = find_ranks(launcher.pid)
            if set(ranks) == {0, 1} and ranks[1].children:
                break
            time.sleep(0.2)
        assert set(ranks) == {0, 1}
        assert ranks[0].children == [] and len(ranks[1].children) == 1
        time.sleep(1.0)  # let rank 1 touch its 30 MiB
        watcher = NodeWatcher(tmp_path, launcher.pid, interval_s=0.05, pss_interval_s=0.1, host="testnode")
        for _ in range(4):
            watcher._write_sample(watcher.sample_once())  # as the watcher's loop writes them
            time.sleep(0.06)
        watcher.writer.close()
    finally:
        launcher.kill()
        for child in find_ranks(launcher.pid).values():
            for pid in [child.pid, *child.children]:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
    node = read_run(tmp_path).nodes["testnode"]
    assert set(node.rank_rss) == {0, 1}
    assert node.rank_rss[1][-1] - node.rank_rss[0][-1] > 25 * 2**20  # rank 1 holds 30 MiB more
    assert node.columns["mem_total_bytes"][0] > 0
    assert not all(v != v for v in node.pss_total())  # at least one complete PSS sample
    # rank 0 has no children: the file leaves their figures out (1.7) and the reader reads 0, not "unread"
    written = [json.loads(line)["ranks"] for line in node.path.read_text().splitlines() if '"kind":"sample"' in line]
    assert written and all(not {"children_rss_bytes", "children", "children_pss_bytes"} & set(r["0"]) for r in written)
    assert all("children_rss_bytes" in r["1"] for r in written)
    assert list(node.rank_children_rss[0]) == [0.0] * len(written) and node.rank_children_rss[1][-1] > 0
    with_pss = ["pss_bytes" in r["0"] for r in written]
    assert any(with_pss)
    assert [v == 0.0 for v in node.rank_children_pss[0]] == with_pss  # 0 where PSS was read, NaN between


def test_the_watchers_rank_sampler_reads_ranks_from_outside_and_drops_the_gone(tmp_path):
    """sampler=watcher: each rank's /proc/<pid>/status through one open descriptor, batched per
    rank; a rank that has exited is dropped, never raised."""

    from memdiag.node import RankProcesses, RankSampler
    from memdiag.timeline import TimelineWriter

    gone = subprocess.Popen(["true"])
    gone.wait()
    writer = TimelineWriter(tmp_path / "node-n0.jsonl", {"host": "n0"})
    sampler = RankSampler(writer)  # never steady: every tick
    ranks = {0: RankProcesses(0, os.getpid(), []), 1: RankProcesses(1, gone.pid, [])}
    for _ in range(3):
        sampler.sample(ranks)
    sampler.close()
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "node-n0.jsonl").read_text().splitlines()]
    batches = [r for r in records if r["kind"] == "rank_samples"]
    assert {b["rank"] for b in batches} == {0}
    assert sum(len(b["t"]) for b in batches) == 3
    assert all(rss > 10 * 2**20 and hwm >= rss for b in batches for rss, hwm in zip(b["rss_bytes"], b["hwm_bytes"]))


def test_a_rank_that_named_itself_in_its_file_is_sampled_without_rank_in_its_environment(tmp_path):
    """A process recording itself (memdiag.record in a script started by hand, or a worker whose
    framework sets RANK after it started) has no RANK in /proc/<pid>/environ; its file's header
    names its rank, node and pid, and the watcher over its process tree samples it from there. A
    header naming a process outside the tree, or another node, is not taken."""

    script = (
        "import os, sys, time\n"
        "from memdiag.timeline import TimelineWriter, rank_path\n"
        "w = TimelineWriter(rank_path(sys.argv[1], 0), {'rank': 0, 'host': 'n0', 'pid': os.getpid()})\n"
        "w.close()\n"
        "block = bytearray(40 * 2**20)\n"
        "time.sleep(30)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MEMDIAG_SINGLE_PROCESS")}
    env["PYTHONPATH"] = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env)
    from memdiag.timeline import TimelineWriter, rank_path

    outsider = TimelineWriter(rank_path(tmp_path, 5), {"rank": 5, "host": "n0", "pid": os.getpid()})  # not in the tree
    outsider.close()
    elsewhere = TimelineWriter(rank_path(tmp_path, 6), {"rank": 6, "host": "n1", "pid": child.pid})  # another node's
    elsewhere.close()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "timeline" / "rank-0.jsonl").exists():
            time.sleep(0.1)
        time.sleep(0.5)
        assert find_ranks(child.pid) == {}  # nothing in its environment says it is a rank
        watcher = NodeWatcher(tmp_path, child.pid, interval_s=0.05, host="n0", rank_interval_s=0.01)
        for _ in range(5):
            sample = watcher.sample_once()
            watcher.writer.write(sample)
            watcher.rank_sampler.sample(watcher._ranks)
            time.sleep(0.06)
        watcher.rank_sampler.close()
        watcher.writer.close()
    finally:
        child.kill()
        child.wait()
    assert set(sample["ranks"]) == {"0"} and sample["ranks"]["0"]["pid"] == child.pid
    records = [json.loads(line) for line in (tmp_path / "timeline" / "node-n0.jsonl").read_text().splitlines()]
    rss = [v for r in records if r["kind"] == "rank_samples" and r["rank"] == 0 for v in r["rss_bytes"]]
    assert len(rss) >= 5 and min(rss) > 40 * 2**20
