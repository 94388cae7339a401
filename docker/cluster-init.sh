#!/bin/sh
# docker-compose.yml `cluster` profile: the workers' NATS account, once, in the accounts volume
# (users.conf, which the NATS nodes include, and the password the workers read). With arguments,
# `chat-bridge ARGS` on those accounts instead, e.g. `users add alice` (CHAT_BRIDGE_NATS_USERS).
set -eu
if [ "$#" -gt 0 ]; then
  python /usr/local/bin/chat-bridge-wait-for-database
  exec chat-bridge "$@" --password-file /tmp/passwd  # (no Mosquitto in this profile)
fi
if [ ! -s /accounts/bridge-password ] || ! grep -q '{user: "chat-bridge"' /accounts/users.conf 2>/dev/null; then
  python -c 'import secrets; print(secrets.token_urlsafe(24))' >/accounts/bridge-password
  chmod 600 /accounts/bridge-password
  chat-bridge users add chat-bridge --nats-users /accounts/users.conf --password-file /tmp/passwd \
    --password "$(cat /accounts/bridge-password)" >/dev/null
  echo "cluster-init: the workers' account is in /accounts/users.conf"
fi
