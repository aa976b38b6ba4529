# One image for every pgwarden container of docker-compose.yml: etcd members, node agents
# (with PostgreSQL 15), control planes, proxies, and the set-up and load-generator steps.
# The base is built from Debian packages by docker/base.sh (debootstrap, no registry); the
# binaries are the release builds of this checkout (scripts/compose.sh builds both first):
#   cargo build --release -p pgwarden-control -p pgwarden-proxy --bins
#   docker/base.sh && docker build -t pgwarden:dev .
FROM pgwarden-base:bookworm
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
COPY target/release/pgwarden target/release/pgwarden-proxy /usr/local/bin/
COPY docker/entrypoint.sh /usr/local/bin/pgwarden-entrypoint
ENTRYPOINT ["/usr/local/bin/pgwarden-entrypoint"]
