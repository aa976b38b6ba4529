#!/usr/bin/env bash
# Builds the base image `pgwarden-base:bookworm` from Debian packages, with no image registry:
# debootstrap makes a Debian 12 root file system with what every pgwarden container needs
# (PostgreSQL 15 server and clients, etcd, iproute2 and arping for the proxies' virtual IP,
# curl for health checks), and `docker import` turns it into an image. The root file system is
# kept as a tarball in the cache: built once per machine (about a minute), imported again when
# the image is missing. Rerunning does nothing when the image exists.
set -euo pipefail

image=pgwarden-base:bookworm
cache="${PGWARDEN_CACHE:-/var/cache/pgwarden}/docker"
tarball="$cache/base-bookworm.tar"
mirror="${PGWARDEN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages=postgresql-15,postgresql-client-15,etcd-server,etcd-client,iproute2,iputils-arping,curl,jq,ca-certificates,procps

if docker image inspect "$image" >/dev/null 2>&1; then
  exit 0
fi
if [ ! -s "$tarball" ]; then
  echo "base image: debootstrap of Debian 12 with $packages (once per machine)"
  mkdir -p "$cache"
  root="$(mktemp -d "$cache/rootfs.XXXXXX")"
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" \
    >"$cache/debootstrap.log" 2>&1 || {
    tail -n 20 "$cache/debootstrap.log" >&2
    exit 1
  }
  # The cluster Debian's package makes on install is not ours: agents create their own.
  rm -rf "$root/etc/postgresql/15/main" "$root/var/lib/postgresql/15/main"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
fi
echo "base image: importing $tarball as $image"
docker import "$tarball" "$image" >/dev/null
