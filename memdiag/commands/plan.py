"""``memdiag plan --host-ram 500G``: which layouts fit, term by term, and what would make the
others fit."""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
from dataclasses import replace
from pathlib import Path

from memdiag.config import compose, load_ds_config, split_layout
from memdiag.errors import UsageError
from memdiag.plan.calibrate import load_coefficients
from memdiag.plan.model import Architecture
from memdiag.plan.search import deepspeed_estimate, device_counts, fixes_for, recommend, search
from memdiag.plan.terms import Coefficients, Settings
from memdiag.units import ACCEPTED_FORMS, format_bytes, parse_size

BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
PLAN_KEYS = {
    "zero.stage": ("zero_stage", int),
    "micro_batch": ("micro_batch", int),
    "seq_len": ("seq_len", int),
    "grad_accum": ("grad_accum", int),
    "dtype": ("dtype", str),
    "flash_attn": ("attention", "bool"),
    "attention": ("attention", str),
    "activation_checkpointing": ("activation_checkpointing", "bool"),
    "offload": ("offload", str),
    "load": ("load", str),
    "load.dtype": ("load_dtype", str),
    "checkpoint_format": ("checkpoint_format", str),
    "checkpoint_shards": ("checkpoint_shards", int),
}
RUN_KEYS = ("zero.stage", "micro_batch", "seq_len", "grad_accum", "dtype", "load", "load.dtype")
"""Plan settings that ``memdiag run`` takes too (the rest describe other code: flash_attn, offload)."""
CHOICES = {
    "dtype": ("bf16", "fp16", "fp32"),
    "offload": ("none", "optimizer", "params"),
    "load": ("reference", "zero_init", "rank0_broadcast"),
    "attention": ("plain", "sdpa_math", "fused"),
    "load_dtype": ("bf16", "fp16", "fp32"),
    "checkpoint_format": ("bin", "safetensors"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="which nodes x devices layouts fit device memory and host RAM")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=", ".join(["model.scale", "case", *PLAN_KEYS]))
    parser.add_argument("--host-ram", help="host RAM per node, e.g. 500G (default: the hardware profile's)")
    parser.add_argument("--device-mem", help="memory per device, e.g. 64G (default: the profile's)")
    parser.add_argument("--devices-per-node", type=int, help="devices (ranks) per node (default: the profile's)")
    parser.add_argument("--nodes", default="1-4", help="node counts to search: N or A-B (default 1-4)")
    parser.add_argument("--case", default="baichuan2_13b")
    parser.add_argument("--profile", help="hardware profile: bi_v150, a100_40g, a100_80g, h100, h800, h200")
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


def settings_from(overrides: list[str], base: Settings) -> tuple[Settings, list[str]]:
    changes: dict = {}
    passthrough = []
    for token in overrides:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise UsageError(f"malformed override {token!r}: write key=value, e.g. seq_len=4096")
        if key in ("model.scale", "case", "hardware"):
            passthrough.append(token)
            continue
        if key not in PLAN_KEYS:
            close = difflib.get_close_matches(key, [*PLAN_KEYS, "model.scale", "case"], n=3, cutoff=0.5)
            raise UsageError(f"unknown key {key!r}" + (f"; closest valid keys: {', '.join(close)}" if close else ""))
        field, kind = PLAN_KEYS[key]
        try:
            if kind == "bool":
                parsed = BOOL[value.lower()]
            elif kind == "size":
                parsed = parse_size(value, name=key)
            else:
                parsed = kind(value)
        except (KeyError, ValueError):
            raise UsageError(f"{key}={value!r}: expected {'true or false' if kind == 'bool' else kind.__name__}") from None
        if key == "flash_attn":
            parsed = "fused" if parsed else "plain"
        if field in CHOICES and parsed not in CHOICES[field]:
            raise UsageError(f"{key}={value!r}: use one of {', '.join(CHOICES[field])}")
        changes[field] = parsed
    return replace(base, **changes), passthrough


def main(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # only DeepSpeed's estimator is used here
    settings, passthrough = settings_from(args.overrides, Settings())
    hardware_override = [f"hardware={args.profile}"] if args.profile else []
    case_cfg = compose(
        [f"case={args.case}", *hardware_override, *passthrough, "nproc_per_node=1"]
        + ([] if args.profile or any(t.startswith("hardware=") for t in passthrough) else ["hardware=bi_v150"]),
        detect_accelerator=False,
    )
    hardware = case_cfg.hardware
    if args.devices_per_node:
        if args.devices_per_node < 1:
            raise UsageError("--devices-per-node must be positive")
        hardware = replace(hardware, cards_per_node=args.devices_per_node, devices_per_card=1) if hardware.devices_per_card == 1 else replace(
            hardware, cards_per_node=max(1, args.devices_per_node // hardware.devices_per_card)
        )
    host_limit = parse_size(args.host_ram, name="--host-ram") if args.host_ram else hardware.host_ram_bytes
    device_mem = parse_size(args.device_mem, name="--device-mem") if args.device_mem else hardware.device_memory_bytes
    if not host_limit or not device_mem:
        raise UsageError(f"give --host-ram and --device-mem ({ACCEPTED_FORMS}): profile {hardware.name} has none")
    ds = load_ds_config(case_cfg)
    settings = replace(settings, ds_buffers=ds.get("zero_optimization", {}))
    case_module = importlib.import_module(f"cases.{args.case}")
    attention_given = any(t.split("=", 1)[0] in ("attention", "flash_attn") for t in args.overrides)
    if not attention_given and not args.model_config and hasattr(case_module, "BENCHMARK_ATTENTION"):
        settings = replace(settings, attention=case_module.BENCHMARK_ATTENTION)
    arch = Architecture.from_hf_config(args.model_config) if args.model_config else Architecture.from_case_model(case_cfg.model)
    coefficients = load_coefficients(args.coefficients) if args.coefficients else Coefficients()
    if args.calibrate:
        from memdiag.plan.calibrate import calibrate_main

        return calibrate_main(args.calibrate, coefficients, args.coefficients_out)

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
        run_overrides = run_overrides_for(args, passthrough, hardware, chosen)
    if args.emit:
        from memdiag.plan.emit import emit

        written = emit(args.emit, chosen, ds, args.overrides, run_overrides=run_overrides)
        print("memdiag: wrote " + ", ".join(str(p) for p in written))
    measured = seed_comparison(case_module, args, arch, settings, hardware, results)
    if args.json:
        print(json.dumps(as_json(arch, settings, hardware, results, best, full_node, fixes, host_limit, device_mem) | {"measured": measured}, indent=2))
    else:
        print_table(arch, settings, hardware, results, best, full_node, fixes, host_limit, device_mem, single=bool(args.layout))
        if measured:
            print(
                f"\nmeasured: {measured['layout']} used {format_bytes(measured['device_bytes'])} per device ({measured['source']}); "
                f"predicted {format_bytes(measured['predicted_device_bytes'])} ({measured['error']:+.1%}, attention={settings.attention})"
            )
    if args.run:
        from memdiag.commands import run

        print(f"\nmemdiag: running {chosen.name}: memdiag run {' '.join(run_overrides)}", flush=True)
        return run.main(argparse.Namespace(overrides=run_overrides, command=[]))
    return 0


def seed_comparison(case_module, args, arch, settings, hardware, results) -> dict | None:
    """The case's recorded measurement beside the prediction for the same layout and settings."""
    seed = getattr(case_module, "SEED_MEASUREMENT", None)
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


def run_overrides_for(args: argparse.Namespace, passthrough: list[str], hardware, chosen) -> list[str]:
    """The ``memdiag run`` overrides that run the chosen layout with the plan's settings."""
    import shlex

    shared = []
    for token in args.overrides:
        key, _, value = token.partition("=")
        if key in RUN_KEYS:
            if key == "load" and value not in ("reference", "zero_init"):
                raise UsageError(f"--run: load={value} is a planning option only; memdiag run loads with reference or zero_init")
            shared.append(token)
    hardware_token = [] if any(t.startswith("hardware=") for t in passthrough) else [f"hardware={args.profile or hardware_profile_name(hardware)}"]
    tokens = [f"case={args.case}", *hardware_token, *(t for t in passthrough if not t.startswith("case=")), *shared,
              f"layout={chosen.nodes}x{chosen.devices_per_node}"]
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
    """memdiag's model-state terms beside DeepSpeed's estimator for the same layout."""
    ds = deepspeed_estimate(arch, layout.devices_per_node, layout.nodes, zero_init=settings.load != "reference")
    states = sum(layout.device_terms[k] for k in ("parameters", "gradients", "optimizer_states"))
    world = layout.world
    return ds | {
        "memdiag_model_states_bytes": int(states),
        "difference_explained": "DeepSpeed counts gradients in fp32 (18 B/param: +2 B over memdiag's measured "
        "bf16 gradient partitions) and adds 4 B x the largest layer",
        "memdiag_plus_explained_bytes": int(states + 2 * arch.num_parameters / world + 4 * ds["largest_layer_params"]),
    }


def _terms_lines(title: str, terms: dict[str, float]) -> list[str]:
    lines = [f"  {title}: {format_bytes(sum(terms.values()))}"]
    lines += [f"    {name:32} {format_bytes(value):>12}" for name, value in terms.items() if value]
    return lines


def print_table(arch, settings, hardware, results, best, full_node, fixes, host_limit, device_mem, *, single: bool) -> None:
    print(
        f"{arch.name}: {arch.num_parameters / 1e9:.2f}B parameters; {hardware.name} "
        f"({hardware.devices_per_card} device(s) per card, {format_bytes(device_mem)} per device), "
        f"{format_bytes(host_limit)} host RAM per node"
    )
    print(
        f"settings: ZeRO-{settings.zero_stage}, {settings.dtype}, micro_batch {settings.micro_batch}, seq_len {settings.seq_len}, "
        f"attention={settings.attention}, activation_checkpointing={str(settings.activation_checkpointing).lower()}, "
        f"offload={settings.offload}, load={settings.load}" + (f" (load.dtype={settings.load_dtype})" if settings.load_dtype else "")
    )
    print()
    print(f"{'layout':28} {'device peak':>12} {'host load/node':>15} {'host steady/node':>17}  verdict")
    for r in results:
        print(f"{r.name:28} {format_bytes(r.device_peak_bytes):>12} {format_bytes(r.host_load_bytes):>15} {format_bytes(r.host_steady_bytes):>17}  {r.verdict}")
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
        for line in _terms_lines("device, per device", r.device_terms) + _terms_lines(
            "host RAM per node while loading", r.host_load_terms
        ) + _terms_lines("host RAM per node while training", r.host_steady_terms):
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
    if fixes:
        print(f"\nto make {full_node.name} fit (one change at a time):")
        for label, r in fixes:
            print(f"  {label:48} {'FITS' if r.fits else 'not alone':10} {r.verdict}")
