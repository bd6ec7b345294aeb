"""The ``memdiag`` command: parse arguments, call a subcommand, turn errors into one line."""

from __future__ import annotations

import argparse
import logging
import sys

from memdiag import __version__
from memdiag.commands import check, demo, plan, report, run, top
from memdiag.errors import MemdiagError

COMMANDS = {"run": run, "plan": plan, "report": report, "check": check, "demo": demo, "top": top}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memdiag", description="memory diagnostics for DeepSpeed ZeRO-3 training"
    )
    parser.add_argument("--version", action="version", version=f"memdiag {__version__}")
    subparsers = parser.add_subparsers(dest="command_name", required=True)
    for module in COMMANDS.values():
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command: list[str] = []
    dashes = "--" in argv
    if dashes:  # `memdiag run [key=value ...] -- CMD ARGS...`: CMD is not ours to parse
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
        if not command:
            print("memdiag: error: nothing after `--`: memdiag run -- torchrun --nproc_per_node 2 train.py "
                  "(or memdiag plan -- CMD to plan it)", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    if command:
        if args.command_name not in ("run", "plan"):
            print("memdiag: error: `-- CMD` follows `memdiag run` (run it) or `memdiag plan` (plan it) only", file=sys.stderr)
            return 2
        args.command = command
    logging.basicConfig(level=logging.WARNING, format="memdiag: %(message)s")
    try:
        return COMMANDS[args.command_name].main(args)
    except MemdiagError as exc:
        print(f"memdiag: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # the reader went away (`memdiag plan | head`): end quietly, as a shell tool does; stdout
        # is pointed at /dev/null so that flushing it at exit raises nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
