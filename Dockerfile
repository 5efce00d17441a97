# syntax=docker/dockerfile:1
# First draft of the training image (the chart issue hardens it further).
# The base already carries CUDA-enabled PyTorch; pin it by version so images are reproducible.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/trainer \
    TMPDIR=/tmp
COPY --from=build /wheels /wheels
# The base image's torch satisfies the package's range, so pip keeps it and adds only the rest.
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --uid 10001 --no-log-init --create-home --home-dir /home/trainer trainer
USER 10001:10001
WORKDIR /home/trainer
ENTRYPOINT ["trainer"]
CMD ["--help"]
