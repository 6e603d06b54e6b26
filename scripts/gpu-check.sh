#!/usr/bin/env bash
# The GPU check, ready to fire on one H100 with no network (torch installed there, diffusers not):
# installs the wheels it carries, runs bench/gpu_flux.py within its budget, runs real bf16 RC-GRPO
# updates of the shipped tiny editor on CUDA (bench/gpu_check.py), and sets the measured peak memory
# beside the dry run's (rcgrpo.trace, traced on the host's CPU while the GPU benchmarks run). Writes
# gpu-check.json and gpu-check.log to --out (default: $OUT, else runs/gpu-check).
#
#   scripts/gpu-check.sh --download      # here, with a package index: wheelhouse/gpu-check (~45 MB, not committed)
#   scripts/gpu-check.sh                 # on the GPU machine: carry wheelhouse/gpu-check with the tree
#   scripts/gpu-check.sh --cpu-smoke     # the reduced form on CPU: the same steps at toy size, no install
#
# Budget on the GPU (10 minutes of run time): gpu_flux.py 330 s, the tiny updates ~1 min, the install
# and the meta trace of gpu_flux's training runs (CPU, concurrent with gpu_flux) in the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-lib.sh
mode=gpu
out=${OUT:-runs/gpu-check}
while [ $# -gt 0 ]; do
  case "$1" in
    --download) mode=download ;;
    --cpu-smoke) mode=cpu ;;
    --out) out=$2; shift ;;
    *) echo "usage: scripts/gpu-check.sh [--download | --cpu-smoke] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
python=${PYTHON:-python3}
if [ "$mode" = download ]; then
  echo "gpu-check: $(gpu_download "$python")"
  exit 0
fi

started=$SECONDS
gpu_begin gpu-check "$out" "$mode"

if [ "$mode" = gpu ]; then
  site=$(gpu_site "$python")
  export PYTHONPATH="$site:$PYTHONPATH"
  echo "installed in $((SECONDS - started)) s"
  # the dry run of gpu_flux's training runs, on the CPU while the GPU benchmarks run
  "$python" -m bench.gpu_check --trace-flux-only --out "$out" >"$out/flux_traced.log" 2>&1 &
  tracer=$!
  "$python" bench/gpu_flux.py --out "$out" --budget-s 330 || echo "gpu_flux.py failed: $?"
  wait "$tracer" || echo "the meta trace of gpu_flux's training failed (see $out/flux_traced.log)"
  "$python" -m bench.gpu_check --out "$out" --updates 3 --flux-train "$out/gpu_flux.json" \
    --flux-traced "$out/flux_traced.json"
else
  "$python" bench/gpu_flux.py --reduced --out "$out" --steps 4
  "$python" -m bench.gpu_check --out "$out" --updates 2 --device cpu
fi

"$python" - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
report = {"gpu_check": json.loads((out / "gpu_check.json").read_text())}
flux = out / "gpu_flux.json"
if flux.is_file():
    report["gpu_flux"] = json.loads(flux.read_text())
(out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
check = report["gpu_check"]
print(f"gpu-check: bf16 invariants {'hold' if check['ok'] else 'FAIL'} on {check['device']}")
for row in check.get("flux_train_peaks", []):
    print(f"  {row['config']}: measured {row['measured_gib']:.2f} GiB, traced {row['traced_gib']:.2f} GiB")
sys.exit(0 if check["ok"] else 1)
PY
echo "gpu-check: done in $((SECONDS - started)) s; $out/gpu-check.json, $out/gpu-check.log"
