# PromptFleet: API + engine (and, with another command, the training worker).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# a C compiler: the engine builds its AVX-512 CPU kernels on first start (under a second;
# without one it logs why and runs its linears on oneDNN, attention on SDPA)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md alembic.ini ./
COPY src ./src
# torch==2.13.0 is pinned in pyproject.toml; add the gpu extra ('.[gpu]') on a CUDA base
# image to get flash-attn.
RUN pip install .
EXPOSE 8000
CMD ["promptfleet", "serve", "--host", "0.0.0.0", "--port", "8000"]
