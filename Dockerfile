# flickd: one image for every service (producer, workers, API, Flower, metrics).
#
#   docker build -t flickd .                                         # CPU torch (default)
#   docker build -t flickd:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#
# PyPI's Linux torch wheel is the CUDA 12 build (its CUDA libraries come as pip packages, so no
# CUDA base image is needed; the NVIDIA container runtime supplies the driver). The CPU build is
# a fifth of the size, so it is the default for everything that does not run on a GPU.
# No secret is baked in: passwords reach the containers as environment variables at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with torch first, then flickd and the rest of its dependencies --------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch before flickd: `pip install .` then finds it satisfied and never pulls another build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY flickd ./flickd
COPY producer ./producer
COPY workers ./workers
COPY models ./models
COPY db ./db
RUN pip install . && flickd --help >/dev/null

# --- runtime: the virtualenv and a non-root user ---------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 --user-group flickd \
    && mkdir -p /data \
    && chown flickd:flickd /data
COPY --from=build /opt/venv /opt/venv
# /data is the shared volume (FLICKD_DATA_DIR): blob store, models, index; the Hugging Face
# cache lives there too, so a model is downloaded once for every container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLICKD_DATA_DIR=/data \
    HF_HOME=/data/hf-cache
USER flickd
WORKDIR /home/flickd
ENTRYPOINT ["flickd"]
CMD ["--help"]
