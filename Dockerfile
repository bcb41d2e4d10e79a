# One image for every AlphaForge process (api, worker, beat, flower, migrate); docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ALPHAFORGE_DATA_DIR=/app/data \
    ALPHAFORGE_API_HOST=0.0.0.0 \
    ALPHAFORGE_API_PORT=8000

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes (all pins are binary wheels).
COPY requirements.txt ./
RUN pip install -r requirements.txt

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/alphaforge alphaforge \
    && mkdir -p /app/data \
    && chown alphaforge:alphaforge /app/data

COPY alembic.ini ./
COPY migrations ./migrations
COPY shared ./shared
COPY worker ./worker
COPY api ./api

USER alphaforge

EXPOSE 8000 5555

CMD ["python", "-m", "gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--access-logfile", "-", "api:create_app()"]
