"""What a rank raised, read from literal tracebacks: the exception and the user's own line."""

import sys

from memdiag.failure import describe, exception_record, is_users, parse_traceback

TORCHRUN_RANK_LOG = """\
[rank1]: Traceback (most recent call last):
step 1/10
Traceback (most recent call last):
  File "/home/me/proj/train.py", line 88, in <module>
    main()
  File "/home/me/proj/train.py", line 61, in main
    loss = engine(batch)
  File "/opt/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1775, in _call_impl
    return forward_call(*args, **kwargs)
  File "/opt/venv/lib/python3.11/site-packages/deepspeed/runtime/engine.py", line 2105, in forward
    loss = self.module(*inputs, **kwargs)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 12.94 GiB (GPU 1; 79.35 GiB total capacity)
"""


def test_the_last_traceback_names_the_exception_and_the_users_line():
    found = parse_traceback(TORCHRUN_RANK_LOG)
    assert found == {"type": "OutOfMemoryError", "message": "CUDA out of memory. Tried to allocate 12.94 GiB (GPU 1; 79.35 GiB total capacity)",
                     "file": "/home/me/proj/train.py", "line": 61, "function": "main"}
    assert describe({"rank": 1, **found}).startswith("rank 1 raised OutOfMemoryError: CUDA out of memory.")
    assert describe({"rank": 1, **found}).endswith("at /home/me/proj/train.py:61 (in main)")
    assert parse_traceback("step 1\nstep 2\n") is None


def test_a_bare_exception_and_the_frames_that_are_not_the_users():
    assert parse_traceback('Traceback (most recent call last):\n  File "x.py", line 3, in <module>\nKeyboardInterrupt\n')["type"] == "KeyboardInterrupt"
    assert not is_users(sys.modules["json"].__file__) and not is_users("<string>") and is_users("/home/me/train.py")


def test_an_exception_record_taken_in_process():
    def user_code():
        raise RuntimeError("boom")

    try:
        user_code()
    except RuntimeError:
        record = exception_record(*sys.exc_info())
    assert record["type"] == "RuntimeError" and record["message"] == "boom"
    assert record["function"] == "user_code" and record["file"] == __file__ and "Traceback" in record["traceback"]
