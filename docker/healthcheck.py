#!/usr/bin/env python3
"""Healthy when the bridge's retained status on the broker says online."""

import json
import os
import sys
from urllib.parse import urlsplit

import paho.mqtt.subscribe as subscribe

url = urlsplit(os.environ["CHAT_BRIDGE_BROKER_URL"])
prefix = os.environ.get("CHAT_BRIDGE_TOPIC_PREFIX", "chat/v1")
auth = {"username": url.username, "password": url.password} if url.username else None
msg = subscribe.simple(
    f"{prefix}/bridge/status",
    hostname=url.hostname,
    port=url.port or 1883,
    auth=auth,
    client_id="chat-bridge-healthcheck",
    keepalive=5,
)
sys.exit(0 if json.loads(msg.payload).get("status") == "online" else 1)
