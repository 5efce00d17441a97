# syntax=docker/dockerfile:1
# The training image: CUDA-enabled PyTorch plus the detection-trainer package, run as a non-root user with a
# read-only root filesystem (the chart mounts /tmp, /dev/shm and ~/.cache as writable volumes).
#   docker build -t registry.example.com/ml/trainer:0.1.0 .
# The base carries CUDA, cuDNN, torch and torchvision; it is pinned by version so builds are reproducible
# (pin it by digest too in your registry mirror if your policy asks for it).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
# checkov:skip=CKV_DOCKER_7:FROM uses the BASE_IMAGE argument, whose default above is a pinned version tag

# --- build: turn the source tree into a wheel; nothing from this stage but the wheel reaches the image.
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="detection-trainer" \
      org.opencontainers.image.description="Distributed training of torchvision object detectors from S3" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/trainer \
    TMPDIR=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/home/trainer/.cache/torch
COPY --from=build /wheels /wheels
# The base image's torch and torchvision satisfy the package's ranges, so pip keeps them and adds the rest.
# Byte-code is compiled now because the root filesystem is read-only at run time.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m pip install --no-cache-dir /wheels/*.whl \
 && rm -rf /wheels \
 && python -m compileall -q "$(python -c 'import trainer, os; print(os.path.dirname(trainer.__file__))')" \
 && useradd --uid 10001 --user-group --no-log-init --create-home --home-dir /home/trainer --shell /usr/sbin/nologin trainer \
 && mkdir -p /home/trainer/.cache \
 && chown -R 10001:10001 /home/trainer
USER 10001:10001
WORKDIR /home/trainer
# A batch job, not a service: nothing to probe; Kubernetes watches the process and its exit code.
HEALTHCHECK NONE
# torchrun's arguments, with the trainer's exit codes (75 preempted, 2 bad config) instead of torchrun's 1:
#   docker run IMAGE --standalone --nproc-per-node=2 -m trainer.train --config cfg.yaml
# Other commands: docker run --entrypoint trainer IMAGE convert --help
ENTRYPOINT ["trainer-launch"]
CMD ["--help"]
