# The bridge, for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY bridge ./bridge
COPY chat_bridge ./chat_bridge
# uid 10001 is also Mosquitto's in docker/mosquitto.Dockerfile: the password file the bridge's
# `chat-bridge users` writes (mode 0600) stays readable by the broker.
RUN pip install --no-cache-dir . && useradd --system --uid 10001 bridge \
 && mkdir /accounts && chown bridge /accounts
COPY docker/healthcheck.py /usr/local/bin/chat-bridge-healthcheck
COPY docker/entrypoint.sh /usr/local/bin/chat-bridge-entrypoint
COPY docker/wait-for-database.py /usr/local/bin/chat-bridge-wait-for-database
COPY docker/cluster-init.sh /usr/local/bin/chat-bridge-cluster-init
COPY docker/cluster-worker.sh /usr/local/bin/chat-bridge-cluster-worker
# (a build context copied without modes, as chat_bridge.testing's is, loses the executable bits)
RUN chmod 755 /usr/local/bin/chat-bridge-entrypoint /usr/local/bin/chat-bridge-healthcheck \
    /usr/local/bin/chat-bridge-wait-for-database /usr/local/bin/chat-bridge-cluster-init \
    /usr/local/bin/chat-bridge-cluster-worker
USER bridge
ENTRYPOINT ["chat-bridge-entrypoint"]
CMD ["serve"]
