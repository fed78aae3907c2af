#!/usr/bin/env bash
# Builds one of the project's images and tags it nlstm:TARGET (docs/deploy.md).
#
#   deploy/build-image.sh serve-cpu|serve-gpu|train|redis [--local-base] [-- DOCKER_BUILD_ARGS...]
#
#   serve-cpu  the serving image on onnxruntime (Dockerfile, VARIANT=cpu)
#   serve-gpu  the serving image on onnxruntime-gpu over NVIDIA's CUDA 13 + cuDNN 9 runtime
#   train      the training image with torch (Dockerfile.train)
#   redis      docker-compose.yml's session store: Debian's redis-server (deploy/redis/Dockerfile)
#
# Before building, it makes sure each base image is here: already present, or pulled. When a
# base cannot be pulled (no registry reachable), it says so and stops, unless --local-base (or
# NLSTM_LOCAL_BASE=1) is given: then deploy/local-base.sh builds the same base from Debian
# packages under the same tag, so the Dockerfiles stay ordinary. Only python:3.11-slim has such a
# recipe (it is also the base of the redis image, which installs Debian's redis-server on it);
# NVIDIA's CUDA base must come from a registry (or `docker load`).
#
# Settings: PYTHON_VERSION (3.11), CUDA_IMAGE (the GPU base), DOCKER (the docker command).
# Any arguments after `--` go to `docker build` (e.g. --build-arg ORT_VERSION=..., --no-cache).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
CUDA_IMAGE=${CUDA_IMAGE:-nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04}
LOCAL_BASE=${NLSTM_LOCAL_BASE:-0}

die() { echo "build-image: $*" >&2; exit 1; }
usage() { sed -n '4,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

target="" extra=()
while (($#)); do
    case $1 in
        serve-cpu|serve-gpu|train|redis) [[ -z $target ]] || usage; target=$1 ;;
        --local-base) LOCAL_BASE=1 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) usage ;;
        *) echo "build-image: unknown argument $1" >&2; usage ;;
    esac
    shift
done
[[ -n $target ]] || usage

python_base="python:$PYTHON_VERSION-slim"
context=.
case $target in
    serve-cpu)
        bases=("$python_base")
        build=(-f Dockerfile --build-arg "PYTHON_VERSION=$PYTHON_VERSION" --build-arg VARIANT=cpu) ;;
    serve-gpu)
        bases=("$python_base" "$CUDA_IMAGE")
        build=(-f Dockerfile --build-arg "PYTHON_VERSION=$PYTHON_VERSION" --build-arg VARIANT=gpu
               --build-arg "BASE_IMAGE=$CUDA_IMAGE") ;;
    train)
        bases=("$python_base")
        build=(-f Dockerfile.train --build-arg "PYTHON_VERSION=$PYTHON_VERSION") ;;
    redis)
        bases=("$python_base")
        context=deploy/redis
        build=(-f deploy/redis/Dockerfile --build-arg "PYTHON_VERSION=$PYTHON_VERSION") ;;
esac

"$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers ('$DOCKER info' fails): start dockerd, or set DOCKER_HOST"

for base in "${bases[@]}"; do
    if local=$("$DOCKER" image inspect --format '{{ index .Config.Labels "org.nlstm.local-base" }}' "$base" 2>/dev/null); then
        # a local stand-in is brought up to date when its recipe changed (a no-op otherwise)
        [[ -z $local || $local == "<no value>" ]] || deploy/local-base.sh --for-image "$base"
        continue
    fi
    echo "build-image: pulling $base" >&2
    if pull_log=$("$DOCKER" pull -q "$base" 2>&1); then
        continue
    fi
    echo "build-image: cannot pull $base: ${pull_log##*$'\n'}" >&2
    if [[ $LOCAL_BASE != 1 ]]; then
        die "rerun with --local-base (or NLSTM_LOCAL_BASE=1) to build $base from Debian packages" \
            "(deploy/local-base.sh), or docker load it"
    fi
    deploy/local-base.sh --for-image "$base"
done

echo "build-image: docker build ${build[*]} ${extra[*]} -t nlstm:$target $context" >&2
start=$SECONDS
"$DOCKER" build "${build[@]}" "${extra[@]}" -t "nlstm:$target" "$context"
echo "build-image: built nlstm:$target in $((SECONDS - start)) s" >&2
