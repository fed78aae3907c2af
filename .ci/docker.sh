#!/usr/bin/env bash
# CI, the Docker part (issue 16): installs from Debian what tests/test_docker.py needs when it is
# missing: the engine (docker.io, containerd, runc, iptables), debootstrap for the local base
# images (deploy/local-base.sh) and compose (Debian's docker-compose, unless the docker CLI has
# the compose plugin). The test starts its own dockerd and stops it; nothing is started here.
# Exits non-zero when it cannot install them, so that CI never skips the images quietly.
set -euo pipefail

need=()
for tool in dockerd:docker.io docker:docker.io containerd:containerd runc:runc iptables:iptables \
            debootstrap:debootstrap; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
    need+=(docker-compose)
fi
if ((${#need[@]} == 0)); then
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo ".ci/docker.sh: not root, cannot install ${need[*]}" >&2
    exit 1
fi
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
echo ".ci/docker.sh: installing ${need[*]}" >&2
# No service may start on install (a machine with systemd would start a dockerd of its own on
# the default socket and bridge): policy-rc.d says no while apt runs, then goes.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
