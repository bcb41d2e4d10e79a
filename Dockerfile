# One image for every AlphaForge process (api, worker, beat, flower, migrate); docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ALPHAFORGE_DATA_DIR=/app/data \
    ALPHAFORGE_API_HOST=0.0.0.0 \
    ALPHAFORGE_API_PORT=8000 \
    NUMBA_CACHE_DIR=/app/numba-cache

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes (all pins are binary wheels).
COPY requirements.txt ./
RUN pip install -r requirements.txt

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/alphaforge alphaforge \
    && mkdir -p /app/data/artifacts \
    && chown -R alphaforge:alphaforge /app/data

COPY alembic.ini ./
COPY migrations ./migrations
COPY shared ./shared
COPY worker ./worker
COPY api ./api

# Compile the backtest kernels into the image: a fresh worker would otherwise spend 10-20 s on its first
# backtest. (The sandbox needs libseccomp2, which the Debian base already has: apt depends on it.)
RUN python -m shared.domain.backtest.warmup && chown -R alphaforge:alphaforge /app/numba-cache

USER alphaforge

EXPOSE 8000 5555

# gunicorn's settings come from the environment (api/gunicorn_conf.py: ALPHAFORGE_API_HOST/PORT/WORKERS/THREADS).
CMD ["python", "-m", "gunicorn", "--config", "python:api.gunicorn_conf", "api:create_wsgi_app()"]
