"""Write what a chosen layout needs to run: hostfile, ds_config.json, launch scripts."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from memdiag.hostfile import Host, format_hostfile
from memdiag.plan.search import LayoutResult


def emit(
    directory: Path, layout: LayoutResult, ds_config: dict, overrides: list[str], hosts: list[str] | None = None,
    run_overrides: list[str] | None = None,
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    hosts = hosts or [f"node{i}" for i in range(layout.nodes)]
    hostfile = directory / "hostfile"
    hostfile.write_text(format_hostfile([Host(name, layout.devices_per_node) for name in hosts]))
    config = directory / "ds_config.json"
    config.write_text(json.dumps(ds_config, indent=2))
    deepspeed = directory / "launch_deepspeed.sh"
    deepspeed.write_text(
        "#!/usr/bin/env bash\n"
        f"# {layout.name}: {layout.verdict}; plan settings: {' '.join(overrides) or 'defaults'}\n"
        "# the deepspeed launcher starts every node from this one over ssh, using the hostfile\n"
        "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n"
        ": \"${TRAIN_SCRIPT:?set TRAIN_SCRIPT to your training script}\"\n"
        f"memdiag run -- deepspeed --hostfile hostfile --num_nodes {layout.nodes} --num_gpus {layout.devices_per_node} \\\n"
        "  \"$TRAIN_SCRIPT\" --deepspeed ds_config.json \"$@\"\n"
    )
    torchrun = directory / "launch_torchrun.sh"
    torchrun.write_text(
        "#!/usr/bin/env bash\n"
        f"# {layout.name}: one torchrun per node; run on every node with NODE_RANK=0..{layout.nodes - 1}\n"
        "set -euo pipefail\n"
        f": \"${{MASTER_ADDR:={hosts[0]}}}\" \"${{NODE_RANK:?set NODE_RANK}}\"\n"
        ": \"${TRAIN_SCRIPT:?set TRAIN_SCRIPT to your training script}\"\n"
        f"memdiag run -- torchrun --nnodes {layout.nodes} --nproc_per_node {layout.devices_per_node} "
        "--node_rank \"$NODE_RANK\" --rdzv_backend static --master_addr \"$MASTER_ADDR\" --master_port 29500 \\\n"
        "  \"$TRAIN_SCRIPT\" --deepspeed ds_config.json \"$@\"\n"
    )
    scripts = [deepspeed, torchrun]
    if run_overrides:
        case = directory / "launch_memdiag.sh"
        tokens = [t for t in run_overrides if not t.startswith(("hostfile=", "nodes_here="))]
        case.write_text(
            "#!/usr/bin/env bash\n"
            f"# {layout.name}: the case itself, memdiag on every node (over ssh), every node's timelines in one run directory\n"
            "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n"
            f"memdiag run {shlex.join(tokens)} hostfile=\"$PWD/hostfile\" \"$@\"\n"
        )
        scripts.append(case)
    for script in scripts:
        script.chmod(0o755)
    return [hostfile, config, *scripts]
