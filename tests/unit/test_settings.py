"""One settings schema: every command accepts the same keys with the same defaults, refuses
the same way, and `memdiag plan` agrees with `memdiag run`'s pre-launch consult."""

import contextlib
import io
import itertools
import json
import random

import pytest

from memdiag import settings as schema
from memdiag.cli import main as cli_main
from memdiag.config import compose
from memdiag.errors import UsageError
from memdiag.settings import API, CMD, COMMANDS, PLAN, RUN, SCHEMA

BASE = ["hardware=bi_v150", "model.scale=small"]
RESOLVED_BY_COMPOSE = {"layout", "nproc_per_node", "ds_config"}
"""Settings composing the case fills in (the layout from the profile, the case's ds_config)."""


def accept(command: str, key: str, value):
    """The value ``command`` ends up with for ``key=value``, through the command's own entry."""
    setting = SCHEMA[key]
    if command in (RUN, PLAN):
        config = compose([*BASE, f"{key}={value}"], command=command, detect_accelerator=False)
        return getattr(config, setting.field)
    if command == CMD:
        return getattr(schema.resolve(CMD, [f"{key}={value}"]), setting.field)
    return getattr(schema.resolve(API, **{key.replace(".", "_"): value}), setting.field)


def defaults_of(command: str):
    if command in (RUN, PLAN):
        return compose(BASE, command=command, detect_accelerator=False)
    return schema.resolve(command)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_its_keys_with_the_schema_defaults(command):
    resolved = defaults_of(command)
    taken = schema.keys_for(command)
    assert taken, command
    for key in taken:
        setting = SCHEMA[key]
        if setting.field in RESOLVED_BY_COMPOSE:
            continue
        assert getattr(resolved, setting.field) == setting.default, (command, key)
        if setting.default is not None:  # the default, written out, parses back to itself
            assert accept(command, key, setting.default_text()) == setting.default, (command, key)


def test_the_commands_agree_on_every_shared_key():
    """A key two commands take has one default and one parse, whichever command reads it."""
    samples = {"int": "3", "float": "0.5", "bool": "true", "size": "2G", "str": "x", "path": "/tmp/x"}
    for key, setting in SCHEMA.items():
        takers = [c for c in COMMANDS if c in setting.commands]
        if len(takers) < 2 or setting.field in RESOLVED_BY_COMPOSE:
            continue
        value = setting.choices[-1] if setting.choices else samples[setting.kind]
        value = {"host_ram": "600G", "stacks.device": "steps:3"}.get(key, value)
        got = {c: accept(c, key, value) for c in takers}
        assert len(set(map(repr, got.values()))) == 1, (key, got)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_key_of_another_command_is_refused_naming_who_takes_it(command):
    foreign = next(k for k, s in SCHEMA.items() if command not in s.commands)
    with pytest.raises(UsageError) as err:
        if command == API:
            schema.resolve(API, **{foreign.replace(".", "_"): SCHEMA[foreign].default_text()})
        else:
            schema.parse([f"{foreign}=1"], command)
    text = str(err.value)
    assert repr(foreign) in text and "is not a setting of" in text and "\n" not in text


@pytest.mark.parametrize("command, typo, closest", [(RUN, "stepz", "steps"), (PLAN, "seq_lenn", "seq_len"),
                                                    (CMD, "sample_hzz", "sample_hz"), (API, "sample_hzz", "sample_hz")])
def test_an_unknown_key_names_the_closest_in_every_command(command, typo, closest):
    with pytest.raises(UsageError) as err:
        if command == API:
            schema.resolve(API, **{typo: 1})
        else:
            schema.parse([f"{typo}=1"], command)
    assert f"unknown key {typo!r}" in str(err.value) and closest in str(err.value)


@pytest.mark.parametrize("token, needle", [("load=lazy", "use one of reference, zero_init, rank0_broadcast"),
                                           ("zero.stage=5", "use one of 0, 1, 2, 3"), ("pin_memory=maybe", "true or false"),
                                           ("host_ram=5X", "host_ram"), ("micro_batch=0", "micro_batch=0 must be a positive integer")])
def test_bad_values_are_one_line_in_plan_and_run(token, needle):
    for command in (RUN, PLAN):
        with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
            compose([*BASE, token], command=command, detect_accelerator=False)


def test_help_lists_every_key_of_the_command():
    for command in COMMANDS:
        text = schema.help_text(command)
        assert all(f"  {key}=" in text for key in schema.keys_for(command))
    assert "steps=" not in schema.help_text(PLAN) and "micro_batch=" in schema.help_text(PLAN)


def _plan(tokens: list[str], layout: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["plan", "--layout", layout, "--json", "--host-ram", "500G", *BASE, *tokens]) == 0
    return json.loads(out.getvalue())["layouts"][0]


def _consult(tokens: list[str], layout: str):
    from memdiag.rundir import resolve_host_limit
    from memdiag.runs import consult

    config = compose([*BASE, f"layout={layout}", "host_ram=500G", *tokens], command=RUN, detect_accelerator=False)
    chosen, _ = consult(config, resolve_host_limit(config.host_ram_bytes, config.hardware)[0])
    return chosen


GRID = {
    "zero.stage": ["2", "3"], "offload": ["none", "optimizer"], "pin_memory": ["true", "false"],
    "save_16bit_weights": ["true", "false"], "attention": ["plain", "sdpa_math"], "load": ["reference", "zero_init"],
    "dtype": ["bf16", "fp32"],
}


def test_plan_and_the_run_consult_agree_over_a_grid_of_settings():
    combos = list(itertools.product(*GRID.values()))
    picked = random.Random(20).sample(combos, 24) + [combos[0], combos[-1]]
    for values in picked:
        tokens = [f"{k}={v}" for k, v in zip(GRID, values)]
        for layout in ("1x8", "2x4"):
            planned, consulted = _plan(tokens, layout), _consult(tokens, layout)
            assert planned["fits"] == consulted.fits, tokens
            assert planned["device_peak_bytes"] == int(consulted.device_peak_bytes), tokens
            assert planned["host_peak_bytes_by_phase"] == {k: int(v) for k, v in consulted.host_phase_peaks.items()}, tokens
    # the grid moves the answer: not every combination plans the same
    peaks = {_plan([f"{k}={v}" for k, v in zip(GRID, values)], "1x8")["host_peak_bytes_per_node"] for values in picked[:6]}
    assert len(peaks) > 1


def test_the_ds_config_fills_what_the_settings_leave_unset(tmp_path):
    from memdiag.plan.inputs import for_run

    ds = json.loads(open(compose(BASE, command=PLAN, detect_accelerator=False).ds_config).read())
    ds["zero_optimization"] |= {"offload_optimizer": {"device": "cpu", "pin_memory": True},
                                "stage3_gather_16bit_weights_on_model_save": True}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    for command in (RUN, PLAN):
        _, read = for_run(compose([*BASE, f"ds_config={path}"], command=command, detect_accelerator=False))
        assert (read.offload, read.pin_memory, read.save_16bit_weights) == ("optimizer", True, True)
        _, given = for_run(compose([*BASE, f"ds_config={path}", "offload=none", "save_16bit_weights=false"],
                                   command=command, detect_accelerator=False))
        assert (given.offload, given.save_16bit_weights) == ("none", False)
