#!/bin/sh
# docker-compose.yml `cluster` profile: one worker, with the account cluster-init made.
set -eu
python /usr/local/bin/chat-bridge-wait-for-database
pw=$(cat /accounts/bridge-password)
nats="" mqtt=""
for n in nats-1 nats-2 nats-3; do
  nats="$nats${nats:+,}nats://chat-bridge:$pw@$n:4222"
  mqtt="$mqtt${mqtt:+,}mqtt://chat-bridge:$pw@$n:1883"
done
exec chat-bridge serve --nats-url "$nats" --broker-url "$mqtt" "$@"
