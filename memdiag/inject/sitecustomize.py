"""Started by Python in every process of a ``memdiag run -- CMD`` job (memdiag puts this
directory first on PYTHONPATH). It instruments the training processes only: those a launcher
gave a ``RANK``, or the single process of a plain ``python script.py`` job, and never a process
an instrumented rank started (it inherits the rank's ``RANK``; ``MEMDIAG_RANK_PID`` says whose
it is). Then it hands over to the user's own sitecustomize, if one exists further down the path."""

import os
import sys


def _memdiag_start() -> None:
    run_dir = os.environ.get("MEMDIAG_RUN_DIR")
    if not run_dir:
        return
    if os.environ.get("MEMDIAG_RANK_PID"):
        return  # started by an instrumented rank (a spawned worker, an op build, a re-exec): not a rank
    single = os.environ.pop("MEMDIAG_SINGLE_PROCESS", None) == "1"
    if "RANK" not in os.environ and not single:
        return  # a launcher (torchrun's agent, deepspeed's runner) or a helper process
    try:
        from memdiag import instrument

        instrument.start(run_dir)  # the recorder's settings: MEMDIAG_RECORDER, from the memdiag that launched the job
    except Exception as exc:  # never stop the user's job
        print(f"memdiag: instrumentation not started: {exc!r}", file=sys.stderr)


def _chain_user_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_memdiag_start()
_chain_user_sitecustomize()
