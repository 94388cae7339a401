"""Groups, invites, threads, leaving and removal over a real Mosquitto: who receives what."""

from __future__ import annotations

from typing import Any

from chatclient import ChatClient
from conftest import Mosquitto, running_bridge


def drain(client: ChatClient) -> list[dict[str, Any]]:
    """Every event received so far: a round trip of our own proves nothing is still in flight to us."""
    client.request("get-active-users")
    events, client.seen = client.seen, []
    while not client.events.empty():
        events.append(client.events.get())
    return [e for e in events if e["type"] not in ("user-connected", "user-disconnected")]


def test_group_lifecycle_reaches_exactly_the_participants(mosquitto: Mosquitto, database_url: str) -> None:
    with running_bridge(mosquitto.port, database_url):
        names = ["alice", "bob", "carol", "dave", "eve"]
        c = {n: ChatClient(n, "127.0.0.1", mosquitto.port).start() for n in names}
        for client in c.values():
            client.connect_chat()
        for client in c.values():
            drain(client)
        alice, bob, carol, dave, eve = (c[n] for n in names)

        group = alice.request(
            "create-conversation", kind="group", participants=["bob", "carol"], title="plans"
        )
        cid = group["data"]["conversation"]["conversation_id"]
        assert group["data"]["conversation"]["owner_id"] == "alice"
        assert bob.request("invite", conversation_id=cid, user_ids=["dave"])["data"]["user_ids"] == ["dave"]
        root = carol.request("send-message", conversation_id=cid, body="Friday?")["data"]["message"]
        reply = dave.request("reply", message_id=root["message_id"], body="yes")
        tid = reply["data"]["message"]["conversation_id"]
        assert tid != cid
        assert eve.request("send-message", conversation_id=cid, body="hi")["data"]["code"] == "not-found"
        assert eve.request("reply", message_id=root["message_id"], body="x")["data"]["code"] == "not-found"

        received = {n: [e["type"] for e in drain(c[n])] for n in names}
        assert received["alice"] == [
            "participants-added",
            "message-added",
            "conversation-created",
            "message-added",
        ]
        assert received["bob"] == [
            "conversation-created",
            "message-added",
            "conversation-created",
            "message-added",
        ]
        assert received["carol"] == [
            "conversation-created",
            "participants-added",
            "conversation-created",
            "message-added",
        ]
        assert received["dave"] == ["conversation-created", "message-added", "conversation-created"]
        assert received["eve"] == []

        left = carol.request("leave", conversation_id=cid)
        assert left["type"] == "participant-left"
        gone = alice.request("leave", conversation_id=cid)  # the owner leaves: removed for everyone
        assert gone["type"] == "conversation-removed"
        received = {n: drain(c[n]) for n in names}
        assert [e["type"] for e in received["bob"]] == ["participant-left", "conversation-removed"]
        assert [e["type"] for e in received["dave"]] == ["participant-left", "conversation-removed"]
        assert received["carol"] == [] and received["eve"] == []
        for n in ("bob", "dave"):
            assert (
                c[n].request("get-messages", conversation_id=tid, since_seq=0)["data"]["code"] == "not-found"
            )
            listed = [
                x["conversation_id"] for x in c[n].request("get-conversations")["data"]["conversations"]
            ]
            assert listed == ["global"]
        for client in c.values():
            client.stop()


def test_history_pages_backwards_to_the_first_message(mosquitto: Mosquitto, database_url: str) -> None:
    with running_bridge(mosquitto.port, database_url):
        alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
        alice.connect_chat()
        for i in range(1, 24):
            alice.send("send-message", conversation_id="global", body=f"m{i}")
        alice.wait_for(lambda e: e["type"] == "message-added" and e["data"]["message"]["seq"] == 23)
        pages, before = [], None
        while True:
            fields: dict[str, Any] = {"conversation_id": "global", "limit": 5}
            if before is not None:
                fields["before_seq"] = before
            page = alice.request("get-prior-messages", **fields)["data"]
            seqs = [m["seq"] for m in page["messages"]]
            assert seqs == sorted(seqs)
            pages.append(seqs)
            if not page["has_more"]:
                break
            before = seqs[0]
        assert pages[0] == [19, 20, 21, 22, 23] and pages[-1] == [1, 2, 3]
        assert sorted(s for p in pages for s in p) == list(range(1, 24))
        alice.stop()
