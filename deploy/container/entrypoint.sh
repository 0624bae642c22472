#!/bin/sh
# ckptsync sidecar entrypoint (torch-free image).
#
#   ckptsync-sidecar watch [FLAGS...]   run the daemon on $CKPTSYNC_LOCAL_DIR (default mode)
#   ckptsync-sidecar pull               restore the newest valid checkpoint into
#                                       $CKPTSYNC_LOCAL_DIR before the trainer starts; a run
#                                       that holds no checkpoint yet is a fresh start (exit 0),
#                                       and so is a prefix that holds nothing at all when
#                                       CKPTSYNC_ALLOW_EMPTY=1 (a run's first pod); otherwise
#                                       such a prefix (a typo?) stops the pod (exit 1)
#
# Environment: CKPTSYNC_LOCAL_DIR (the shared volume), CKPTSYNC_REMOTE (the run's URL),
# optional CKPTSYNC_STORAGE_OPTIONS (JSON), CKPTSYNC_KEEP_LAST, CKPTSYNC_RULES, ... (see
# `ckptsync watch --help`) and the backend's own credential variables. Every ckptsync command
# reads these from the environment: nothing secret is ever passed as an argument.
#
# `watch` execs the daemon, so it receives SIGTERM directly (no shell in between): it finishes
# in-flight uploads within CKPTSYNC_STOP_TIMEOUT, or abandons them uncommitted, and exits 0.
set -eu

: "${CKPTSYNC_LOCAL_DIR:?set CKPTSYNC_LOCAL_DIR to the checkpoint volume, e.g. /ckpt}"
: "${CKPTSYNC_REMOTE:?set CKPTSYNC_REMOTE to the run URL, e.g. s3://bucket/run-17}"
mkdir -p "$CKPTSYNC_LOCAL_DIR"

mode="${1:-watch}"
[ $# -gt 0 ] && shift

case "$mode" in
watch)
    exec ckptsync watch "$CKPTSYNC_LOCAL_DIR" "$CKPTSYNC_REMOTE" "$@"
    ;;
pull)
    # ckptsync reads CKPTSYNC_STORAGE_OPTIONS from the environment itself: never turn it into
    # -o arguments, which `ps` shows to every user of the node. Exit 5 is "nothing to pull: a
    # fresh start"; any other failure (an unreachable remote, a typo'd prefix) stops the pod's
    # init with its exit code, never a silent fresh start over a run it could not see.
    status=0
    ckptsync pull "$CKPTSYNC_REMOTE" "$CKPTSYNC_LOCAL_DIR" --no-progress "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        echo "ckptsync-sidecar: no checkpoint in $CKPTSYNC_REMOTE yet: a fresh start"
        exit 0
    fi
    exit "$status"
    ;;
*)
        echo "ckptsync-sidecar: no checkpoint in $CKPTSYNC_REMOTE yet: a fresh start"
        exit 0
        ;;
    esac
    exec ckptsync pull "$CKPTSYNC_REMOTE" "$CKPTSYNC_LOCAL_DIR" --no-progress "$@"
    ;;
*)
    echo "ckptsync-sidecar: unknown mode '$mode' (expected watch or pull)" >&2
    exit 2
    ;;
esac
