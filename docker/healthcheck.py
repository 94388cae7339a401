#!/usr/bin/env python3
"""Healthy when the bridge's /healthz answers 200 (connected to its broker and its database)."""

import os
import sys
import urllib.error
import urllib.request

listen = os.environ.get("CHAT_BRIDGE_HTTP_LISTEN", "127.0.0.1:8080")
port = listen.rsplit(":", 1)[-1]
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as exc:
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
