#!/usr/bin/env bash
# Builds, from Debian bookworm packages, a stand-in for a base image that cannot be pulled (an
# air-gapped host, or one that reaches package mirrors but no container registry), and imports
# it under the tag the Dockerfile or docker-compose.yml expects, so that those files stay
# ordinary. docs/deploy.md ("Building without a registry") says when to use it.
#
#   deploy/local-base.sh python      [--tag python:3.11-slim]          # the images' Python base
#   deploy/local-base.sh prometheus  [--tag prom/prometheus:v3.5.0]    # Debian's prometheus
#   deploy/local-base.sh --for-image IMAGE    # the recipe that stands in for IMAGE, tagged IMAGE
#
# Needs root (debootstrap) and a Docker engine (`docker`, or $DOCKER). Each image is labelled
# org.nlstm.local-base=RECIPE-KEY, where KEY hashes everything that goes into it; an image with
# the current label is left alone. Root filesystems are kept as tarballs in the cache
# ($NLSTM_LOCAL_BASE_CACHE, default ~/.cache/nlstm/local-base): the Debian minbase with its
# updates, which every recipe starts from (debootstrapped once: the slow part, minutes), and each
# recipe's, so that a later run, or a fresh Docker engine, imports it in seconds instead of
# bootstrapping again. A recipe installs its packages on that base with the current lists, so it
# has the updates published since. A changed recipe or mirror replaces its tarball.
#
# Settings: NLSTM_DEBIAN_MIRROR (default: the host's Debian mirror from /etc/apt, else
# deb.debian.org), NLSTM_DEBIAN_SECURITY (likewise for bookworm-security). The python image's
# /etc/pip.conf points pip at the host's index (PIP_INDEX_URL or `pip config`, else PyPI) and its
# http(s) extra indexes, with the host's certificate bundle; file:// indexes are left out (a
# container cannot see the host's folders) and the script says so.
set -euo pipefail

SUITE=bookworm
# Bumped when the recipes change in a way the key below cannot see (each recipe has its own
# revision too, below, so that changing one does not rebuild the other).
RECIPE_VERSION=3
DOCKER=${DOCKER:-docker}
CACHE=${NLSTM_LOCAL_BASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nlstm/local-base}

die() { echo "local-base: $*" >&2; exit 1; }
say() { echo "local-base: $*" >&2; }

usage() {
    sed -n '7,9p' "$0" | sed 's/^#   //' >&2
    exit 2
}

# ------------------------------------------------------------------------------- arguments
recipe="" tag=""
while (($#)); do
    case $1 in
        python|prometheus) recipe=$1 ;;
        --tag) tag=${2:?--tag needs an image name}; shift ;;
        --for-image)
            tag=${2:?--for-image needs an image name}; shift
            case ${tag%%:*} in
                python|library/python|docker.io/library/python) recipe=python ;;
                prom/prometheus|docker.io/prom/prometheus) recipe=prometheus ;;
                *) die "no Debian recipe stands in for $tag (recipes: python, prometheus)" ;;
            esac ;;
        -h|--help) usage ;;
        *) echo "local-base: unknown argument $1" >&2; usage ;;
    esac
    shift
done
[[ -n $recipe ]] || usage
case $recipe in
    python) tag=${tag:-python:3.11-slim} ;;
    prometheus) tag=${tag:-prom/prometheus:v3.5.0} ;;
esac
# Bookworm's python3 is 3.11: it can stand in for python:3.11-* only.
if [[ $recipe == python && ${tag#*:} != 3.11* ]]; then
    die "$tag: Debian $SUITE's python3 is 3.11, so the local base can only stand in for python:3.11-*" \
        "(build with PYTHON_VERSION=3.11, or make the base reachable)"
fi
[[ $(id -u) == 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
"$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers ('$DOCKER info' fails)"

# ------------------------------------------------------------------------- host's sources
# The first Debian (and security) URI of the host's apt sources, deb822 or one-line format.
host_uri() {  # $1: a regex the suite must match
    local files=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list)
    awk -v want="$1" '
        /^URIs:/ { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i ~ want && uri != "") { print uri; exit } }
        /^deb / { for (i = 2; i < NF; i++) if ($i ~ /^(http|https|file):/ && $(i+1) ~ want) { print $i; exit } }
    ' "${files[@]}" 2>/dev/null | head -n1
}
MIRROR=${NLSTM_DEBIAN_MIRROR:-$(host_uri "^$SUITE\$")}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${NLSTM_DEBIAN_SECURITY:-$(host_uri "^$SUITE-security\$")}
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}

# ---------------------------------------------------------------------------- the recipes
# Each recipe: the packages, a step run on the root filesystem, and the image's settings
# (`docker import --change`), chosen to behave like the image it stands in for.
pip_conf=""
case $recipe in
    python)
        packages=python3,python3-venv,python3-pip,ca-certificates
        revision=""  # none yet
        # pip's view of the host's index, as pip itself reports it (env and config files)
        index=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
        index=${index:-https://pypi.org/simple}
        extras=${PIP_EXTRA_INDEX_URL:-$(python3 -m pip config get global.extra-index-url 2>/dev/null || true)}
        cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
        kept=()
        for url in $extras; do
            case $url in
                http://*|https://*) kept+=("$url") ;;
                *) say "leaving out pip's extra index $url: a container cannot reach it" ;;
            esac
        done
        case $index in http://*|https://*) ;; *) die "pip's index $index is not reachable from a container: set PIP_INDEX_URL to an http(s) index" ;; esac
        pip_conf="[global]"$'\n'"index-url = $index"$'\n'
        ((${#kept[@]})) && pip_conf+="extra-index-url = ${kept[*]}"$'\n'
        [[ -n $cert && -f $cert ]] && pip_conf+="cert = /etc/ssl/certs/pip-index.crt"$'\n'
        changes=(
            'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
            'ENV LANG=C.UTF-8'
            'CMD ["python3"]'
        )
        ;;
    prometheus)
        packages=prometheus,ca-certificates
        revision=2
        changes=(
            'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
            # as prom/prometheus: runs as nobody in /prometheus, flags after the entrypoint
            'USER nobody'
            'WORKDIR /prometheus'
            'EXPOSE 9090'
            'ENTRYPOINT ["/usr/bin/prometheus"]'
            'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
        )
        ;;
esac

# Two stages, each a tarball in the cache: "debian" (a minbase debootstrap of the suite with its
# updates, shared by the recipes: the slow part, done once) and the recipe's (that, with the
# recipe's packages installed and set up).
hash16() { printf '%s' "$1" | sha256sum | cut -c1-16; }
debian_label="debian-$(hash16 "$RECIPE_VERSION $SUITE $MIRROR $SECURITY")"
key_input="$RECIPE_VERSION${revision:+.$revision} $debian_label $packages $pip_conf ${changes[*]}"
[[ -n ${cert:-} && -f ${cert:-} ]] && key_input+=" $(sha256sum "$cert")"
label="$recipe-$(hash16 "$key_input")"

have=$("$DOCKER" image inspect --format '{{ index .Config.Labels "org.nlstm.local-base" }}' "$tag" 2>/dev/null || true)
if [[ $have == "$label" ]]; then
    say "$tag is the current local $recipe base ($label)"
    exit 0
fi

mkdir -p "$CACHE"
tarball="$CACHE/$label.tar"
debian_tarball="$CACHE/$debian_label.tar"
root=""
cleanup() { [[ -z $root ]] || rm -rf "$root" "$root.log"; }
trap cleanup EXIT
in_root() {  # $1: what it does (for the messages), then the command, run in the chroot
    local what=$1; shift
    chroot "$root" "$@" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; die "$what failed (log above)"; }
}
new_root() {
    root=$(mktemp -d "${TMPDIR:-/tmp}/nlstm-local-base.XXXXXX")
    chmod 755 "$root"  # it becomes the image's /: mktemp's 0700 would lock out every user but root
}
# What slim images leave out: package lists, downloaded .debs, documentation.
slim_root() {
    chroot "$root" apt-get -qq clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
        "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
}
save_root() {  # $1: the tarball; older tarballs of the same stage go
    tar --numeric-owner -C "$root" -cf "$1.tmp" .
    mv "$1.tmp" "$1"  # atomic: a killed run leaves no half tarball under the name
    local old
    for old in "${1%-*}"-*.tar; do [[ $old == "$1" ]] || rm -f "$old"; done
    rm -rf "$root" "$root.log"
    root=""
}

if [[ ! -f $tarball ]]; then
    # ------------------------------------------------------------- the shared Debian stage
    exec 9>"$CACHE/.debian.lock"
    flock 9  # two recipes made at once bootstrap Debian once
    if [[ ! -f $debian_tarball ]]; then
        new_root
        say "debootstrap $SUITE (minbase) from $MIRROR"
        debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
            || { tail -n 30 "$root.log" >&2; die "debootstrap failed (log above)"; }
        # Security updates: debootstrap installs the suite's point release only.
        printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
            "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SECURITY" "$SUITE" >"$root/etc/apt/sources.list"
        say "applying $SUITE-updates and $SUITE-security"
        in_root "the upgrade" sh -c 'apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq -y upgrade'
        slim_root
        save_root "$debian_tarball"
    fi
    exec 9>&-

    # ---------------------------------------------------------------------- the recipe
    new_root
    tar --numeric-owner -C "$root" -xf "$debian_tarball"
    say "installing ${packages//,/ } on $debian_label"
    # the lists again, and updates published since the Debian stage was made
    in_root "installing ${packages//,/ }" sh -c "apt-get -qq update \
        && DEBIAN_FRONTEND=noninteractive apt-get -qq -y upgrade \
        && DEBIAN_FRONTEND=noninteractive apt-get -qq -y install --no-install-recommends ${packages//,/ }"
    if [[ -n $pip_conf ]]; then
        printf '%s' "$pip_conf" >"$root/etc/pip.conf"
        [[ -n ${cert:-} && -f ${cert:-} ]] && cp "$cert" "$root/etc/ssl/certs/pip-index.crt"
    fi
    if [[ $recipe == prometheus ]]; then
        # Upstream keeps its data in data/ under the working directory (/prometheus/data in
        # the official image); Debian's build defaults to /var/lib/prometheus/metrics2. Point
        # that at the upstream place, so that flags written for the official image (compose's
        # only set --config.file) and a volume on /prometheus work the same here.
        mkdir -p "$root/prometheus/data"
        rm -rf "$root/var/lib/prometheus/metrics2"
        ln -s /prometheus/data "$root/var/lib/prometheus/metrics2"
        chroot "$root" chown -R nobody:nogroup /prometheus
    fi
    slim_root
    save_root "$tarball"
fi

args=()
for change in "${changes[@]}"; do args+=(--change "$change"); done
args+=(--change "LABEL org.nlstm.local-base=$label")
args+=(--change "LABEL org.opencontainers.image.description=\"Local stand-in for $tag, from Debian $SUITE packages by deploy/local-base.sh\"")
"$DOCKER" import "${args[@]}" "$tarball" "$tag" >/dev/null
say "imported $tag ($label) from $tarball"
