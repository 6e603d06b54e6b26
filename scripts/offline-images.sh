#!/usr/bin/env bash
# Local images for machines that cannot pull from a registry (air-gapped clusters, CI sandboxes):
#   rcgrpo-offline/debian:bookworm   Debian 12 minbase with python3 (3.11), venv, curl, tini, built
#                                    with debootstrap from a Debian mirror: the rcgrpo image's BASE_IMAGE
#   rcgrpo-offline/redis:7           Debian's redis-server 7.0, standing in for redis:7
#   rcgrpo-offline/prometheus:2      Debian's prometheus 2.42, standing in for prom/prometheus
# docker-compose.offline.yml uses them. Images already present are kept (--rebuild makes them again).
# Grafana has no Debian package, so it has no stand-in (the offline compose file leaves it out).
#
#   scripts/offline-images.sh [--rebuild]     (root: debootstrap and a Docker engine)
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), DEBIAN_SUITE (default bookworm).
set -euo pipefail
cd "$(dirname "$0")/.."
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=${DEBIAN_SUITE:-bookworm}
base=rcgrpo-offline/debian:$suite
rebuild=0
[ "${1:-}" = "--rebuild" ] && rebuild=1

have() { [ "$rebuild" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }

if have "$base"; then
  echo "offline-images: $base present"
else
  command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/rcgrpo-rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  echo "offline-images: debootstrap $suite from $mirror (a few minutes, ~300 MB)"
  started=$SECONDS
  debootstrap --variant=minbase --include=python3,python3-venv,curl,ca-certificates,tini \
    "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
  rm -f "$rootfs.log"
  # apt inside the image: the same mirror, with stable updates and security fixes; no package caches.
  cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} $suite-security main
SOURCES
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["bash"]' - "$base" >/dev/null
  echo "offline-images: $base built in $((SECONDS - started)) s"
fi

for name in redis prometheus; do
  tag=$( [ "$name" = redis ] && echo 7 || echo 2 )
  image=rcgrpo-offline/$name:$tag
  if have "$image"; then
    echo "offline-images: $image present"
  else
    started=$SECONDS
    DOCKER_BUILDKIT=0 docker build -q --build-arg BASE_IMAGE="$base" -t "$image" \
      -f "deploy/offline/$name.Dockerfile" deploy/offline >/dev/null
    echo "offline-images: $image built in $((SECONDS - started)) s"
  fi
done
