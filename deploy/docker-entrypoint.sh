#!/bin/sh
# Raises the open-file soft limit to the hard limit before starting `courier`: a node holds one socket per
# device link, and container runtimes often start processes with a soft limit of 1024. A non-root
# process may raise its soft limit up to the hard limit, never past it; the hard limit comes from the
# container runtime (see README, "File descriptors"). COURIER_MIN_NOFILE (default 0: no check) names the
# least this process needs; below it we say so loudly, and still start, since --max-links refuses
# links beyond capacity instead of failing accept().
set -eu
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ]; then
    ulimit -n 1048576 2>/dev/null || true
else
    ulimit -n "$hard"
fi
soft=$(ulimit -n)
need=${COURIER_MIN_NOFILE:-0}
if [ "$soft" != unlimited ] && [ "$soft" -lt "$need" ]; then
    echo "courier-entrypoint: open-file limit is $soft, below COURIER_MIN_NOFILE=$need;" \
        "raise the container runtime's LimitNOFILE or lower COURIER_MAX_LINKS" >&2
fi
exec /usr/local/bin/courier "$@"
