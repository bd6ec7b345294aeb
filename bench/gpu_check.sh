#!/usr/bin/env bash
# The CUDA and NVML paths, which CI never runs, on one GPU: the case with NCCL (allocator vs NVML
# vs categorised figures, exact phase peaks, plan vs measured with the run's own settings, the
# report), Adam's step temporaries, and the exact peaks a sampler misses (a spike between samples,
# DeepSpeed's see_memory_usage resetting the counter mid-phase). One PASS/FAIL line per check;
# exit status 1 when any failed. Every step has its own timeout; under 8 minutes in all.
#
# Prepare here, once (the device machine has a CUDA torch, transformers and nvidia-ml-py, but no
# DeepSpeed, Hydra, plotly, pydantic or orjson, and no package registry): wheels pinned to
# constraints.txt, the source-only ones built into wheels, for CPython 3.12 on x86-64:
#     echo /.whl/ >> .git/info/exclude
#     pip wheel --no-deps -w .whl deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       hydra-core==1.3.8 omegaconf==2.3.1 plotly==7.1.0 orjson==3.13.0 py-spy==0.4.3 typing_extensions==4.16.0 \
#       prometheus-client==0.26.0 memray==1.20.0 textual==8.2.8 rich==15.0.0 Jinja2==3.1.6 MarkupSafe==3.0.4 \
#       markdown-it-py==4.3.0 mdit-py-plugins==0.7.0 mdurl==0.1.2 linkify-it-py==2.2.0 Pygments==2.21.0 \
#       platformdirs==4.14.8
#     GPU_CHECK_DRY=1 GPU_CHECK_PYTHON=.venv/bin/python bash bench/gpu_check.sh   # here: the offline install
#       for CPython 3.12, bash -n, the imports in this environment
# Run there:  device run  command="bash bench/gpu_check.sh"  carry=[".whl"]  timeout_s=540
#
# Output in $OUT (the device tool brings back 8 files): summary.txt (the PASS/FAIL lines),
# nvidia-smi.txt, optimizer_temporaries.txt, figures.txt, run.log, report-auto.html, run-auto.tar.gz
# (the run directory with its logs), peaks.tar.gz (the spike run). Nothing is deleted on failure.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/memdiag-gpu-check}
DRY=${GPU_CHECK_DRY:-0}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0
check() {  # check NAME SECONDS COMMAND...: one step under its timeout, PASS/FAIL recorded
  local name=$1 seconds=$2
  shift 2
  if timeout "$seconds" "$@"; then echo "PASS $name" | tee -a "$SUMMARY"
  else echo "FAIL $name (exit $?)" | tee -a "$SUMMARY"; failed=1; fi
}

# the carried wheels, installed apart from the machine's own packages (PEP 668 images refuse --user)
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  site=${GPU_CHECK_SITE:-/tmp/memdiag-site}
  # dry, here: the same offline install for the device's CPython 3.12, into a throwaway folder
  target=(); [ "$DRY" = 1 ] && target=(--python-version 3.12 --implementation cp --only-binary=:all:
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux1_x86_64 --platform any)
  check "wheels install offline" 300 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade "${target[@]}" --target "$site" .whl/*.whl
  [ "$DRY" = 1 ] || export PYTHONPATH=$site:$PWD
fi
export PYTHONUNBUFFERED=1 MEMDIAG_CACHE=/tmp/memdiag-cache
check "bash -n" 10 bash -n "$0"
PY=${GPU_CHECK_PYTHON:-python3}  # dry, here: the project's own environment (the wheels are for 3.12)
check "imports" 120 "$PY" -c "import torch, deepspeed, transformers, pynvml, hydra, plotly, orjson, prometheus_client, memray, memdiag
print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '| deepspeed', deepspeed.__version__,
      '| transformers', transformers.__version__, '| pynvml', pynvml.__file__)"
if [ "$DRY" = 1 ]; then
  echo "dry run: preparation and imports only" | tee -a "$SUMMARY"
  exit $failed
fi
[ $failed = 0 ] || { echo "the preparation failed: nothing measured" | tee -a "$SUMMARY"; exit 1; }

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv > "$OUT/nvidia-smi.txt" 2>&1
check "Adam's step temporaries on CUDA match memdiag's table" 120 \
  bash -c "python3 bench/optimizer_temporaries.py --device cuda | tee '$OUT/optimizer_temporaries.txt' | tail -1 | grep -q 'largest difference: 0.[01]'"

# the case at a size one GPU trains in seconds, 1 rank (NCCL), the real hooks and probes
SETTINGS="model.scale=small seq_len=1024 attention=plain"
check "memdiag run on one GPU" 300 bash -c "python3 -m memdiag run hardware=h200 nproc_per_node=1 steps=10 $SETTINGS \
  reports_dir='$OUT/reports' >> '$OUT/run.log' 2>&1"
run=$(ls -d "$OUT"/reports/baichuan2_13b/* 2>/dev/null | tail -1)
if [ -n "$run" ]; then
  python3 -m memdiag plan --profile h200 --layout 1x1 --host-ram 2T $SETTINGS --json > "$OUT/plan.json" 2>> "$OUT/run.log"
  check "figures: allocator, NVML, categories, reconciliation, exact peaks, plan vs measured" 120 \
    bash -c "python3 - '$run' '$OUT/plan.json' > '$OUT/figures.txt' 2>&1" <<'PY'
import json, sys
import numpy as np
from memdiag.timeline import read_run
from memdiag.units import format_bytes as fb

run = read_run(sys.argv[1])
plan = json.load(open(sys.argv[2]))["layouts"][0]
rank = run.ranks[0]
print("device source:", rank.header.get("device_source"), "| total", fb(rank.header.get("device_total_bytes")),
      "| nvml", rank.header.get("nvml_module"),
      "| the watcher's NVML:", [(n.header.get("nvml"), n.header.get("nvml_module")) for n in run.nodes.values()])
for column in ("device_allocated_bytes", "device_reserved_bytes", "nvml_used_bytes", "rss_bytes"):
    values = rank.columns[column]
    print(f"sampled max {column:24} {fb(np.nanmax(values)) if np.any(~np.isnan(values)) else 'n/a'}")
print("exact phase peaks (allocator max per phase):")
for phase in rank.phases:
    if phase.device_peak_bytes is not None and phase.step in (None, 0, 1):
        print(f"  {'  ' * phase.depth}{phase.name:22} device {fb(phase.device_peak_bytes):>12}  host {fb(phase.host_peak_bytes):>12}")
memory = [e for e in rank.events if e["kind"] == "memory" and e["phase"] == "step"]
last = memory[-1]
print("categorised after the last step:", {k: fb(v) for k, v in last.items() if k.endswith("_bytes") and v is not None})
device_peak = max((p.device_peak_bytes or 0) for p in rank.phases)
print(f"plan: allocated {fb(plan['device_allocated_peak_bytes'])}, used {fb(plan['device_used_peak_bytes'])}; measured: "
      f"allocator peak {fb(device_peak)} ({(plan['device_allocated_peak_bytes'] - device_peak) / device_peak:+.1%}), "
      f"NVML max {fb(np.nanmax(rank.columns['nvml_used_bytes']))}")
from memdiag.reconcile import reconcile

reconciled = reconcile(run)
print("reconciliation per phase (allocated peak + allocator cache + outside torch = NVML):")
for row in (reconciled[1] if reconciled else []):
    print(f"  {row.phase:22} {fb(row.allocated_peak_bytes):>11} + {fb(row.cache_bytes):>11} "
          f"(inactive split {fb(row.inactive_split_bytes)}) + {fb(row.outside_torch_bytes):>11} = NVML {fb(row.nvml_used_peak_bytes)}")
print("warnings:", [e.get("message") for e in rank.events if e["kind"] == "warning"])
print("run status:", run.spec.get("status"), "| problems:", run.problems)
problems = []
if not reconciled or any(r.reserved_peak_bytes is None or r.reserved_peak_bytes < r.allocated_peak_bytes
                         for r in reconciled[1]):
    problems.append("no exact reserved peak per phase, or one below its allocated peak")
if "torch.cuda" not in str(rank.header.get("device_source")):
    problems.append("the CUDA probe was not chosen")
if not np.any(~np.isnan(rank.columns["nvml_used_bytes"])):
    problems.append("no NVML figure (sampler=watcher: the node watcher reads it, format 1.7)")
if last.get("reserved_bytes") is None or last.get("nvml_used_bytes") is None:
    problems.append("memory events lack the reconciliation figures")
if not device_peak or abs(plan["device_allocated_peak_bytes"] - device_peak) / device_peak > 0.10:
    problems.append("plan vs measured allocator peak off by more than 10%")
points = sum(len(e["t"]) for e in rank.events if e["kind"] == "device_samples")
print(f"sampler={rank.header.get('sampler')}: {points} device points read at the rank's boundaries")
if rank.header.get("sampler") == "watcher":  # each point is a peak since the last: their highest is the run's
    drawn = np.nanmax(rank.columns["device_allocated_bytes"]) if points else 0
    if not points or abs(drawn - device_peak) > 0.01 * device_peak:
        problems.append(f"the device series (sampler=watcher) peaks at {fb(drawn)}, not the exact {fb(device_peak)}")
if run.spec.get("status") != "completed":
    problems.append(f"status {run.spec.get('status')}")
print("problems:", problems)
sys.exit(1 if problems else 0)
PY
  cat "$OUT/figures.txt"
  check "calibrate reads the allocator reserve" 120 bash -c "python3 -m memdiag plan --calibrate '$run' 2>&1 | tail -2 | tee -a '$OUT/figures.txt'"
  check "device stacks at the first steps' peak (PyTorch's memory snapshot)" 60 bash -c "python3 - '$run' >> '$OUT/figures.txt' 2>&1" <<'PY'
import sys
from pathlib import Path
from memdiag.device_stacks import read_device_tables, snapshot_path
from memdiag.stacks import stack_rows

tables = read_device_tables(Path(sys.argv[1]))
assert tables, "no device table"
table = tables[0]
print(f"device stacks, rank {table['rank']}: peak {table['peak_bytes']:,} B over {table.get('steps')} step(s), "
      f"{table['events']:,} allocator events; snapshot {snapshot_path(Path(sys.argv[1]), table['rank']).stat().st_size:,} B")
for row in stack_rows(table, top=5):
    print("  ", " | ".join(row.values()))
PY
  check "report built" 10 test -s "$run/report.html"
  cp "$run/report.html" "$OUT/report-auto.html" 2>/dev/null
  tar -C "$(dirname "$run")" --exclude=report.html --exclude='*.png' -czf "$OUT/run-auto.tar.gz" "$(basename "$run")"
fi
check "exact peaks: a spike between samples, a foreign reset mid-phase" 180 \
  bash -c "python3 bench/gpu_peaks.py '$OUT/peaks' 2>&1 | tee -a '$SUMMARY'"
tar -C "$OUT" -czf "$OUT/peaks.tar.gz" peaks 2>/dev/null
rm -rf "$OUT/reports" "$OUT/peaks" "$OUT/plan.json"  # all of it is in the tarballs
echo "gpu_check: $([ $failed = 0 ] && echo PASSED || echo FAILED)" | tee -a "$SUMMARY"
exit $failed
