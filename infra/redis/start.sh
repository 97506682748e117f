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
if command -v docker-entrypoint.sh >/dev/null 2>&1; then
  exec docker-entrypoint.sh redis-server --aclfile "$users" "$@"   # drops root as the image always does
fi
exec redis-server --aclfile "$users" "$@"
