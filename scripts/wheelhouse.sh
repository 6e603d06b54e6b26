#!/usr/bin/env bash
# Fill wheelhouse/ with every wheel the rcgrpo image installs, so `docker build --build-arg OFFLINE=1`
# needs no package index (air-gapped clusters, or a build whose container cannot verify the index's TLS).
# Runs `pip download` on this host, with this host's pip configuration (index, proxy, CA bundle), for
# the image's platform: CPython 3.11 on Linux x86_64 with glibc 2.36 (Debian 12, python:3.11-slim).
#
#   scripts/wheelhouse.sh                                               # torch from the default index
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 scripts/wheelhouse.sh   # the CUDA build
#
# A wheelhouse made for another TORCH_INDEX_URL or another pyproject.toml is replaced; a current one is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=wheelhouse
pip=${PYTHON:-python3}
torch=$("$pip" -c "import tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith('torch==')))")
stamp="$torch ${TORCH_INDEX_URL:-default-index} $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$dest/.complete" ] && [ "$(cat "$dest/.complete")" = "$stamp" ]; then
  echo "wheelhouse: up to date ($(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1))"
  exit 0
fi
find "$dest" -name '*.whl' -delete
rm -f "$dest/.complete"
# The image's wheel tags: binary wheels only, manylinux up to glibc 2.36.
platform_flags=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none
  --platform manylinux2014_x86_64)
for minor in $(seq 17 36); do platform_flags+=(--platform "manylinux_2_${minor}_x86_64"); done
# pip download for the image's platform, without pip's notes about absent local index directories
download() { "$pip" -m pip download -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
# The project's dependencies and its build requirements (the image installs the project with them).
"$pip" -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" \
  | grep -v '^torch==' >"$requirements"
started=$SECONDS
echo "wheelhouse: downloading $torch${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} and the project's dependencies"
# torch first, from its index; then the rest, with that torch in the wheelhouse satisfying it.
download --dest "$dest" "${platform_flags[@]}" \
  ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch"
download --dest "$dest" "${platform_flags[@]}" --find-links "$dest" \
  -r "$requirements" "$torch"
# pip evaluates markers against this host's Python, not the image's: Debian 12's python3 is 3.11.2, so
# requirements such as `async-timeout; python_full_version < "3.11.3"` (redis) are added here.
for _ in 1 2 3; do
  missing=$("$pip" - "$dest" <<'PY'
import sys, zipfile
from pathlib import Path
try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

wheels = list(Path(sys.argv[1]).glob("*.whl"))
have = {canonicalize_name(w.name.split("-")[0]) for w in wheels}
target = default_environment() | {"python_full_version": "3.11.0", "python_version": "3.11",
                                  "sys_platform": "linux", "platform_machine": "x86_64"}
missing = set()
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist: "):
            req = Requirement(line.removeprefix("Requires-Dist: "))
            wanted = req.marker is None or req.marker.evaluate(target | {"extra": ""})
            if wanted and canonicalize_name(req.name) not in have:
                missing.add(str(req.name) + str(req.specifier))
print("\n".join(sorted(missing)))
PY
)
  [ -z "$missing" ] && break
  echo "wheelhouse: adding what the image's Python 3.11 also needs: $(echo $missing)"
  # shellcheck disable=SC2086
  download --dest "$dest" "${platform_flags[@]}" --find-links "$dest" $missing
done
echo "$stamp" >"$dest/.complete"
echo "wheelhouse: $(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1), in $((SECONDS - started)) s"
