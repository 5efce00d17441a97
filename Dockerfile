# syntax=docker/dockerfile:1
# The training image: the detection-trainer package installed with exactly the versions the test suite runs
# (constraints.txt: torch, torchvision, the CUDA libraries their Linux wheels depend on, and everything else), run
# as a non-root user with a read-only root filesystem (the chart mounts /tmp, /dev/shm and ~/.cache writable).
#   docker build -t registry.example.com/ml/trainer:0.1.0 .
# The base is plain Python, the interpreter the suite runs (3.11), pinned by version (pin it by digest too in your
# registry mirror if your policy asks for it). It needs no CUDA of its own: torch's wheels bring the CUDA runtime,
# cuDNN and NCCL as nvidia-* packages pinned in constraints.txt; the GPU driver comes from the node (NVIDIA
# container toolkit). tests/e2e/test_image.py performs this install step outside Docker and trains one step.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
# checkov:skip=CKV_DOCKER_7:FROM uses the PYTHON_IMAGE argument, whose default above is a pinned version tag

# --- build: turn the source tree into a wheel; nothing from this stage but the wheel reaches the image.
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime
FROM ${PYTHON_IMAGE}
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
COPY constraints.txt scripts/check_constraints.py /install/
# Exactly the tested versions: pip installs the wheel, with the extras a cluster run may switch on in its config
# (mlflow: log.mlflow tracking; fast-eval: eval.backend faster-coco-eval), under constraints.txt, then
# check_constraints.py fails the build if any installed distribution is missing from constraints.txt or differs
# from its pin.
# Byte-code is compiled now because the root filesystem is read-only at run time: all of site-packages, on every
# core (-j 0; pip compiles file by file on one), and like pip a file that does not compile is left as it is.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m pip install --no-cache-dir --no-compile --constraint /install/constraints.txt --find-links /wheels \
        'detection-trainer[mlflow,fast-eval]' \
 && python /install/check_constraints.py /install/constraints.txt \
 && rm -rf /wheels /install \
 && { python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null || true; } \
 && useradd --uid 10001 --user-group --no-log-init --create-home --home-dir /home/trainer --shell /usr/sbin/nologin trainer \
 && mkdir -p /home/trainer/.cache \
 && chown -R 10001:10001 /home/trainer
USER 10001:10001
WORKDIR /home/trainer
# A batch job, not a service: nothing to probe; Kubernetes watches the process and its exit code.
HEALTHCHECK NONE
# torchrun's arguments, with the trainer's exit codes (75 preempted, 2 bad config) instead of torchrun's 1.
# trainer-launch is PID 1 here (and in the chart's pods): it forwards signals to the launcher and reaps orphaned
# processes, so no zombie is left behind (trainer/reaper.py).
#   docker run IMAGE --standalone --nproc-per-node=2 -m trainer.train --config cfg.yaml
# Other commands: docker run --entrypoint trainer IMAGE convert --help
ENTRYPOINT ["trainer-launch"]
CMD ["--help"]
