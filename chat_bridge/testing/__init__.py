"""Test helpers for code that talks to chat-bridge.

- `BridgeProcess`: `chat-bridge serve` in a child process on free ports, with its embedded broker
  and a temporary SQLite file, or against a broker you give it;
- the pytest plugin (`chat_bridge.testing.plugin`, loaded automatically once the package is
  installed): fixtures `chat_bridge_server` and `chat_client`;
- `chat_bridge.testing.containers.ChatBridgeContainer`: the project's image with Mosquitto and
  PostgreSQL, via testcontainers.
"""

from __future__ import annotations

from ._process import BridgeProcess, BridgeStartError, free_port, wait_online

__all__ = ["BridgeProcess", "BridgeStartError", "free_port", "wait_online"]
