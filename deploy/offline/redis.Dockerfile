# Stand-in for the public `redis:7` image, for machines that cannot pull from a registry: Debian's
# redis-server (7.0) on the local base image. Built by scripts/offline-images.sh.
ARG BASE_IMAGE=rcgrpo-offline/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
# Like the official image: the working directory /data holds the append-only file, as user redis.
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["tini", "--"]
CMD ["redis-server"]
