# syntax=docker/dockerfile:1
#
# Images of the project (docs/deploy.md says how to run them):
#
#   docker build -t nlstm-serve .                                  # serving, CPU (the default)
#   docker build --build-arg VARIANT=gpu -t nlstm-serve:gpu .      # serving, CUDA 13 + cuDNN 9
#   docker build --target train -t nlstm-train .                   # training, torch with CUDA
#
# The serving image carries no torch: the project's wheel is installed without its dependencies
# and deploy/requirements-serve.txt lists what the server needs. The gRPC code is generated from
# protos/ during the build, so the image always matches the .proto it was built from.

ARG PYTHON_VERSION=3.11
ARG VARIANT=cpu
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# --------------------------------------------------------------------------------------- build
# The project's wheel, with serving/api generated from protos/ by grpcio-tools.
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir grpcio-tools==1.85.1 build==1.3.0
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY serving/ serving/
COPY training/ training/
RUN python -m serving.codegen \
    && python -m build --wheel --outdir /wheels .

# --------------------------------------------------------------------------------------- train
# `nlstm train` on GPU machines: torch's Linux wheels from PyPI bring their own CUDA libraries,
# so a slim base and the host's driver (--gpus all) are enough.
FROM python:${PYTHON_VERSION}-slim AS train
ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 10001 nlstm
COPY --from=build /wheels/ /tmp/wheels/
# The wheel built above with its `train` extra (torch, onnx, onnxscript, matplotlib): hadolint
# reads "WHEEL[train]" as an unpinned package name.
# hadolint ignore=DL3013
RUN for wheel in /tmp/wheels/*.whl; do \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" "${wheel}[train]" || exit 1; \
    done \
    && rm -rf /tmp/wheels
WORKDIR /home/nlstm
COPY configs/ configs/
USER 10001
ENTRYPOINT ["nlstm"]
CMD ["--help"]

# ----------------------------------------------------------------------------- serving bases
FROM python:${PYTHON_VERSION}-slim AS base-cpu
ENV ORT_PACKAGE=onnxruntime
RUN python -m venv /opt/venv

FROM ${CUDA_IMAGE} AS base-gpu
ENV ORT_PACKAGE=onnxruntime-gpu
# The distribution's Python, whatever its patch release: pinning apt versions breaks the build
# each time Ubuntu publishes a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# ------------------------------------------------------------------------------------- serve
# The default target: `nlstm serve` on the bundled models, as a non-root user.
# base-${VARIANT} names one of the two stages above, not an image hadolint could check a tag of.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS serve
ARG ORT_VERSION=1.31.1
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
COPY --from=build /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir -r /tmp/requirements-serve.txt "${ORT_PACKAGE}==${ORT_VERSION}" \
    && pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels /tmp/requirements-serve.txt \
    && useradd --system --no-create-home --uid 10001 nlstm
WORKDIR /app
COPY exported/ exported/
USER 10001
# Every flag of `nlstm serve` has an NLSTM_* variable (docs/deploy.md): override with `-e`.
ENV NLSTM_MODELS=exported \
    NLSTM_HOST=[::] \
    NLSTM_PORT=50051 \
    NLSTM_METRICS_PORT=9090 \
    NLSTM_GRACE=10
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "serving.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["nlstm", "serve"]
