"""Probes: parsers on literal kernel text, readers against this machine's real /proc."""

from pathlib import Path

import pytest

from memdiag.probes import cgroup, host

STATUS = """Name:\tpython3
Umask:\t0022
State:\tR (running)
Tgid:\t4242
VmPeak:\t 2300000 kB
VmSize:\t 2200000 kB
VmHWM:\t  912340 kB
VmRSS:\t  523000 kB
RssAnon:\t  400000 kB
Threads:\t3
"""

MEMINFO = """MemTotal:       24684092 kB
MemFree:        23050000 kB
MemAvailable:   23500000 kB
Buffers:            2048 kB
"""

SMAPS_ROLLUP = """55d0c0000000-7ffd0000000 ---p 00000000 00:00 0                          [rollup]
Rss:              523000 kB
Pss:              401234 kB
Pss_Anon:         390000 kB
Pss_File:          11234 kB
SwapPss:               7 kB
"""


def test_parse_proc_status():
    mem = host.parse_proc_status(STATUS)
    assert mem.rss_bytes == 523000 * 1024
    assert mem.hwm_bytes == 912340 * 1024


def test_parse_proc_status_kernel_thread_has_no_rss():
    assert host.parse_proc_status("Name:\tkthreadd\nState:\tS\n").rss_bytes == 0


def test_parse_meminfo():
    mem = host.parse_meminfo(MEMINFO)
    assert mem.total_bytes == 24684092 * 1024
    assert mem.available_bytes == 23500000 * 1024
    with pytest.raises(ValueError):
        host.parse_meminfo("MemFree: 1 kB\n")


def test_parse_smaps_rollup_takes_pss_not_swappss():
    assert host.parse_smaps_rollup_pss(SMAPS_ROLLUP) == 401234 * 1024


def test_self_status_reader_sees_an_allocation():
    import mmap

    reader = host.SelfStatusReader()
    before = reader.read().rss_bytes
    # fresh anonymous pages, written one by one: a heap block could reuse pages already resident
    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    after = reader.read().rss_bytes
    block.close()
    reader.close()
    assert after - before >= 60 * 2**20


def test_reset_peak_rss_lowers_vmhwm_after_a_freed_spike():
    try:
        host.reset_peak_rss()
    except OSError:
        pytest.skip("this kernel refuses /proc/self/clear_refs")
    spike = bytearray(200 * 2**20)
    del spike
    high = host.read_proc_status().hwm_bytes
    host.reset_peak_rss()
    low = host.read_proc_status().hwm_bytes
    assert high - low >= 150 * 2**20


def test_read_meminfo_and_pss_of_this_process():
    assert host.read_meminfo().total_bytes > 2**28
    assert 0 < host.read_pss_bytes() <= host.read_proc_status().rss_bytes * 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12:pids:/\n4:memory:/process_api/abc\n0::/\n", (1, "/process_api/abc")),
        ("0::/user.slice/session-1.scope\n", (2, "/user.slice/session-1.scope")),
        ("4:cpu,memory:/job\n", (1, "/job")),
        ("5:cpu:/\n", None),
    ],
)
def test_parse_proc_cgroup(text, expected):
    assert cgroup.parse_proc_cgroup(text) == expected


def test_parse_limit():
    assert cgroup.parse_limit("max\n") is None
    assert cgroup.parse_limit("9223372036854771712\n") is None
    assert cgroup.parse_limit("536870912000\n") == 500 * 2**30


def test_cgroup_v2_files_in_a_tree(tmp_path: Path):
    # a real directory laid out as cgroup v2 mounts it; /proc/self/cgroup decides the version,
    # so read the files directly
    base = tmp_path / "job"
    base.mkdir()
    (base / "memory.current").write_text("1048576\n")
    (base / "memory.peak").write_text("2097152\n")
    (base / "memory.max").write_text("max\n")
    files = cgroup.CgroupFiles(2, base / "memory.current", base / "memory.peak", base / "memory.max")
    mem = cgroup.read(files)
    assert (mem.usage_bytes, mem.peak_bytes, mem.limit_bytes) == (2**20, 2**21, None)


def test_cgroup_of_this_process_when_present():
    files = cgroup.locate()
    if files is None:
        pytest.skip("no memory cgroup visible here")
    mem = cgroup.read(files)
    assert mem.usage_bytes and mem.usage_bytes > 0
