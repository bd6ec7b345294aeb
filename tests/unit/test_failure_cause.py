"""Why a run failed, cause first: torchrun's root-cause record read from literal launcher logs."""

from pathlib import Path

from memdiag.failure import failure_excerpt, root_cause

SIGKILLED = (Path(__file__).resolve().parents[1] / "data" / "torchrun_sigkill.txt").read_text()
RAISED = SIGKILLED.replace("exitcode  : -9 (pid: 12345)", "exitcode  : 1 (pid: 12345)").replace(
    "traceback : Signal 9 (SIGKILL) received by PID 12345",
    "traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html")
FOLLOW_ON = "Traceback (most recent call last):\n  ...\nRuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer\n"


def test_the_root_cause_record_names_the_rank_and_the_signal():
    assert root_cause(SIGKILLED) == {"rank": 1, "exitcode": -9, "signal": "SIGKILL", "host": "localhost",
                                     "how": "killed by SIGKILL (signal 9)"}
    assert root_cause(RAISED)["how"] == "exited with code 1"
    assert root_cause("no record here") is None


def _run_dir(tmp_path, launcher: str, rank_logs: dict[int, str]) -> Path:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "launcher.log").write_text(launcher)
    for rank, text in rank_logs.items():
        (tmp_path / "logs" / f"rank-{rank}.log").write_text(text)
    return tmp_path


def test_a_killed_rank_comes_first_not_the_survivors_follow_on_error(tmp_path):
    run_dir = _run_dir(tmp_path, SIGKILLED, {0: FOLLOW_ON, 1: "step 3/10\n"})
    excerpt = failure_excerpt(run_dir)
    assert excerpt.startswith("rank 1 failed first: killed by SIGKILL (signal 9)")
    assert "dmesg" in excerpt and "Connection closed" not in excerpt


def test_a_rank_that_raised_shows_its_own_traceback(tmp_path):
    own = "Traceback (most recent call last):\n  File \"train.py\", line 9\nValueError: bad batch\n"
    run_dir = _run_dir(tmp_path, RAISED, {0: FOLLOW_ON, 1: own})
    excerpt = failure_excerpt(run_dir)
    assert excerpt.startswith("rank 1 failed first: exited with code 1") and "ValueError: bad batch" in excerpt
