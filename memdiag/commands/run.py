"""``memdiag run case=NAME [key=value ...]`` and ``memdiag run [key=value ...] -- CMD``: parse
the settings, then ``memdiag.runs`` runs it."""

from __future__ import annotations

import argparse

from memdiag import lifetime
from memdiag.settings import CMD, RUN, help_text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a case (or any command after --) with memory instrumentation and write a report",
        description="memdiag run case=baichuan2_13b [key=value ...]   or   memdiag run [key=value ...] -- CMD ARGS...\n\n"
        "A case's settings (also case=, model.scale=, hardware=, data=, model.FIELD=, data.FIELD=):\n" + help_text(RUN)
        + "\n\nWith -- CMD:\n" + help_text(CMD),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="see above")
    parser.set_defaults(command=[])


def main(args: argparse.Namespace) -> int:
    from memdiag.versions import check_supported

    if args.command:
        from memdiag.settings import resolve

        settings = resolve(CMD, args.overrides)  # every key checked before torch is imported
        check_supported()
        with lifetime.handling_stops():  # from here to the report, a stop signal stops the job and is recorded
            from memdiag import runs

            return runs.run_command(settings, args.command)
    from memdiag.config import compose
    from memdiag.multinode import started_part
    from memdiag.settings import parse

    # a node part the coordinator started runs the run's recorded config, not a second composition
    config = started_part(parse(args.overrides, RUN)[0]) or compose(args.overrides)
    check_supported()
    with lifetime.handling_stops():
        from memdiag import runs

        return runs.run_case(config)
