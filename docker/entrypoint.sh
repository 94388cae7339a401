#!/bin/sh
# The bridge image's entrypoint: `chat-bridge ARGS`, with the compose stack's accounts.
#
# CHAT_ACCOUNTS names the Mosquitto password file shared with the broker: `users ...` manage it (and
# register users in CHAT_BRIDGE_DATABASE_URL). For `serve`, the bridge's own account gets a new random
# password there at every start, and the bridge connects with it to CHAT_BROKER_HOST: no
# secret to export, nothing stored outside the volume.
set -eu
case "${1:-}" in serve|users) python /usr/local/bin/chat-bridge-wait-for-database ;; esac
if [ -n "${CHAT_ACCOUNTS:-}" ]; then
  if [ "${1:-}" = "serve" ] && [ -z "${CHAT_BRIDGE_BROKER_URL:-}" ]; then
    secret=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    printf '%s\n' "$secret" | chat-bridge users add chat-bridge --password-file "$CHAT_ACCOUNTS" >/dev/null
    CHAT_BRIDGE_BROKER_URL="mqtt://chat-bridge:$secret@${CHAT_BROKER_HOST:-mosquitto:1883}"
    export CHAT_BRIDGE_BROKER_URL
  elif [ "${1:-}" = "users" ]; then
    export CHAT_BRIDGE_PASSWORD_FILE="$CHAT_ACCOUNTS"
  fi
fi
exec chat-bridge "$@"
