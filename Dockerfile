# The serving images of the project (docs/deploy.md says how to build and run them):
#
#   deploy/build-image.sh serve-cpu    # docker build -t nlstm:serve-cpu .
#   deploy/build-image.sh serve-gpu    # docker build --build-arg VARIANT=gpu \
#                                      #   --build-arg BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 -t nlstm:serve-gpu .
#   deploy/build-image.sh train        # the training image: Dockerfile.train
#
# The serving image carries no torch: it is the project's base install (torch-free; training is
# the `train` extra), its dependencies pinned by deploy/requirements-serve.txt. The gRPC code is generated from
# protos/ during the build, so the image always matches the .proto it was built from.
#
# Every stage in this file is one the serving image needs. The classic builder (Docker without
# BuildKit, compose v1) builds every stage up to the target whether the target uses it or not,
# so the training image has its own file and the CPU and GPU images differ by their base image,
# not by a stage each: a CPU build never touches torch or CUDA. No `# syntax=` line either:
# BuildKit would fetch that frontend from a registry, and an offline build would fail at once.

# 3.11 to 3.14: the pinned numpy and onnxruntime have wheels for these (pyproject.toml says >= 3.11).
ARG PYTHON_VERSION=3.11
# cpu: onnxruntime; gpu: onnxruntime-gpu, on a BASE_IMAGE with CUDA 13 and cuDNN 9.
ARG VARIANT=cpu
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

# --------------------------------------------------------------------------------------- build
# The project's wheel, with serving/api generated from protos/ by grpcio-tools. In a venv:
# a Debian-packaged Python (deploy/local-base.sh) refuses system-wide pip installs (PEP 668).
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir grpcio-tools==1.85.1 build==1.3.0
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY serving/ serving/
COPY training/ training/
RUN /opt/build/bin/python -m serving.codegen \
    && /opt/build/bin/python -m build --wheel --outdir /wheels .

# ------------------------------------------------------------------------------------- runtime
# The base with a Python and the serving user. NVIDIA's CUDA images have no Python: the
# distribution's, whatever its patch release (pinning apt versions breaks the build each time
# Ubuntu publishes a security update). The user has a home: onnxruntime keeps a file there.
FROM ${BASE_IMAGE} AS runtime
ARG VARIANT
ARG BASE_IMAGE
# hadolint ignore=DL3008
RUN case "$VARIANT" in cpu|gpu) ;; *) echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 1 ;; esac \
    && if [ "$VARIANT" = gpu ]; then case "$(ldconfig -p)" in *libcudnn.so.9*) ;; *) \
         echo "VARIANT=gpu needs a BASE_IMAGE with CUDA 13 and cuDNN 9 (nvidia/cuda:13.x-cudnn-runtime-*); $BASE_IMAGE has no cuDNN 9" >&2; \
         exit 1 ;; esac; fi \
    && if ! command -v python3 >/dev/null; then \
         apt-get update \
         && apt-get install -y --no-install-recommends python3 python3-venv \
         && rm -rf /var/lib/apt/lists/*; fi \
    && useradd --create-home --uid 10001 nlstm

# ---------------------------------------------------------------------------------------- venv
# The server's virtual environment, built on the runtime base (the same Python) and copied
# whole into the image below: the wheel and requirements copied in here stay out of its layers.
FROM runtime AS venv
ARG VARIANT
ARG ORT_VERSION=1.31.1
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
COPY --from=build /wheels/ /tmp/wheels/
# The project's base install (torch-free), its dependencies at the pinned versions; for the GPU
# the runtime is swapped as docs/install.md says (the two onnxruntime wheels install the same
# package: never both).
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c /tmp/requirements-serve.txt \
        "onnxruntime==$ORT_VERSION" /tmp/wheels/*.whl \
    && /opt/venv/bin/pip check \
    && if [ "$VARIANT" = gpu ]; then \
         /opt/venv/bin/pip uninstall -y onnxruntime \
         && /opt/venv/bin/pip install --no-cache-dir -c /tmp/requirements-serve.txt "onnxruntime-gpu==$ORT_VERSION"; fi

# ------------------------------------------------------------------------------------- serve
# The default target: `nlstm serve` on the bundled models, as a non-root user.
FROM runtime AS serve
COPY --from=venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
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
