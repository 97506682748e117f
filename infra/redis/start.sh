#!/bin/sh
# Start Redis with its users from an ACL file made at every start: the default user (REDIS_PASSWORD,
# for workers, the dispatcher, the dashboard and Flower) plus each producer's user from producers.acl
# (`darkroom producers acl ID --file-format`). An ACL file replaces --requirepass, so the default user is
# written here; a placeholder or empty REDIS_PASSWORD stops the start.
set -eu
case "${REDIS_PASSWORD:-}" in
  ""|*change-me*|*CHANGE_ME*|*changeme*) echo "REDIS_PASSWORD is a placeholder; set a real secret (e.g. openssl rand -hex 24) in .env" >&2; exit 1;;
esac
umask 077
users="${ACL_FILE:-/data/users.acl}"   # in the image's data folder: its entrypoint hands it to the redis user
echo "user default on >${REDIS_PASSWORD} ~* &* +@all" > "$users"
if [ -f "${PRODUCERS_ACL:-/etc/darkroom/producers.acl}" ]; then
  grep '^user ' "${PRODUCERS_ACL:-/etc/darkroom/producers.acl}" | grep -v '^user default ' >> "$users" || true
fi
# Under Sentinel (SENTINEL_HOST set; docker-compose.sentinel.yml, infra/k8s/overlays/sentinel): follow the
# primary the Sentinels name, else REDIS_INITIAL_PRIMARY, unless that is this node (REDIS_ANNOUNCE_HOST);
# masterauth on every node, as any may become a replica after a failover.
if [ -n "${SENTINEL_HOST:-}" ]; then
  primary=$(redis-cli -h "$SENTINEL_HOST" -p "${SENTINEL_PORT:-26379}" -a "$REDIS_PASSWORD" --no-auth-warning \
    sentinel get-master-addr-by-name "${SENTINEL_MASTER:-darkroom}" 2>/dev/null | head -n 1) || primary=""
  primary="${primary:-${REDIS_INITIAL_PRIMARY:-}}"
  if [ -n "$primary" ] && [ "$primary" != "${REDIS_ANNOUNCE_HOST:-}" ]; then
    set -- "$@" --replicaof "$primary" 6379
  fi
  set -- "$@" --masterauth "$REDIS_PASSWORD" ${REDIS_ANNOUNCE_HOST:+--replica-announce-ip "$REDIS_ANNOUNCE_HOST"}
fi
if command -v docker-entrypoint.sh >/dev/null 2>&1; then
  exec docker-entrypoint.sh redis-server --aclfile "$users" "$@"   # drops root as the image always does
fi
exec redis-server --aclfile "$users" "$@"
