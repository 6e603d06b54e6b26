#!/usr/bin/env bash
# The README's Quickstart: `scripts/dev.sh train` runs the main job, `scripts/dev.sh test` the tests.
# On first use it creates .venv and installs the project (CPU torch pinned; set TORCH_INDEX_URL to
# take another build of the same torch version, e.g. https://download.pytorch.org/whl/cu128).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RCGRPO_VENV:-.venv}
if [ ! -x "$venv/bin/rcgrpo" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
  echo "installing rcgrpo into $venv (first run only)..." >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
  "$venv/bin/python" -m pip install -q -e ".[test]"
  touch "$venv/.installed"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  train) exec "$venv/bin/rcgrpo" train "$@" ;;
  test) exec "$venv/bin/python" -m pytest "$@" ;;
  lint) exec "$venv/bin/ruff" check . ;;
  *) echo "usage: scripts/dev.sh train|test|lint [args...]" >&2; exit 2 ;;
esac
