"""Against Mosquitto's max_packet_size (128 KiB, which also limits what the bridge publishes): a
history page of large messages is cut to fit, and the bridge carries on serving."""

from __future__ import annotations

from pathlib import Path

from chatclient import ChatClient
from conftest import Mosquitto, running_bridge


def test_a_history_page_over_the_brokers_packet_limit_never_wedges_the_bridge(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    with running_bridge(mosquitto.port, f"sqlite:///{tmp_path}/c.sqlite3"):
        alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
        bob = ChatClient("bob", "127.0.0.1", mosquitto.port).start()
        for c in (alice, bob):
            c.connect_chat()
        for i in range(17):  # ~140 KB of messages: one page of them would be over 128 KiB
            alice.request("send-message", conversation_id="global", body=f"{i:02d}" + "é" * 7998)
        page = bob.request("get-messages", conversation_id="global", since_seq=0, limit=100, timeout=15)
        seqs = [m["seq"] for m in page["data"]["messages"]]
        assert page["data"]["has_more"] is True and 0 < len(seqs) < 17
        while page["data"]["has_more"]:
            page = bob.request("get-messages", conversation_id="global", since_seq=seqs[-1], limit=100)
            seqs += [m["seq"] for m in page["data"]["messages"]]
        assert seqs == list(range(1, 18))
        # still serving everyone
        assert (
            alice.request("send-message", conversation_id="global", body="after")["type"] == "message-added"
        )
        for c in (alice, bob):
            c.stop()
