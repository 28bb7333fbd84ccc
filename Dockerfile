# zfserve's container image: `zfserve serve` on 0.0.0.0:8081 (KServe's gRPC port) with the embedded zfnet-demo
# model; pass other `serve` flags as arguments (the Kubernetes manifests under deploy/ do).
#
#   docker build -t zfserve:latest .
#   docker run --rm -p 8081:8081 zfserve:latest
#   docker run --rm -p 8081:8081 -v "$PWD/models:/mnt/models:ro" zfserve:latest \
#       serve --host 0.0.0.0 --port 8081 --model-repository /mnt/models
#
# Both stages use the same base image: the virtualenv built in the first links to that stage's interpreter.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# PyTorch's CPU wheel index, for torch alone: the default PyPI torch is the multi-GB CUDA build.
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# .dockerignore keeps the context to what `pip install .` reads, plus scripts/install.sh.
COPY . /src
# The same script CI runs, start check included: a build whose server does not reach SERVING (or does not stop
# cleanly on SIGTERM) fails here instead of shipping. It needs only loopback, which `docker build` has.
# A virtualenv embeds its absolute path, so it is built at the path the runtime stage copies it to.
RUN bash scripts/install.sh /opt/zfserve

FROM ${PYTHON_IMAGE}
# A fixed non-root uid/gid (1000), so Kubernetes' runAsNonRoot/runAsUser can name it. The ONNX export of a
# model is cached in ZFSERVE_CACHE_DIR; Kubernetes mounts an emptyDir there (the root filesystem is read-only).
RUN groupadd --gid 1000 zfserve \
 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin zfserve \
 && install -d -o 1000 -g 1000 /var/cache/zfserve
COPY --from=builder /opt/zfserve /opt/zfserve
ENV PATH=/opt/zfserve/bin:$PATH \
    ZFSERVE_CACHE_DIR=/var/cache/zfserve \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/zfserve
EXPOSE 8081
# `zfserve health` exits 0 only when the server says SERVING (NOT_SERVING while models load or while draining).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["zfserve", "health", "--server", "127.0.0.1:8081"]
ENTRYPOINT ["zfserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8081"]
