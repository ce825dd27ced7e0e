#!/bin/sh
# Container entrypoint snippet: mount cstokenfs for the user who will run the container's
# command, then exec that command. Run as root.
#
#   ENTRYPOINT ["/usr/local/bin/cstokenfs-entrypoint.sh"]
#   CMD ["bash"]
#
# Settings (environment):
#   CSTOKEN_MOUNT  mount point                      (default /run/cstoken)
#   CSTOKEN_UID    owner of the token files         (default 1000)
#   CSTOKEN_GID    group of the token files         (default: CSTOKEN_UID's primary group, else 1000)
#   CSTOKEN_MODE   mode of the token files          (default 0400)
#   CSTOKEN_ARGS   more `cstokenfs mount` flags     (e.g. "--resource management.azure.com")
#   CSTOKEN_LOG    log file                         (default /var/log/cstokenfs.log)
set -eu
mnt=${CSTOKEN_MOUNT:-/run/cstoken}
uid=${CSTOKEN_UID:-1000}
gid=${CSTOKEN_GID:-$(id -g "$uid" 2>/dev/null || echo 1000)}
mkdir -p "$mnt"
# shellcheck disable=SC2086 # CSTOKEN_ARGS is a list of flags
cstokenfs mount --allow-other --uid "$uid" --gid "$gid" --mode "${CSTOKEN_MODE:-0400}" \
  --log-file "${CSTOKEN_LOG:-/var/log/cstokenfs.log}" ${CSTOKEN_ARGS:-} "$mnt"
exec "$@"
