FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY streams streams
COPY connectors connectors
COPY schemas schemas
COPY config config
COPY deploy deploy
RUN pip install --no-cache-dir -c constraints.txt .
ENTRYPOINT []
