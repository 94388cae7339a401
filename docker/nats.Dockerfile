# A NATS node of docker-compose.yml's `cluster` profile: Debian bookworm's nats-server (2.9.10, the
# version the project is tested with), its configuration from nats/compose/ (bridge/natsconf.py).
FROM debian:bookworm-slim
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    nats-server && rm -rf /var/lib/apt/lists/*
COPY nats/compose/ /etc/nats/
VOLUME /data
ENTRYPOINT ["nats-server"]
