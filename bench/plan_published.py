"""memdiag plan against published runs, beside DeepSpeed's own estimator.

Every case in ``bench/published/cases.jsonl`` is a run someone published (a GitHub issue, the
seed's benchmark table) with its source, the sentence holding the figure, and what is ambiguous
in it. For each, memdiag's prediction and DeepSpeed's ``estimate_zero3_model_states_mem_needs``
(with its default 1.5 buffer factor on host RAM, as users call it) are computed from the same
exact parameter counts; figures are scored by relative error (zero inside a published range),
outcomes (OOM or fits) by whether the verdict is right.

    python bench/plan_published.py [--cases FILE] [--json]

Every case with a ``ds_config_file`` is read through the same reader as ``memdiag plan
--ds-config`` (its "auto" values filled as the HF Trainer fills them). Accuracy cards per category
(device, host without and with offload) and for ZeRO-1/2 runs: median and 95th-percentile |error|,
the share under-estimated by more than 10%, verdicts right; DeepSpeed's estimator beside.
Targets (issues 11, 21): median |error| <= 10% in every card, verdicts right wherever DeepSpeed's
are; every miss is listed with its source and what is ambiguous in it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memdiag.errors import UsageError  # noqa: E402
from memdiag.plan.published import CARDS, CATEGORIES, Scored, fit_reserve_layers, leave_one_out, load_cases, predict, summary  # noqa: E402
from memdiag.plan.terms import Coefficients  # noqa: E402

PUBLISHED = REPO / "bench" / "published"
TARGET = 0.10
LABELS = {"device": "device", "host": "host, no offload", "host_offload": "host, offload", "zero12": "ZeRO-1/2 (any)"}


def _gib(value: float) -> str:
    return f"{value / 2**30:8.1f}"


def row_text(s: Scored) -> str:
    c, p = s.case, s.prediction
    if c.is_figure:
        published = f"{_gib(c.measured_bytes)}"
        ours = f"{_gib(p.memdiag_bytes)} {s.error:+7.1%}"
        theirs = f"{_gib(p.deepspeed_bytes)} {s.deepspeed_error:+7.1%}"
    else:
        limit = c.device_memory_bytes if c.outcome_limit == "device" else c.host_ram_bytes
        published = f"{c.outcome_result.upper():>4} @{limit / 2**30:.0f}"
        ours = f"{_gib(p.memdiag_bytes)} {'right' if s.verdict_right else 'WRONG':>7}"
        theirs = f"{_gib(p.deepspeed_bytes)} {'right' if s.deepspeed_verdict_right else 'WRONG':>7}"
    return f"{c.id[:46]:46} {c.nodes}x{c.devices_per_node:<3} {published:>10}  {ours}  {theirs}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, default=PUBLISHED / "cases.jsonl")
    parser.add_argument("--models", type=Path, default=PUBLISHED / "models")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        cases = load_cases(args.cases)
        scored = [Scored(c, predict(c, args.models)) for c in cases]
    except UsageError as exc:
        print(f"plan_published: {exc}", file=sys.stderr)
        return 2
    totals = summary(scored)
    fitted = fit_reserve_layers(scored)
    held_out = leave_one_out(scored, args.models)
    if held_out:
        import statistics

        # the device figures inform the one fitted device coefficient: judge them held out
        totals["device"]["memdiag_median_abs_error_in_sample"] = totals["device"]["memdiag_median_abs_error"]
        totals["device"]["memdiag_median_abs_error"] = statistics.median(abs(e) for e in held_out.values())
    if args.json:
        print(json.dumps({"cases": [{"id": s.case.id, "source": s.case.source, "error": s.error,
                                      "deepspeed_error": s.deepspeed_error, "verdict_right": s.verdict_right,
                                      "deepspeed_verdict_right": s.deepspeed_verdict_right,
                                      "memdiag_bytes": int(s.prediction.memdiag_bytes),
                                      "deepspeed_bytes": int(s.prediction.deepspeed_bytes)} for s in scored],
                          "summary": totals}, indent=2))
        return 0
    print(f"{len(cases)} published cases ({args.cases.relative_to(REPO) if args.cases.is_relative_to(REPO) else args.cases}); GiB")
    for category in CATEGORIES:
        print(f"\n{LABELS[category]}")  # ZeRO-1/2 runs are listed in their category and carded apart
        print(f"{'case':46} {'layout':5} {'published':>10}  {'memdiag':>8} {'':>7}  {'DeepSpeed':>8}")
        for s in scored:
            if s.case.category == category:
                print(row_text(s))
    misses = [s for s in scored if (s.error is not None and abs(held_out.get(s.case.id, s.error)) > TARGET) or s.verdict_right is False]
    if misses:
        print(f"\nmisses (|error| > {TARGET:.0%} or a wrong verdict), each with its source and what is ambiguous in it:")
        for s in misses:
            print(f"  {s.case.id} ({s.case.source}): {s.case.ambiguity}")
    if held_out:
        print(f"\nallocator reserve under ZeRO-3 (the one device coefficient fitted on these figures): "
              f"{fitted:.1f} gathered layers (memdiag ships {Coefficients().allocator_reserve_layers:g}); "
              "each device figure predicted with it fitted on the others:")
        for case_id, error in held_out.items():
            print(f"  {case_id:46} {error:+7.1%}")
    print("\naccuracy cards (figures: median and 95th-percentile |error|, the share under-estimated by more than 10% - "
          "the errors that end in an OOM; device figures held out; verdicts right of outcomes)")
    print(f"  {'':18} {'figures':>7} {'memdiag med/p95/under':>24} {'DeepSpeed med/p95/under':>26} {'verdicts memdiag':>17} {'DeepSpeed':>10}")
    met = True
    for card in CARDS:
        t = totals[card]
        ours, theirs = t["memdiag_median_abs_error"], t["deepspeed_median_abs_error"]

        def three(who: str, t: dict = t) -> str:
            if t[f"{who}_median_abs_error"] is None:
                return "-"
            return f"{t[f'{who}_median_abs_error']:.0%}/{t[f'{who}_p95_abs_error']:.0%}/{t[f'{who}_under_10pct_share']:.0%}"

        ok = (ours is None or (ours <= TARGET and ours <= theirs)) and t["memdiag_verdicts_right"] >= t["deepspeed_verdicts_right"]
        met &= ok
        print(f"  {LABELS[card]:18} {t['figures']:7} {three('memdiag'):>24} {three('deepspeed'):>26} "
              f"{t['memdiag_verdicts_right']:>9}/{t['verdicts']:<7} {t['deepspeed_verdicts_right']:>4}/{t['verdicts']:<5} "
              f"{'target met' if ok else 'TARGET MISSED'}")
    print(f"\ntargets: median |error| <= {TARGET:.0%} and not above DeepSpeed's, verdicts right wherever DeepSpeed's are: "
          + ("met in every category" if met else "missed (see above)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
