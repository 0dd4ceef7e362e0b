# segserve's image: Ray + segserve, running as a non-root user (uid 1000). The Helm chart in
# k8s/segserve runs it (KubeRay starts Ray in it). Build from the repository root:
#   docker build -t segserve:0.1.0-cpu .                                 # CPU (head, CPU workers)
#   docker build --build-arg VARIANT=cuda -t segserve:0.1.0-cuda .       # NVIDIA GPU workers
#   docker build --build-arg VARIANT=xpu -t segserve:0.1.0-xpu .         # Intel GPU workers
# RAY_VERSION must equal the chart's ray.version.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# KubeRay's probes call wget; its start command runs in bash.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates bash \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the index that has the variant's build (PyPI's Linux wheel is the CUDA one).
RUN case "$VARIANT" in \
      cpu)  pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      xpu)  pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/xpu ;; \
      *)    echo "VARIANT must be cpu, cuda or xpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac

COPY . /tmp/segserve-src
RUN pip install "ray[serve]==${RAY_VERSION}" /tmp/segserve-src && rm -rf /tmp/segserve-src

RUN groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/ray --shell /bin/bash ray
ENV HOME=/home/ray SEGSERVE_CACHE_DIR=/home/ray/.cache/segserve
WORKDIR /home/ray
USER 1000:1000

# Without KubeRay: the demo service on this container's CPU (HTTP 8000, gRPC 9000).
EXPOSE 8000 9000 8080
CMD ["segserve", "serve"]
