# PromptFleet: API + engine (and, with another command, the training worker).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY src ./src
# torch==2.13.0 is pinned in pyproject.toml; add the gpu extra ('.[gpu]') on a CUDA base
# image to get flash-attn.
RUN pip install .
EXPOSE 8000
CMD ["promptfleet", "serve", "--host", "0.0.0.0", "--port", "8000"]
