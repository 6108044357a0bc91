# PromptFleet: API + engine (and, with another command, the training worker).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# a C compiler: the AVX-512 CPU kernels are built below, ahead of time (without a compiler
# or AVX-512 the engine logs why and runs its linears on oneDNN, attention on SDPA)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md alembic.ini ./
COPY src ./src
# torch==2.13.0 is pinned in pyproject.toml; add the gpu extra ('.[gpu]') on a CUDA base
# image to get flash-attn.
RUN pip install .
# build the kernels into the image (not on the first start); a build host without AVX-512
# leaves them to the first start on the serving host, which builds or falls back, saying why
RUN promptfleet kernels build || echo "native kernels not built at image build time (see above)"
EXPOSE 8000
CMD ["promptfleet", "serve", "--host", "0.0.0.0", "--port", "8000"]
