#!/usr/bin/env bash
# CI's Docker engine for the `docker` tests (.ci/run's second step):
#
#   .ci/dockerd.sh start DIR   # dockerd on unix://DIR/docker.sock; prints that address
#   .ci/dockerd.sh stop DIR    # SIGTERM (it stops its containers), then kills what is left
#
# As root. Storage: overlay2 where the kernel allows it, else vfs (works anywhere, but copies
# the whole filesystem for every layer and build step: a build takes several times as long;
# docs/deploy.md has the figures). NLSTM_DOCKER_STORAGE_DRIVERS changes the order ("vfs": vfs
# only). The data root (NLSTM_DOCKER_ROOT, default /var/lib/nlstm-test-docker) is the one the
# tests use when they start a dockerd of their own, and outlives the run: a later run on the same
# machine finds the local bases and the build cache there. dockerd runs in a process group of
# its own (setsid), so that stop ends it and everything it started, and nothing else.
set -euo pipefail

cmd=${1:?usage: .ci/dockerd.sh start|stop DIR}
dir=${2:?usage: .ci/dockerd.sh start|stop DIR}
root=${NLSTM_DOCKER_ROOT:-/var/lib/nlstm-test-docker}
socket=$dir/docker.sock
pidfile=$dir/dockerd.pid

stop() {
    [[ -f $pidfile ]] || return 0
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    kill -KILL -- "-$pid" 2>/dev/null || true  # its group: containerd, shims
    rm -f "$pidfile"
}

case $cmd in
    start)
        mkdir -p "$dir"
        for driver in $(echo "${NLSTM_DOCKER_STORAGE_DRIVERS:-overlay2,vfs}" | tr ',' ' '); do
            log=$dir/dockerd-$driver.log
            setsid dockerd --storage-driver="$driver" --data-root="$root" --exec-root="$dir/exec" \
                --host="unix://$socket" --pidfile="$dir/dockerd-own.pid" >"$log" 2>&1 </dev/null &
            echo $! >"$pidfile"
            for _ in $(seq 180); do
                if DOCKER_HOST="unix://$socket" docker info >/dev/null 2>&1; then
                    echo ".ci/dockerd.sh: dockerd --storage-driver=$driver on unix://$socket" >&2
                    echo "unix://$socket"
                    exit 0
                fi
                kill -0 "$(cat "$pidfile")" 2>/dev/null || break
                sleep 0.5
            done
            echo ".ci/dockerd.sh: dockerd --storage-driver=$driver did not start:" >&2
            tail -n 15 "$log" >&2
            stop
        done
        exit 1 ;;
    stop) stop ;;
    *) echo "usage: .ci/dockerd.sh start|stop DIR" >&2; exit 2 ;;
esac
