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
wheels=wheelhouse/gpu-check
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
# The project's pins, without torch (the GPU machine's CUDA build stays) and the cluster-only parts
# (Ray, the servers): what rcgrpo.editor / lora / train_step / trace and bench/ import.
packages=(diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 safetensors==0.8.0
  pydantic==2.14.4 "numpy>=1.26" "pillow>=10" "tqdm>=4.66" "pyyaml>=6")

if [ "$mode" = download ]; then
  mkdir -p "$wheels"
  # their dependencies too, but not torch: a pip resolve would pull a multi-GB CUDA torch. The list is
  # what these packages require (importlib.metadata on an installed venv), pinned to the tested versions.
  "$python" -m pip download -q --only-binary=:all: --no-deps -d "$wheels" "${packages[@]}" \
    annotated-types==0.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 filelock==4.3.2 \
    fsspec==2026.9.0 hf-xet==1.8.0 huggingface-hub==2.5.0 idna==3.21 importlib-metadata==10.2.0 \
    packaging==26.4 psutil==7.2.2 pydantic-core==2.50.5 regex==2026.12.2 requests==2.34.2 \
    tokenizers==0.23.3 typing-extensions==4.16.0 typing-inspection==0.4.5 urllib3==2.8.0 zipp==4.1.2 \
    annotated-doc==0.0.7 anyio==4.16.0 click==8.5.1 h11==0.16.0 httpcore2==2.17.0 httpx2==2.17.0 \
    lazy-importer==0.1.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 rich==15.0.0 \
    shellingham==1.5.4 truststore==0.10.5 typer==0.29.3 \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  echo "gpu-check: $(ls "$wheels"/*.whl | wc -l) wheels, $(du -sh "$wheels" | cut -f1) in $wheels"
  exit 0
fi

mkdir -p "$out"
log="$out/gpu-check.log"
exec > >(tee "$log") 2>&1
started=$SECONDS
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu-check ($mode) $(date -u +%FT%TZ) on $(hostname), out $out"

if [ "$mode" = gpu ]; then
  [ -d "$wheels" ] || { echo "gpu-check: $wheels is missing: run scripts/gpu-check.sh --download where an index is reachable, and carry it" >&2; exit 2; }
  # a venv over the system site-packages: the machine's CUDA torch stays, the carried wheels go on top
  # (outside --out, whose files are what comes back)
  venv=$(mktemp -d)/venv
  "$python" -m venv --system-site-packages "$venv"
  python="$venv/bin/python"
  "$python" -m pip install -q --no-index --find-links "$wheels" "${packages[@]}"
  "$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
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
echo "gpu-check: done in $((SECONDS - started)) s; $out/gpu-check.json, $log"
