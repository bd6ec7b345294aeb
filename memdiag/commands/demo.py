"""``memdiag demo 5290``: the seed's phenomenon in one command.

Runs the case with the benchmark's loading (``load=reference``: the whole fp32 model on every
rank) and with lean loading (``load=zero_init``) at 1, 2 and 4 ranks per node, at a scale where
the model's copy dominates the load phase (``base``, ~110M parameters: a 0.44 GB fp32 copy), then
writes one page: the node's load-phase host RAM against ranks per node for both loadings, and
the check's finding for each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import subprocess
import sys
from pathlib import Path

from memdiag.errors import UsageError

LOADS = ("reference", "zero_init")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="show a known memory problem on this machine (5290: host RAM grows with ranks)")
    parser.add_argument("which", choices=["5290"], help="5290: DeepSpeed issue 5290, the seed's host-RAM problem")
    parser.add_argument("--ranks", default="1,2,4", help="ranks per node to run, comma separated (default 1,2,4)")
    parser.add_argument("--scale", default="base", help="model.scale (default base: the fp32 copy dominates loading)")
    parser.add_argument("--reports-dir", type=Path, default=Path("reports"), help="where the runs and the page go")


def parse_ranks(text: str) -> list[int]:
    try:
        ranks = sorted({int(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise UsageError(f"--ranks {text!r}: write ranks per node separated by commas, e.g. 1,2,4") from None
    if len(ranks) < 2 or ranks[0] < 1:
        raise UsageError(f"--ranks {text!r}: give at least two positive rank counts (the slope needs two points)")
    return ranks


def main(args: argparse.Namespace) -> int:
    from memdiag import preflight

    ranks = parse_ranks(args.ranks)
    preflight.writable_dir(args.reports_dir, "--reports-dir")
    out = args.reports_dir / f"demo-5290-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    runs: dict[tuple[str, int], Path] = {}
    for load in LOADS:
        for count in ranks:
            print(f"memdiag demo: load={load}, {count} rank(s) per node ...", flush=True)
            before = set((out / "baichuan2_13b").glob("*"))
            result = subprocess.run(
                [sys.executable, "-m", "memdiag", "run", f"reports_dir={out}", f"model.scale={args.scale}",
                 f"nproc_per_node={count}", f"load={load}", "steps=2", "seq_len=64", "force=true"],
                capture_output=True, text=True,
            )
            made = set((out / "baichuan2_13b").glob("*")) - before
            if result.returncode not in (0, 1) or len(made) != 1:
                tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
                raise UsageError(f"the load={load} run at {count} rank(s) failed: {' | '.join(tail)}")
            runs[load, count] = made.pop()
    page = write_page(out, runs, ranks, args.scale)
    print(f"memdiag demo: {page}")
    return 0


def write_page(out: Path, runs: dict[tuple[str, int], Path], ranks: list[int], scale: str) -> Path:
    import plotly.graph_objects as go
    import plotly.io as pio

    from memdiag.checks.scaling_5290 import check_many
    from memdiag.files import write_atomic
    from memdiag.report.html import RENDER_CHECK, STYLE
    from memdiag.stacks import read_tables, stack_rows
    from memdiag.timeline import read_run
    from memdiag.units import format_bytes

    figure = go.Figure()
    sections = []
    for load in LOADS:
        loaded = [read_run(runs[load, count]) for count in ranks]
        (finding,) = [f for f in check_many(loaded) if f.id == "scaling_5290_fit"] or [None]
        if finding is None:
            continue
        points = sorted((p["local_ranks"], p["node_load_bytes"]) for p in finding.evidence["points"])
        figure.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] / 2**30 for p in points], mode="lines+markers",
                                    name=f"load={load}"))
        print(f"memdiag demo: [{finding.severity}] {finding.message}")
        # which line held the memory at each rank's load peak (memray): the whole model's build, or not
        stacks = []
        for count in ranks:
            for table in sorted((t for t in read_tables(runs[load, count]) if t.get("phase") == "load"), key=lambda t: t["rank"]):
                for top in stack_rows(table, top=1):
                    where = top["your line"] if top["your line"] != "-" else top["allocated in"]
                    stacks.append(f"<tr><td>{count}</td><td>{table['rank']}</td><td>{top['bytes']}</td>"
                                  f"<td>{html.escape(where)}</td></tr>")
        stack_table = ("<table><tr><th>ranks per node</th><th>rank</th><th>top stack at the load peak</th><th>its line</th></tr>"
                       + "".join(stacks) + "</table>") if stacks else ""
        rows = "".join(f"<tr><td>{r}</td><td>{format_bytes(b)}</td></tr>" for r, b in points)
        fix = f"<pre class='fix'>{html.escape(finding.fix)}</pre>" if finding.fix else ""
        sections.append(
            f"<h2>load={load}</h2><p class='finding {finding.severity}'><b>[{finding.severity}] {finding.id}</b>: "
            f"{html.escape(finding.message)}</p>{fix}<table><tr><th>ranks per node</th><th>node load-phase host RAM</th></tr>{rows}</table>"
            + stack_table
            + "<p class='note'>runs: " + ", ".join(html.escape(str(runs[load, c])) for c in ranks) + "</p>"
        )
    figure.update_layout(title=f"Node host RAM while loading, against ranks per node (model.scale={scale})",
                         xaxis={"title": "ranks per node", "tickvals": ranks}, yaxis_title="GiB", height=460)
    body = (
        "<h1>memdiag demo: DeepSpeed issue 5290</h1>"
        "<p>With the benchmark's loading every rank builds the whole model in fp32 before DeepSpeed partitions it, so a "
        "node's host RAM grows by a whole copy per rank (the Baichuan2-13B case: 16 ranks x 52 GiB could not fit 500 GiB). "
        "Built partitioned under deepspeed.zero.Init and read shard by shard, it does not.</p>"
        "<section class='figure' data-figure='demo-5290'>"
        + pio.to_html(figure, full_html=False, include_plotlyjs=True, div_id="fig-demo-5290", config={"displaylogo": False})
        + "</section>" + "".join(sections) + RENDER_CHECK
    )
    page = out / "demo-5290.html"
    write_atomic(page, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>memdiag demo 5290</title><style>{STYLE}</style></head><body>{body}</body></html>")
    return page
