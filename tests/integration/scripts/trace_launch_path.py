"""Runs ``memdiag run ARGS`` in this process and prints, as JSON, the order in which the launch
modules (runs, launch, multinode) were entered, collapsing consecutive calls in one module."""

import json
import sys

MODULES = ("memdiag.runs", "memdiag.launch", "memdiag.multinode")
visits: list[str] = []


def profile(frame, event, arg):
    if event != "call" or frame.f_code.co_name == "<module>":
        return  # a module's body running at import is not a step of the run
    module = frame.f_globals.get("__name__")
    if module in MODULES and (not visits or visits[-1] != module):
        # only calls made from another module count as entering one
        caller = frame.f_back.f_globals.get("__name__") if frame.f_back else None
        if caller != module:
            visits.append(module)


sys.setprofile(profile)
from memdiag.cli import main  # noqa: E402

code = main(["run", *sys.argv[1:]])
sys.setprofile(None)
print("VISITS " + json.dumps(visits))
sys.exit(code)
