# Mosquitto with chat-bridge's plugin (passwords, client ids, caps, flood guard) that mosquitto/mosquitto.conf loads, for docker-compose.yml.
# Debian's Mosquitto 2.0, as on our machines; the plugin is built against the same headers.
FROM debian:bookworm-slim AS plugin
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev mosquitto-dev libmosquitto-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
COPY mosquitto/plugins/flood_guard.c /src/flood_guard.c
RUN cc -shared -fPIC -O2 -Wall -Wextra -Werror -o /src/chat_flood_guard.so /src/flood_guard.c -lcrypto

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends mosquitto netcat-openbsd \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /mosquitto/data /mosquitto/plugins /mosquitto/accounts \
 && usermod -u 10001 mosquitto && groupmod -g 10001 mosquitto \
 && chown mosquitto:mosquitto /mosquitto/data /mosquitto/accounts \
 && ln -s accounts/passwd /mosquitto/passwd
# uid 10001 is the bridge image's too: the password file its `chat-bridge users` writes into the
# shared accounts volume (mode 0600) stays readable here; mosquitto/passwd, which the shipped config
# names, points into that volume. The shipped config names its files relative to the working
# directory: run from /.
COPY --from=plugin /src/chat_flood_guard.so /mosquitto/plugins/chat_flood_guard.so
WORKDIR /
EXPOSE 1883 9001
CMD ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
