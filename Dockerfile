# The bridge, for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY bridge ./bridge
COPY chat_bridge ./chat_bridge
RUN pip install --no-cache-dir . && useradd --system --uid 10001 bridge
COPY docker/healthcheck.py /usr/local/bin/chat-bridge-healthcheck
USER bridge
ENTRYPOINT ["chat-bridge"]
CMD ["serve"]
