"""``lifetime.Job`` on a launcher shaped like torchrun (children in sessions of their own, one
that ignores SIGTERM), driven through a real process so its signals are real."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from memdiag import procs

from .conftest import REPO

LAUNCHER = """
import subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(600)"]
kids = [subprocess.Popen(sleep, start_new_session=True), subprocess.Popen(stubborn, start_new_session=True, stdout=subprocess.PIPE)]
kids[1].stdout.readline()  # it ignores SIGTERM from here on: on a loaded machine its start can lag the launcher's exit
print(" ".join(str(k.pid) for k in kids), flush=True)
if sys.argv[1] == "leave":
    sys.exit(0)  # a launcher that ends and leaves its children behind
time.sleep(600)
"""

DRIVER = """
import json, subprocess, sys
from memdiag import lifetime
lifetime.LEFTOVER_GRACE_S = 1.0
with lifetime.Job(stop_grace_s=float(sys.argv[3])) as job:
    launcher = job.start("launcher", [sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
    kids = [int(p) for p in launcher.stdout.readline().split()]
    print(json.dumps([launcher.pid, *kids]), flush=True)
    ended = job.wait()
print(json.dumps({"status": ended.status, "signal": ended.signal, "code": ended.code, "killed": ended.killed}), flush=True)
sys.exit(ended.code)
"""


def drive(mode: str, grace_s: float = 2.0) -> tuple[subprocess.Popen, list[int]]:
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, LAUNCHER, mode, str(grace_s)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pids = json.loads(driver.stdout.readline())
    return driver, pids


def finish(driver: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = driver.communicate(timeout=120)
    return driver.returncode, json.loads(out.strip().splitlines()[-1]), err


def test_sighup_stops_every_session_and_kills_what_ignores_sigterm_after_the_grace():
    driver, pids = drive("stay")
    launcher, polite, stubborn = pids
    time.sleep(0.5)
    driver.send_signal(signal.SIGHUP)
    code, ended, err = finish(driver)
    assert code == 128 + signal.SIGHUP
    assert ended == {"status": "interrupted", "signal": "SIGHUP", "code": 129, "killed": [stubborn]}
    assert "SIGHUP: stopping the job" in err
    assert not any(procs.alive(p) for p in pids)


def test_a_second_signal_kills_at_once():
    driver, pids = drive("stay", grace_s=3600)  # only a skipped grace ends it within finish()'s safety net
    time.sleep(0.5)
    driver.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    driver.send_signal(signal.SIGTERM)
    code, ended, err = finish(driver)
    assert code == 143 and ended["status"] == "interrupted" and ended["killed"]
    assert "again: killing the job now" in err
    assert not any(procs.alive(p) for p in pids)


def test_what_a_finished_launcher_leaves_behind_is_stopped():
    driver, pids = drive("leave")
    code, ended, _ = finish(driver)
    assert code == 0 and ended["status"] == "completed"
    assert ended["killed"] == [pids[2]]  # the one that ignored SIGTERM
    assert not any(procs.alive(p) for p in pids)
