# Stand-in for the public `prom/prometheus` image, for machines that cannot pull from a registry:
# Debian's prometheus (2.42) on the local base image. Built by scripts/offline-images.sh.
ARG BASE_IMAGE=rcgrpo-offline/debian:bookworm
FROM ${BASE_IMAGE}
# wget: the compose healthcheck calls it, as in the official (busybox) image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
WORKDIR /prometheus
USER prometheus
EXPOSE 9090
# Like the official image: the entrypoint is prometheus itself, so compose's `command:` is its flags.
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
