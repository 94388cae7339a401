"""A chat client in its own process, for tests that kill or freeze it.

Usage: python client_process.py USER HOST PORT KEEPALIVE
Prints `READY <session_id>` once the bridge answered its connect, then idles.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chatclient import ChatClient


def main() -> None:
    user, host, port, keepalive = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    client = ChatClient(user, host, port, keepalive=keepalive).start()
    answer = client.connect_chat()
    assert answer["type"] == "connected", answer
    print(f"READY {client.session_id}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
