#!/usr/bin/env bash
# The CUDA and NVML paths, which CI never runs: the case on one GPU with NCCL, then the
# allocator's figures beside NVML's and the categorised ones, the exact phase peaks, the plan's
# prediction for the same run, and the report. Meant for the device tool (one H200), as one call:
#
#   here, once (wheels the device machine lacks; it has torch and transformers):
#     echo /.whl/ >> .git/info/exclude
#     pip wheel --no-deps -w .whl deepspeed==0.19.8
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl hjson pydantic pydantic-core annotated-types typing-inspection hydra-core omegaconf \
#       plotly orjson py-spy typing-extensions
#     pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # an sdist only
#   then:  device run  command="bash bench/gpu_check.sh"  carry=[".whl"]  timeout_s=540
#
# Output lands in $OUT (the device tool brings it back): nvidia-smi.txt, optimizer_temporaries.txt,
# run.log, figures.txt, and per optimizer report-*.html and run-*.tar.gz (the run directory).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/memdiag-gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 MEMDIAG_CACHE=/tmp/memdiag-cache
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, deepspeed, transformers, pynvml; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)" 2>&1 | tail -1 | tee -a "$OUT/nvidia-smi.txt"

# Adam's step temporaries on CUDA (fused, foreach, for-loop), beside memdiag's table
python3 bench/optimizer_temporaries.py --device cuda 2>&1 | tee "$OUT/optimizer_temporaries.txt"

# the case at a size one GPU trains in seconds, 1 rank (NCCL), the real hooks and probes; once with
# the case's own optimizer (torch's AdamW: foreach on CUDA) and once fused (DeepSpeed's FusedAdam's way)
for optimizer in auto fused; do
SETTINGS="model.scale=small seq_len=1024 attention=plain optimizer=$optimizer"
echo "=== optimizer=$optimizer" | tee -a "$OUT/figures.txt"
timeout 300 python3 -m memdiag run hardware=h200 nproc_per_node=1 steps=10 $SETTINGS \
  reports_dir="$OUT/reports" 2>&1 | tee -a "$OUT/run.log"
run=$(ls -d "$OUT"/reports/baichuan2_13b/* | tail -1)
python3 -m memdiag plan --profile h200 --layout 1x1 --host-ram 2T $SETTINGS \
  --json > "$OUT/plan.json" 2>>"$OUT/run.log"

python3 - "$run" "$OUT/plan.json" <<'EOF' | tee -a "$OUT/figures.txt"
import json, sys
import numpy as np
from memdiag.timeline import read_run
from memdiag.units import format_bytes as fb

run = read_run(sys.argv[1])
plan = json.load(open(sys.argv[2]))["layouts"][0]
rank = run.ranks[0]
print("device source:", rank.header.get("device_source"), "| total", fb(rank.header.get("device_total_bytes")))
for column in ("device_allocated_bytes", "device_reserved_bytes", "nvml_used_bytes", "rss_bytes"):
    values = rank.columns[column]
    print(f"sampled max {column:24} {fb(np.nanmax(values)) if np.any(~np.isnan(values)) else 'n/a'}")
print("exact phase peaks (allocator max, reset per phase):")
for phase in rank.phases:
    if phase.device_peak_bytes is not None and phase.step in (None, 0, 1):
        print(f"  {'  ' * phase.depth}{phase.name:22} device {fb(phase.device_peak_bytes):>12}  host {fb(phase.host_peak_bytes):>12}")
memory = [e for e in rank.events if e["kind"] == "memory" and e["phase"] == "step"]
if memory:
    last = memory[-1]
    print("categorised after the last step:", {k: fb(v) for k, v in last.items() if k.endswith("_bytes")})
device_peak = max((p.device_peak_bytes or 0) for p in rank.phases)
nvml = rank.columns["nvml_used_bytes"]
nvml_max = fb(np.nanmax(nvml)) if np.any(~np.isnan(nvml)) else "n/a"
error = f" ({(plan['device_allocated_peak_bytes'] - device_peak) / device_peak:+.1%})" if device_peak else " (no exact peak)"
print(f"plan: allocated {fb(plan['device_allocated_peak_bytes'])}, used {fb(plan['device_used_peak_bytes'])}; "
      f"measured: allocator peak {fb(device_peak)}{error}, NVML max {nvml_max}")
print("run status:", run.spec.get("status"), "| problems:", run.problems)
EOF
# the ZeRO-3 allocator reserve this run implies (reserved minus allocated peak, in gathered layers),
# beside the 11.9 fitted on published runs
python3 -m memdiag plan --calibrate "$run" 2>&1 | tail -2 | tee -a "$OUT/figures.txt"
cp "$run/report.html" "$OUT/report-$optimizer.html" 2>/dev/null
# the run directory itself (timelines, run.json, findings), for tests that read a real CUDA run
tar -C "$(dirname "$run")" --exclude=report.html --exclude='*.png' -czf "$OUT/run-$optimizer.tar.gz" "$(basename "$run")"
done
rm -rf "$OUT/reports" "$OUT/plan.json"
