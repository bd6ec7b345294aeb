"""``memdiag plan --host-ram 500G``: which layouts fit, term by term, and what would make the
others fit."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from memdiag.config import compose, load_ds_config, split_layout
from memdiag.errors import UsageError
from memdiag.plan.calibrate import load_coefficients
from memdiag.plan.inputs import for_run
from memdiag.registry import get_case
from memdiag.settings import PLAN, help_text
from memdiag.tables import render
from memdiag.plan.search import deepspeed_estimate, device_counts, evaluate, fixes_for, recommend, search
from memdiag.plan.terms import Coefficients, consolidation_bytes, device_terms
from memdiag.units import ACCEPTED_FORMS, format_bytes, parse_size


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="which nodes x devices layouts fit device memory and host RAM",
        description="Settings (key=value), the same names and defaults as `memdiag run`; also case=, "
        "model.scale=, hardware=, model.FIELD=:\n" + help_text(PLAN)
        + "\n\nmemdiag plan [key=value ...] -- LAUNCH COMMAND: plan the run a command would start (torchrun, deepspeed, "
        "accelerate launch or python; a Trainer script's --deepspeed, --model_name_or_path, batch, precision, checkpointing "
        "and sequence-length arguments); it runs nothing. key=value and flags given here win over the command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="see above")
    parser.set_defaults(command=[])
    parser.add_argument("--ds-config", type=Path, metavar="FILE", help="your DeepSpeed config, read as it is (as ds_config=FILE)")
    parser.add_argument("--host-ram", help="host RAM per node, e.g. 500G (default: the hardware profile's)")
    parser.add_argument("--device-mem", help="memory per device, e.g. 64G (default: the profile's)")
    parser.add_argument("--devices-per-node", type=int, help="devices (ranks) per node (default: the profile's)")
    parser.add_argument("--nodes", default="1-4", help="node counts to search: N or A-B (default 1-4)")
    parser.add_argument("--case", default="baichuan2_13b")
    parser.add_argument("--profile", help="hardware profile: bi_v150 (the case's), a100_40g, a100_80g, h100, h800, h200, gpu "
                        "(any CUDA GPU: what --device-mem/--devices-per-node plan on when no profile is named)")
    parser.add_argument("--model-config", type=Path, help="an HF config.json instead of the case's model")
    parser.add_argument("--layout", help="evaluate one layout only, NODESxDEVICES (e.g. 2x8)")
    parser.add_argument("--calibrate", type=Path, nargs="+", metavar="RUN_DIR", help="fit the empirical coefficients from recorded runs")
    parser.add_argument("--coefficients", type=Path, help="coefficients written by --calibrate")
    parser.add_argument("--coefficients-out", type=Path, help="where --calibrate writes the fitted coefficients")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--emit", type=Path, metavar="DIR", help="write hostfile, ds_config.json and launch scripts for the recommended (or --layout) layout")
    parser.add_argument("--run", action="store_true", help="launch the recommended (or --layout) layout with `memdiag run`, memdiag on every node")
    parser.add_argument("--hostfile", type=Path, help="with --run: the nodes, a DeepSpeed hostfile ('NAME slots=N' lines)")
    parser.add_argument("--nodes-here", action="store_true", help="with --run: simulate the nodes on this machine")
    parser.add_argument("--run-args", default="", metavar="'K=V ...'", help="with --run: more `memdiag run` overrides, e.g. 'steps=20 launcher=deepspeed'")


def parse_range(text: str, name: str) -> list[int]:
    try:
        if "-" in text:
            low, high = (int(x) for x in text.split("-", 1))
        else:
            low = high = int(text)
    except ValueError:
        raise UsageError(f"{name}={text!r}: write N or A-B, e.g. 1-4") from None
    if low < 1 or high < low:
        raise UsageError(f"{name}={text!r}: the range must be positive and ascending")
    return list(range(low, high + 1))


def parse_layout(text: str, max_per_node: int) -> tuple[int, int]:
    layout = split_layout(text)
    if layout is None:
        raise UsageError(f"--layout {text!r}: write NODESxDEVICES with positive numbers, e.g. 2x8")
    nodes, per_node = layout
    if per_node > max_per_node:
        raise UsageError(
            f"--layout {text!r}: {per_node} devices per node, but the profile has {max_per_node} "
            "(set --devices-per-node to change it)"
        )
    return nodes, per_node


def plan_config(args: argparse.Namespace):
    """The run being planned, composed exactly as ``memdiag run`` composes it (its hardware
    profile the case's unless --profile or hardware= says otherwise: planning is for the
    target cluster, not this machine)."""
    given_case = any(t.startswith("case=") for t in args.overrides)
    profile = args.profile
    if profile is None and not any(t.startswith(("hardware=", "hardware.name=")) for t in args.overrides) and (
            args.device_mem or args.devices_per_node or args.command):
        profile = "gpu"  # the flags or the command say what the devices are: the case's accelerator would be a guess
    tokens = [*([] if given_case else [f"case={args.case}"]), *([f"hardware={profile}"] if profile else []), *args.overrides]
    if args.host_ram:
        tokens.append(f"host_ram={args.host_ram}")
    return compose(tokens, command=PLAN, detect_accelerator=False)


def read_command(args: argparse.Namespace) -> None:
    """``plan -- CMD``: what the launch command says becomes settings (the user's own keys and
    flags win), its layout is planned first, then the search; what it could not read is named."""
    from memdiag import launchcmd
    from memdiag.settings import parse

    launch = launchcmd.read(args.command)
    given = set(parse(args.overrides, PLAN)[0]) | {k for k in ("layout",) if getattr(args, k)}
    tokens = []
    for token in launch.tokens:
        key = token.split("=", 1)[0]
        if key == "layout":
            args.command_layout = token.split("=", 1)[1]
        elif key == "ds_config" and args.ds_config:
            continue
        elif parse([token], PLAN)[0].keys() - given:
            tokens.append(token)
    args.overrides = tokens + list(args.overrides)
    if launch.model_dir and not args.model_config:
        args.model_config = launch.model_dir
    args.launch = launch


def main(args: argparse.Namespace) -> int:
    if args.command:
        read_command(args)
    if args.ds_config:
        args.overrides = [*args.overrides, f"ds_config={args.ds_config}"]
    config = plan_config(args)
    hardware = config.hardware
    if args.devices_per_node:
        if args.devices_per_node < 1:
            raise UsageError("--devices-per-node must be positive")
        hardware = replace(hardware, cards_per_node=args.devices_per_node, devices_per_card=1) if hardware.devices_per_card == 1 else replace(
            hardware, cards_per_node=max(1, args.devices_per_node // hardware.devices_per_card)
        )
    host_limit = config.host_ram_bytes or hardware.host_ram_bytes
    device_mem = parse_size(args.device_mem, name="--device-mem") if args.device_mem else hardware.device_memory_bytes
    missing = [flag for flag, value in (("--host-ram", host_limit), ("--device-mem", device_mem)) if not value]
    if missing:
        raise UsageError(f"give {' and '.join(missing)} ({ACCEPTED_FORMS}): profile {hardware.name} has no figure for it")
    arch, settings = for_run(config, args.model_config)
    case = get_case(config.case)
    coefficients = load_coefficients(args.coefficients) if args.coefficients else Coefficients()
    if args.calibrate:
        from memdiag.plan.calibrate import calibrate_main

        return calibrate_main(args.calibrate, coefficients, args.coefficients_out)

    command_layout = None
    if getattr(args, "command_layout", None) and not args.layout:
        nodes, per_node = split_layout(args.command_layout)
        if hardware.devices_per_card == 1 and not args.devices_per_node:
            hardware = replace(hardware, cards_per_node=per_node)  # the command knows its machines
        command_layout = evaluate(arch, settings, hardware, nodes, per_node, coefficients,
                                  device_capacity_bytes=device_mem, host_limit_bytes=host_limit)
    max_per_node = hardware.devices_per_node
    if args.layout:
        nodes, per_node = parse_layout(args.layout, max_per_node)
        node_list, per_node_list = [nodes], [per_node]
    else:
        node_list, per_node_list = parse_range(args.nodes, "--nodes"), device_counts(max_per_node)
    results = search(
        arch, settings, hardware, coefficients, nodes=node_list, per_node=per_node_list,
        device_capacity_bytes=device_mem, host_limit_bytes=host_limit,
    )
    best = recommend(results)
    full_node = next((r for r in results if r.nodes == 1 and r.devices_per_node == max_per_node), None)
    fixes = []
    if full_node is not None and not full_node.fits:
        fixes = fixes_for(full_node, arch, settings, hardware, coefficients, device_capacity_bytes=device_mem, host_limit_bytes=host_limit)
    chosen = results[0] if args.layout else best
    if (args.emit or args.run) and chosen is None:
        raise UsageError(f"--{'emit' if args.emit else 'run'}: no layout fits; pick one with --layout to use it anyway")
    if args.hostfile and not args.hostfile.is_file():
        raise UsageError(f"--hostfile {args.hostfile}: no such file")
    run_overrides = []
    if args.emit or args.run:
        run_overrides = run_overrides_for(args, config, chosen)
    if args.emit:
        from memdiag import preflight
        from memdiag.plan.emit import emit

        preflight.writable_dir(args.emit, "--emit")

        written = emit(args.emit, chosen, load_ds_config(config), args.overrides, run_overrides=run_overrides)
        print("memdiag: wrote " + ", ".join(str(p) for p in written))
    measured = seed_comparison(case, args, arch, settings, hardware, results)
    if measured:
        measured["hypotheses"] = seed_hypotheses(case, arch, settings, hardware, coefficients, node_list, per_node_list, device_mem, host_limit)
    if args.json:
        read = {"ds_config": {"path": config.ds_config, "zero_optimization": settings.ds_buffers}} if config.ds_config_is_users else {}
        if getattr(args, "launch", None) is not None:
            read["command"] = {"read": args.launch.read, "not_read": args.launch.gaps,
                               "layout": None if command_layout is None else command_layout.to_dict()}
        print(json.dumps(as_json(arch, settings, hardware, results, best, full_node, fixes, host_limit, device_mem)
                         | read | {"measured": measured}, indent=2))
    else:
        launch = getattr(args, "launch", None)
        if launch is not None:
            print("read from the command: " + ("; ".join(launch.read) if launch.read else "nothing"))
            for gap in launch.gaps:
                print(f"  not read: {gap}")
            print()
        if command_layout is not None:
            print(f"the command's layout {command_layout.name}: {command_layout.verdict}\n")
        print_table(arch, settings, hardware, results, best, full_node, fixes, host_limit, device_mem, single=bool(args.layout),
                    ds_config=config.ds_config if config.ds_config_is_users else None)
        if measured:
            print(
                f"\nmeasured: {measured['layout']} used {format_bytes(measured['device_bytes'])} per device ({measured['source']}); "
                f"predicted {format_bytes(measured['predicted_device_bytes'])} ({measured['error']:+.1%}, attention={settings.attention})"
            )
            print_hypotheses(measured)
    if args.run:
        from memdiag.commands import run

        print(f"\nmemdiag: running {chosen.name}: memdiag run {' '.join(run_overrides)}", flush=True)
        return run.main(argparse.Namespace(overrides=run_overrides, command=[]))
    return 0


def seed_comparison(case, args, arch, settings, hardware, results) -> dict | None:
    """The case's recorded measurement beside the prediction for the same layout and settings."""
    seed = case.seed_measurement
    same = (
        seed and not args.model_config and hardware.name == "BI-V150" and arch.num_parameters > 1e10
        and (settings.micro_batch, settings.seq_len, settings.zero_stage, settings.dtype) == (1, 2048, 3, "bf16")
        and settings.offload == "none" and not settings.activation_checkpointing
    )
    match = next((r for r in results if f"{r.nodes}x{r.devices_per_node}" == seed["layout"]), None) if same else None
    if match is None:
        return None
    predicted = int(match.device_peak_bytes)
    return seed | {"predicted_device_bytes": predicted, "error": (predicted - seed["device_bytes"]) / seed["device_bytes"]}


HYPOTHESES = [(attention, checkpointing) for checkpointing in (False, True) for attention in ("plain", "sdpa_math", "fused")]


def seed_hypotheses(case, arch, settings, hardware, coefficients, nodes, per_node, device_mem, host_limit) -> list[dict]:
    """What the benchmark may have run, each beside the seed's measurement: the attention path
    (plain without xformers, SDPA's math path with xformers importable, a fused kernel) and
    activation checkpointing (the upstream config's ``self.gradient_checkpointing =
    gradient_checkpointing,`` is a truthy tuple, which transformers' compatibility hook reads as
    on), with the layout each would recommend."""
    seed = case.seed_measurement
    rows = []
    for attention, checkpointing in HYPOTHESES:
        changed = replace(settings, attention=attention, activation_checkpointing=checkpointing)
        results = search(arch, changed, hardware, coefficients, nodes=nodes, per_node=per_node,
                         device_capacity_bytes=device_mem, host_limit_bytes=host_limit)
        match = next(r for r in results if f"{r.nodes}x{r.devices_per_node}" == seed["layout"])
        # the seed's choice: the same devices on one node, or spread over two
        one_node = evaluate(arch, changed, hardware, 1, match.world, coefficients,
                            device_capacity_bytes=device_mem, host_limit_bytes=host_limit)
        rows.append({
            "attention": attention, "activation_checkpointing": checkpointing,
            "predicted_device_bytes": int(match.device_peak_bytes),
            "error": (match.device_peak_bytes - seed["device_bytes"]) / seed["device_bytes"],
            "seed_layout_verdict": match.verdict, "one_node_layout": one_node.name, "one_node_verdict": one_node.verdict,
            "decision_holds": match.fits and not one_node.fits,
        })
    return rows


def print_hypotheses(measured: dict) -> None:
    rows = measured["hypotheses"]
    print(f"what the benchmark may have run, against the {format_bytes(measured['device_bytes'])} it measured at {measured['layout']}:")
    one = rows[0]["one_node_layout"].split(" ")[0]
    header = ["attention", "checkpointing", "predicted", "error", f"{measured['layout']} (the seed ran)", f"{one} (one node)"]
    cells = [
        [row["attention"], str(row["activation_checkpointing"]).lower(), format_bytes(row["predicted_device_bytes"]),
         f"{row['error']:+.1%}", row["seed_layout_verdict"].split(" (")[0], row["one_node_verdict"].split(" (")[0]]
        for row in rows
    ]
    for line in render(header, cells, right={2, 3}, indent=2):
        print(line)
    holds = [row["decision_holds"] for row in rows]
    if all(holds):
        print(f"  under every hypothesis {measured['layout']} fits and {one} does not: the seed's decision does not hang on which one ran")
    else:
        print(f"  the seed's decision ({measured['layout']} over {one}) holds under {sum(holds)} of {len(holds)} hypotheses")


def run_overrides_for(args: argparse.Namespace, config, chosen) -> list[str]:
    """The ``memdiag run`` overrides that run the chosen layout with the plan's settings: the
    same tokens (every plan setting is a run setting), the profile and the layout."""
    import shlex

    tokens = [*([] if any(t.startswith("case=") for t in args.overrides) else [f"case={config.case}"]), *args.overrides]
    if not any(t.startswith(("hardware=", "hardware.name=")) for t in args.overrides):
        tokens.insert(1, f"hardware={args.profile or hardware_profile_name(config.hardware)}")
    tokens.append(f"layout={chosen.nodes}x{chosen.devices_per_node}")
    if args.host_ram:
        tokens.append(f"host_ram={args.host_ram}")
    if args.hostfile:
        tokens.append(f"hostfile={args.hostfile.resolve()}")
    if args.nodes_here:
        tokens.append("nodes_here=true")
    return tokens + shlex.split(args.run_args)


def hardware_profile_name(hardware) -> str:
    """The config-group name of a profile (``BI-V150`` -> ``bi_v150``)."""
    return hardware.name.lower().replace("-", "_")


def reason(best) -> str:
    return (
        f"the fewest nodes that fit, with the most devices per node: device peak {format_bytes(best.device_peak_bytes)} "
        f"of {format_bytes(best.device_capacity_bytes)}, host peak {format_bytes(best.host_peak_bytes)} of "
        f"{format_bytes(best.host_limit_bytes)} per node"
    )


def as_json(arch, settings, hardware, results, best, full_node, fixes, host_limit, device_mem) -> dict:
    return {
        "model": {"name": arch.name, "num_parameters": arch.num_parameters},
        "hardware": hardware.name,
        "host_ram_bytes": host_limit,
        "device_memory_bytes": device_mem,
        "settings": {k: v for k, v in settings.__dict__.items() if k != "ds_buffers"},
        "layouts": [r.to_dict() for r in results],
        "recommended": None if best is None else best.to_dict() | {"reason": reason(best)},
        "full_node": None if full_node is None else full_node.to_dict(),
        "deepspeed_estimate": cross_check(arch, settings, best or full_node or results[0]),
        "fixes_for_full_node": [
            {"change": label, "fits": r.fits, "verdict": r.verdict, "host_peak_bytes_per_node": int(r.host_peak_bytes), "device_peak_bytes": int(r.device_peak_bytes)}
            for label, r in fixes
        ],
    }


def cross_check(arch, settings, layout) -> dict:
    """memdiag's model-state terms beside DeepSpeed's estimator for the same layout (device
    without offload, as the equality below needs; host with the run's offload and DeepSpeed's
    default 1.5 buffer factor, as users call it)."""
    zero_init = settings.load != "reference"
    ds = deepspeed_estimate(arch, layout.devices_per_node, layout.nodes, zero_init=zero_init)
    ds_host = deepspeed_estimate(arch, layout.devices_per_node, layout.nodes, zero_init=zero_init,
                                 offload=settings.offload, buffer_factor=1.5)
    ds["host_bytes_per_node_with_offload_x1_5"] = ds_host["host_bytes_per_node"]
    ds["memdiag_host_peak_bytes_per_node"] = int(layout.host_peak_bytes)
    world = layout.world
    # DeepSpeed's device figure is the no-offload one: compare it with memdiag's states without offload
    resident = device_terms(arch, replace(settings, offload="none"), world, Coefficients())
    states = sum(resident[k] for k in ("parameters", "gradients", "optimizer_states"))
    return ds | {
        "memdiag_model_states_bytes": int(states),
        "difference_explained": "DeepSpeed counts gradients in fp32 (18 B/param: +2 B over memdiag's measured "
        "bf16 gradient partitions) and adds 4 B x the largest layer",
        "memdiag_plus_explained_bytes": int(states + 2 * arch.num_parameters / world + 4 * ds["largest_layer_params"]),
    }


def _terms_lines(title: str, terms: dict[str, float]) -> list[str]:
    rows = [(name, format_bytes(value)) for name, value in terms.items() if value]
    return [f"  {title}: {format_bytes(sum(terms.values()))}", *render([], rows, right={1}, indent=4)]


ZERO_KEYS_PLANNED = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "stage3_prefetch_bucket_size",
                     "stage3_max_live_parameters", "stage3_param_persistence_threshold", "sub_group_size")
"""The ZeRO keys the terms read (besides offload), shown when they come from the user's file."""


def print_table(arch, settings, hardware, results, best, full_node, fixes, host_limit, device_mem, *, single: bool,
                ds_config: str | None = None) -> None:
    cards = f"{hardware.devices_per_card} devices per card, " if hardware.devices_per_card > 1 else ""
    print(
        f"{arch.name}: {arch.num_parameters / 1e9:.2f}B parameters; {hardware.name} "
        f"({cards}{format_bytes(device_mem)} per device, up to {hardware.devices_per_node} per node), "
        f"{format_bytes(host_limit)} host RAM per node"
    )
    print(
        f"settings: ZeRO-{settings.zero_stage}, {settings.dtype}, micro_batch {settings.micro_batch}, seq_len {settings.seq_len}, "
        f"attention={settings.attention}, activation_checkpointing={str(settings.activation_checkpointing).lower()}, "
        f"offload={settings.offload}" + (f" (pin_memory={str(settings.pin_memory).lower()})" if settings.offload != "none" else "")
        + f", load={settings.load}" + (f" (load.dtype={settings.load_dtype})" if settings.load_dtype else "")
        + f", optimizer={settings.optimizer}" + (", fused_cross_entropy=true" if settings.fused_cross_entropy else "")
        + f"; judged phases: {', '.join(settings.phases)}"
    )
    if ds_config:
        read = [f"{k}={settings.ds_buffers[k]:g}" if isinstance(settings.ds_buffers[k], float) else f"{k}={settings.ds_buffers[k]}"
                for k in ZERO_KEYS_PLANNED if k in settings.ds_buffers]
        print(f"ds_config {ds_config}: zero_optimization " + (", ".join(read) if read else "at DeepSpeed's defaults")
              + " (HF's \"auto\" filled as the Trainer fills it)")
    print()
    phases = list(results[0].host_phases)
    lines = render(
        ["layout", "device peak", *phases, "verdict"],
        ([r.name, format_bytes(r.device_peak_bytes), *(format_bytes(r.host_phase_peaks[p]) for p in phases), r.verdict] for r in results),
        right=range(1, 2 + len(phases)),
    )
    # the phases' columns start where the device peak's ends
    print(" " * (lines[0].index("device peak") + len("device peak") + 1) + "host RAM per node at the peak of each phase")
    for line in lines:
        print(line)
    reserve = (f"{Coefficients().allocator_reserve_layers:g} gathered layers' worth under ZeRO-3, fitted on published runs"
               if settings.zero_stage >= 3 else f"{Coefficients().allocator_reserve_fraction:.0%} assumed")
    print(f"(device peak: the \"used\" figure nvidia-smi shows, which the verdict uses: tensors plus the allocator's reserve "
          f"({reserve}), the runtime context and NCCL's buffers "
          f"({format_bytes(Coefficients().nccl_buffer_bytes)} assumed); --json gives the allocated peak too)")
    print(f"(host: the busiest node, the one of global rank 0; offline zero_to_fp32.py needs "
          f"{format_bytes(consolidation_bytes(arch))} on the machine that runs it)")
    unjudged = [p for p in phases if p not in settings.phases]
    if unjudged:
        print(f"({' and '.join(unjudged)}: shown, not judged: the run does not {' or '.join(unjudged)}; "
              + " / ".join(f"{p}=true" for p in unjudged) + " to judge them)")
    print()
    if best is None:
        print("no layout fits: see the terms below, and the fixes")
    else:
        print(f"recommended: {best.name} - {reason(best)}")
    shown = [best] if best else []
    if full_node is not None and full_node is not best:
        shown.append(full_node)
    if single:
        shown = results
    for r in shown:
        print(f"\nterms for {r.name} ({r.verdict}):")
        lines = _terms_lines("device, per device", r.device_terms)
        lines += _terms_lines("host RAM per node while loading", r.host_load_terms)
        lines += _terms_lines("host RAM per node while training", r.host_steady_terms)
        for phase in ("initialize", "save", "resume"):
            extra = {k: v for k, v in r.host_phases.get(phase, {}).items() if k not in r.host_steady_terms}
            if extra:
                lines += _terms_lines(f"host RAM per node in {phase}: training plus", extra)
        lines.append(f"  the host peak binds in {r.binding_phase}")
        for line in lines:
            print(line)
    anchor = best or full_node or results[0]
    if anchor is not None:
        ds = cross_check(arch, settings, anchor)
        print(
            f"\ncross-check ({anchor.name}): DeepSpeed's estimate_zero3_model_states_mem_needs gives "
            f"{format_bytes(ds['device_bytes'])} per device for model states; memdiag's parameters + gradients + "
            f"optimizer states are {format_bytes(ds['memdiag_model_states_bytes'])} ({ds['difference_explained']}: "
            f"{format_bytes(ds['memdiag_plus_explained_bytes'])})"
        )
        print(
            f"  host: DeepSpeed's estimator (offload={settings.offload}, its default buffer factor 1.5) says "
            f"{format_bytes(ds['host_bytes_per_node_with_offload_x1_5'])} per node; memdiag's peak is "
            f"{format_bytes(ds['memdiag_host_peak_bytes_per_node'])} ({anchor.binding_phase}), with the runtime, "
            "loading and checkpoint phases it leaves out"
        )
    if fixes:
        print(f"\nto make {full_node.name} fit (one change at a time):")
        for line in render([], ([label, "FITS" if r.fits else "not alone", r.verdict] for label, r in fixes), indent=2):
            print(line)
