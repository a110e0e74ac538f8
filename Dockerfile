# sgd-service: the API server and its training worker process, with a CPU-only torch.
#   docker compose up --build                       (see docker-compose.yml)
#   docker build -t sgd-service . && docker run --rm -p 127.0.0.1:8000:8000 sgd-service
# One stage on purpose: every dependency is a wheel, so no compiler or build tool is ever
# installed, and pip runs with --no-cache-dir; a build stage would leave nothing behind that
# this one keeps. Layers go from what changes least (torch) to what changes most (the code).

# The base image by tag; for a build that is reproducible to the byte, pass the tag's digest:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest> .
# (the digest of today's tag: docker buildx imagetools inspect python:3.11-slim). The default
# stays a tag because CI builds against a local stand-in of it, which no digest can match.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="sgd-service" \
      org.opencontainers.image.description="Fits y = w*x (+ b) by SGD with PyTorch autograd (CPU) and serves its predictions" \
      org.opencontainers.image.licenses="MIT"

# A fixed numeric uid, so that runAsNonRoot-style checks can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 sgd \
 && useradd --system --uid 10001 --gid sgd --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sgd

# torch first, alone, in a layer of its own: ~0.7 GB that only changes with the pin below.
# The CPU build comes from PyTorch's index; the exact pin matters, since on PyPI the same version
# (or a looser range) is a CUDA build that pulls GBs of nvidia-* wheels. --no-deps: nothing but
# torch is taken while PyTorch's index is in reach; its dependencies come from PyPI below. If
# that index is unreachable pip falls back to PyPI silently, so the build fails unless torch is
# a CPU build (read from its metadata: importing torch needs those dependencies).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --root-user-action=ignore --no-deps --extra-index-url "$TORCH_INDEX_URL" torch==2.13.0 \
 && python -c "import sys, importlib.metadata as m; v = m.version('torch'); sys.exit(0 if v.endswith('+cpu') else f'torch {v} is not the CPU build: is TORCH_INDEX_URL reachable?')"

# The other runtime dependencies as pyproject.toml's [project] dependencies name them (read from
# it, so there is one list; its torch==2.13.0 is already satisfied by 2.13.0+cpu), from PyPI
# alone, every one, transitive ones too, at the version .ci/constraints.txt pins. Only these two
# files are copied first, so editing the code does not reinstall them.
WORKDIR /app
COPY pyproject.toml .ci/constraints.txt ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
 && pip install --no-cache-dir --root-user-action=ignore -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && python -c "import torch; assert torch.version.cuda is None, torch.__version__"

COPY service/ service/
# Compiled now, as root: the root filesystem is read-only at run time (docker-compose.yml), and
# the code stays unwritable for the user that runs it.
RUN python -m compileall -q service

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    SGD_HOST=0.0.0.0 \
    SGD_PORT=8000

USER 10001:10001
EXPOSE 8000

# /healthz is liveness (the process answers); the slim base has no curl, so Python asks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SGD_PORT', '8000'), timeout=2)"]

# Exec form: the server is PID 1 and gets docker stop's SIGTERM itself, then drains (refuses
# fits, cancels the running one, /readyz 503 for SGD_DRAIN_SECONDS) and exits.
# One uvicorn worker, and never more: the model and the jobs live in this process's memory
# (a second worker would serve another model). Scale with replicas instead.
CMD ["python", "-m", "service"]
