"""The Python SDK's session rules, against a fake paho client and a scripted bridge (no network)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from sdkfake import FakeBridge, FakeMqtt, conversation, event, message

from bridge import errors as bridge_errors
from chat_bridge import errors
from chat_bridge.aio import AsyncClient
from chat_bridge.client import Client

STATUS = "chat/v1/bridge/status"


def started(bridge: FakeBridge, user: str = "alice", **kwargs: Any) -> tuple[Client, FakeMqtt]:
    client = Client(user, _mqtt_factory=bridge.factory, **kwargs)
    client.connect(timeout=2)
    return client, bridge.clients[-1]


def test_client_ids_follow_the_rule() -> None:
    bridge = FakeBridge()
    ephemeral, mqtt = started(bridge)
    user, _, rest = ephemeral.client_id.partition(":")
    assert user == "alice" and 1 <= len(rest) <= 64 and mqtt.clean_session
    assert started(bridge)[0].client_id != ephemeral.client_id
    persistent, mqtt = started(bridge, device="phone")
    assert persistent.client_id == "alice:phone" and not mqtt.clean_session
    for bad in ({"user": "al:ice"}, {"user": ""}, {"user": "chat-bridge"}, {"user": "a", "device": "x/y"}):
        with pytest.raises(ValueError):
            Client(**bad, _mqtt_factory=bridge.factory)  # type: ignore[arg-type]


def test_credentials_and_tls_are_passed_to_paho() -> None:
    bridge = FakeBridge()
    _, mqtt = started(bridge, password="pw", tls=True)
    assert mqtt.credentials == ("alice", "pw") and mqtt.tls == "default"
    _, mqtt = started(bridge)
    assert mqtt.credentials is None and mqtt.tls is None


def test_every_connection_has_a_new_session_and_a_will_naming_it() -> None:
    bridge = FakeBridge()
    client, mqtt = started(bridge)
    first = client.session_id
    assert mqtt.wills == [{"session_id": first, "reason": "lost"}]
    assert [c["session_id"] for c in mqtt.commands("connect")] == [first]
    mqtt.drop()
    assert client.wait_for("connection-lost", timeout=1).data["reason"] == "lost"
    mqtt.reconnect()
    second = client.session_id
    assert second != first
    assert mqtt.wills[-1] == {"session_id": second, "reason": "lost"}
    assert [c["session_id"] for c in mqtt.commands("connect")] == [first, second]
    assert client.session is not None and client.session["session_id"] == second


def test_a_new_epoch_is_answered_with_connect_again() -> None:
    bridge = FakeBridge()
    client, mqtt = started(bridge)
    mqtt.deliver(STATUS, {"status": "online", "epoch": "e1", "since": "x"})
    assert len(mqtt.commands("connect")) == 1  # the first epoch seen: connect was just sent
    mqtt.deliver(STATUS, {"status": "offline"})
    mqtt.deliver(STATUS, {"status": "online", "epoch": "e1", "since": "x"})
    assert len(mqtt.commands("connect")) == 1
    mqtt.deliver(STATUS, {"status": "online", "epoch": "e2", "since": "y"})
    connects = mqtt.commands("connect")
    assert len(connects) == 2 and connects[1]["session_id"] == client.session_id
    assert client.wait_for("bridge-status", timeout=1).data["status"] == "online"


def test_answers_are_matched_by_request_id() -> None:
    held: list[dict[str, Any]] = []

    def answer(command: str, fields: dict[str, Any]) -> None:
        held.append(fields)  # answered later, in reverse order

    bridge = FakeBridge(answer)
    client, mqtt = started(bridge)
    results: dict[str, Any] = {}

    def send(body: str) -> None:
        results[body] = client.send_message("c1", body, timeout=5)

    threads = [threading.Thread(target=send, args=(b,)) for b in ("one", "two")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(held) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    for n, fields in enumerate(reversed(held)):
        mqtt.inbox(
            {
                **event("message-added", {"message": message("c1", 2 - n, body=fields["body"])}),
                "request_id": fields["request_id"],
            }
        )
    for t in threads:
        t.join(5)
    assert results["one"]["body"] == "one" and results["two"]["body"] == "two"
    assert held[0]["request_id"] != held[1]["request_id"]


def test_no_answer_raises_request_timeout_and_a_late_answer_is_only_an_event() -> None:
    bridge = FakeBridge(lambda command, fields: None)
    client, mqtt = started(bridge)
    started_at = time.monotonic()
    with pytest.raises(errors.RequestTimeout) as caught:
        client.get_conversations(timeout=0.2)
    assert 0.2 <= time.monotonic() - started_at < 2
    assert isinstance(caught.value, TimeoutError) and caught.value.command == "get-conversations"
    mqtt.inbox({**event("conversations", {"conversations": []}), "request_id": caught.value.request_id})
    assert client.wait_for("conversations", timeout=1).request_id == caught.value.request_id


@pytest.mark.parametrize("code", list(errors.ERRORS))
def test_error_answers_are_raised_as_their_exception(code: str) -> None:
    data = {"code": code, "message": "nope", "command": "send-message", "retry_after": 2.5}
    bridge = FakeBridge(lambda command, fields: [event("error", data)])
    client, _ = started(bridge)
    with pytest.raises(errors.ERRORS[code]) as caught:
        client.send_message("c1", "hi")
    assert caught.value.code == code and caught.value.command == "send-message"
    assert isinstance(caught.value, errors.ProtocolError)
    if code == "rate-limited":
        assert isinstance(caught.value, errors.RateLimited) and caught.value.retry_after == 2.5


def test_an_unknown_error_code_is_still_a_protocol_error() -> None:
    data = {"code": "teapot", "message": "short and stout", "command": None}
    client, _ = started(FakeBridge(lambda command, fields: [event("error", data)]))
    with pytest.raises(errors.ProtocolError) as caught:
        client.get_active_users()
    assert caught.value.code == "teapot"


def test_every_error_code_of_the_bridge_has_an_exception() -> None:
    codes = {
        cls.code
        for cls in vars(bridge_errors).values()
        if isinstance(cls, type) and issubclass(cls, bridge_errors.ChatError)
    }
    assert codes == set(errors.ERRORS)


def test_an_event_id_seen_before_is_dropped() -> None:
    client, mqtt = started(FakeBridge())
    client.wait_for("connected", timeout=1)
    added = event("message-added", {"message": message("c1", 1)}, event_id="v1")
    mqtt.inbox(added)
    mqtt.inbox(added)
    mqtt.inbox(event("message-added", {"message": message("c1", 2)}, event_id="v2"))
    got = [e.event_id for e in client.events(timeout=0.2)]
    assert got == ["v1", "v2"]


def test_handlers_run_off_the_network_thread_and_may_send() -> None:
    def answer(command: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
        return [event("message-added", {"message": message("c1", 9, body=fields["body"], sender="alice")})]

    client, mqtt = started(FakeBridge(answer))
    replies: list[str] = []

    @client.on("message-added")
    def echo(e: Any) -> None:
        if e.message["sender_id"] == "bob":
            replies.append(client.send_message("c1", "echo: " + e.message["body"])["body"])

    mqtt.inbox(event("message-added", {"message": message("c1", 1, body="ping")}))
    client.wait_for("message-added", lambda e: e.message["body"] == "echo: ping", timeout=2)
    assert replies == ["echo: ping"]


def pages(store: dict[str, list[dict[str, Any]]], asked: list[dict[str, Any]]) -> Any:
    def answer(command: str, fields: dict[str, Any]) -> list[dict[str, Any]] | None:
        if command != "get-messages":
            return None
        asked.append(fields)
        ms = store[fields["conversation_id"]]
        if "since_rev" in fields:
            after = sorted((m for m in ms if m["rev"] > fields["since_rev"]), key=lambda m: m["rev"])
        else:
            after = [m for m in ms if m["seq"] > fields["since_seq"]]
        limit = 2
        return [
            event(
                "messages",
                {
                    "conversation_id": fields["conversation_id"],
                    "messages": after[:limit],
                    "has_more": len(after) > limit,
                },
            )
        ]

    return answer


def test_catch_up_after_a_reconnect_uses_since_rev_and_reports_new_and_changed_messages() -> None:
    store = {"c1": [message("c1", 1, rev=1), message("c1", 2, rev=2)]}
    asked: list[dict[str, Any]] = []
    bridge = FakeBridge(pages(store, asked))
    bridge.conversations = [conversation("c1", last_seq=2, last_rev=2)]
    client, mqtt = started(bridge)
    assert client.cursors["c1"].rev == 2 and not asked  # a first connection fetches nothing
    mqtt.drop()
    edited = {**message("c1", 1, rev=3), "body": "hi (edited)"}
    store["c1"] = [
        edited,
        message("c1", 2, rev=2),
        message("c1", 3, rev=4),
        message("c1", 4, rev=5),
        message("c1", 5, rev=6),
    ]
    bridge.conversations = [conversation("c1", last_seq=5, last_rev=6), conversation("c2", 1, 1)]
    store["c2"] = [message("c2", 1, rev=1)]
    mqtt.reconnect()
    got = [client.wait_for(match=lambda e: e.catch_up, timeout=2) for _ in range(6)]
    kinds = [(e.type, e.conversation_id, e.message["seq"] if e.message else None) for e in got]
    assert kinds[:4] == [
        ("message-updated", "c1", 1),
        ("message-added", "c1", 3),
        ("message-added", "c1", 4),
        ("message-added", "c1", 5),
    ]
    assert sorted(kinds[4:]) == [("conversation-created", "c2", None), ("message-added", "c2", 1)]
    assert [a.get("since_rev") for a in asked if a["conversation_id"] == "c1"] == [2, 4]  # paged
    assert client.cursors["c1"].rev == 6 and client.cursors["c1"].seq == 5


def test_catch_up_falls_back_to_since_seq_on_a_1_0_bridge() -> None:
    store = {"c1": [message("c1", 1), message("c1", 2)]}
    asked: list[dict[str, Any]] = []
    bridge = FakeBridge(pages(store, asked))
    bridge.conversations = [conversation("c1", last_seq=1)]
    client, mqtt = started(bridge)
    mqtt.drop()
    bridge.conversations = [conversation("c1", last_seq=2)]
    mqtt.reconnect()
    e = client.wait_for(match=lambda e: e.catch_up, timeout=2)
    assert (e.type, e.message and e.message["seq"]) == ("message-added", 2)
    assert asked == [
        {"conversation_id": "c1", "since_seq": 1, "limit": 500, "request_id": asked[0]["request_id"]}
    ]


def test_catch_up_does_not_repeat_what_arrived_live() -> None:
    store: dict[str, list[dict[str, Any]]] = {"c1": []}
    asked: list[dict[str, Any]] = []
    bridge = FakeBridge(pages(store, asked))
    bridge.conversations = [conversation("c1", last_seq=0, last_rev=0)]
    client, mqtt = started(bridge)
    client.wait_for("connected", timeout=1)
    mqtt.inbox(event("message-added", {"message": message("c1", 1, rev=1)}, event_id="v1"))
    mqtt.drop()
    store["c1"] = [message("c1", 1, rev=1), message("c1", 2, rev=2)]
    bridge.conversations = [conversation("c1", last_seq=2, last_rev=2)]
    mqtt.reconnect()
    caught = client.wait_for(match=lambda e: e.catch_up, timeout=2)
    assert caught.message is not None and caught.message["seq"] == 2
    assert asked[0]["since_rev"] == 1
    assert [e for e in client.events(timeout=0.2) if e.catch_up] == []


def test_connect_fails_clearly_when_the_bridge_never_answers() -> None:
    bridge = FakeBridge()
    bridge.handle = lambda *a: None  # type: ignore[method-assign]
    client = Client("alice", _mqtt_factory=bridge.factory)
    with pytest.raises(errors.ConnectionFailed, match="no answer to connect") as failed:
        client.connect(timeout=0.2)
    # what to check: nothing said a bridge is there, under this prefix
    assert "no bridge status on chat/v1/bridge/status" in str(failed.value)
    assert "topic prefix 'chat/v1'" in str(failed.value)


def test_connect_failing_names_the_bridge_status_it_saw() -> None:
    for status, says in (
        ({"status": "offline"}, "the bridge is 'offline'"),
        ({"status": "online", "epoch": "e7", "since": "x"}, "the bridge (epoch e7) is online but did not answer"),
    ):
        bridge = FakeBridge()
        bridge.handle = lambda mqtt, command, fields, status=status: mqtt.deliver(STATUS, status)  # type: ignore
        with pytest.raises(errors.ConnectionFailed, match="no answer to connect") as failed:
            Client("alice", _mqtt_factory=bridge.factory).connect(timeout=0.2)
        assert says in str(failed.value)


def test_close_says_disconnect_with_the_session_id() -> None:
    client, mqtt = started(FakeBridge())
    session_id = client.session_id
    client.close()
    assert mqtt.commands("disconnect") == [{"session_id": session_id, "reason": "client"}]
    with pytest.raises(errors.ConnectionFailed):
        client.get_conversations()


def test_the_async_face() -> None:
    def answer(command: str, fields: dict[str, Any]) -> list[dict[str, Any]] | None:
        if command == "search-messages":
            return [event("search-results", {"query": fields["query"], "messages": [], "has_more": False})]
        if command == "mark-read":
            data = {"code": "not-found", "message": "no such conversation", "command": "mark-read"}
            return [event("error", data)]
        return None

    async def main() -> None:
        bridge = FakeBridge(answer)
        async with AsyncClient("alice", _mqtt_factory=bridge.factory) as client:
            mqtt = bridge.clients[-1]
            seen: list[str] = []

            async def handler(e: Any) -> None:
                seen.append(e.type)

            client.on("message-added", handler)
            assert (await client.search_messages("hello"))["query"] == "hello"
            with pytest.raises(errors.NotFound):
                await client.mark_read("c9", 3)
            with pytest.raises(errors.RequestTimeout):
                await client.get_conversations(timeout=0.1)
            mqtt.inbox(event("message-added", {"message": message("c1", 1)}, event_id="v1"))
            mqtt.inbox(event("message-added", {"message": message("c1", 1)}, event_id="v1"))
            e = await client.wait_for("message-added", timeout=1)
            assert e.event_id == "v1"
            await asyncio.sleep(0)
            assert seen == ["message-added"]

    asyncio.run(main())


def test_typing_is_sent_without_waiting() -> None:
    client, mqtt = started(FakeBridge(lambda command, fields: None))
    client.typing("c1")
    client.typing("c1", False)
    assert [(c["conversation_id"], c["typing"]) for c in mqtt.commands("typing")] == [
        ("c1", True),
        ("c1", False),
    ]


def test_paged_lists_are_followed_to_the_end() -> None:
    convs = [conversation(f"c{n}", last_seq=n) for n in range(5)]

    def answer(command: str, fields: dict[str, Any]) -> list[dict[str, Any]] | None:
        if command == "get-conversations":
            start = int(fields.get("after") or 0)
            more = start + 2 < len(convs)
            data = {
                "conversations": convs[start : start + 2],
                "has_more": more,
                "next": str(start + 2) if more else None,
            }
            return [event("conversations", data)]
        if command == "get-active-users":
            users = [{"user_id": u, "display_name": None, "active": True} for u in ("a", "b", "c")]
            after = fields.get("after")
            page = [u for u in users if after is None or u["user_id"] > after][:2]
            nxt = page[-1]["user_id"] if page[-1]["user_id"] != "c" else None
            return [event("active-users", {"users": page, "has_more": nxt is not None, "next": nxt})]
        return None

    bridge = FakeBridge(answer)
    bridge.conversations = convs[:2]
    original = bridge.handle

    def handle(client: FakeMqtt, command: str, fields: dict[str, Any]) -> None:
        if command == "connect":  # a paging bridge: the first page, and where to continue
            data = {
                "user": {"user_id": "alice", "display_name": None, "active": True},
                "session_id": fields["session_id"],
                "conversations": convs[:2],
                "active_users": [],
                "conversations_next": "2",
                "active_users_next": None,
            }
            client.inbox({**event("connected", data), "request_id": fields["request_id"]})
        else:
            original(client, command, fields)

    bridge.handle = handle  # type: ignore[method-assign]
    client, _ = started(bridge)
    assert client.session is not None
    assert [c["conversation_id"] for c in client.session["conversations"]] == [f"c{n}" for n in range(5)]
    assert client.cursors["c4"].seq == 4
    assert [c["conversation_id"] for c in client.get_conversations()] == [f"c{n}" for n in range(5)]
    assert [u["user_id"] for u in client.get_active_users()] == ["a", "b", "c"]


def test_a_refused_subscription_is_asked_for_again_before_connect() -> None:
    """A NATS node that lost a peer refused the inbox subscription (SUBACK failure): `connect` then
    went out with nobody to receive its answer, and the client waited for ever."""
    bridge = FakeBridge()
    bridge.refuse_subscriptions = 2
    client, mqtt = started(bridge)
    assert len(mqtt.subscriptions) == 3 and mqtt.subscribed
    assert len(mqtt.commands("connect")) == 1  # only once the inbox was granted
    client.close()


def test_catch_up_waits_out_a_rate_limited_page_and_goes_on() -> None:
    store = {"c1": [message("c1", 1, rev=1)], "c2": [message("c2", 1, rev=1)]}
    asked: list[dict[str, Any]] = []
    paged = pages(store, asked)
    refused: list[float] = []

    def answer(command: str, fields: dict[str, Any]) -> list[dict[str, Any]] | None:
        if command == "get-messages" and fields["conversation_id"] == "c1" and len(refused) < 2:
            refused.append(time.monotonic())  # the cost budget refuses the first two pages of c1
            data = {"code": "rate-limited", "message": "too much", "command": command, "retry_after": 0.2}
            return [event("error", data)]
        return paged(command, fields)

    bridge = FakeBridge(answer)
    bridge.conversations = [conversation("c1", 1, 1), conversation("c2", 1, 1)]
    client, mqtt = started(bridge)
    mqtt.drop()
    store["c1"] += [message("c1", 2, rev=2), message("c1", 3, rev=3)]
    store["c2"] += [message("c2", 2, rev=2)]
    bridge.conversations = [conversation("c1", 3, 3), conversation("c2", 2, 2)]
    mqtt.reconnect()
    got = [client.wait_for(match=lambda e: e.catch_up, timeout=3) for _ in range(3)]
    assert sorted((e.conversation_id, e.message["seq"]) for e in got if e.message) == [
        ("c1", 2),
        ("c1", 3),
        ("c2", 2),
    ]
    assert len(refused) == 2 and refused[1] - refused[0] >= 0.2  # asked again after retry_after
    assert client.cursors["c1"].rev == 3 and client.cursors["c2"].rev == 2


def test_a_closed_client_stops_waiting_out_a_refused_catch_up_page() -> None:
    asked: list[float] = []

    def answer(command: str, fields: dict[str, Any]) -> list[dict[str, Any]] | None:
        if command != "get-messages":
            return None
        asked.append(time.monotonic())
        data = {"code": "rate-limited", "message": "too much", "command": command, "retry_after": 30}
        return [event("error", data)]

    bridge = FakeBridge(answer)
    bridge.conversations = [conversation("c1", 1, 1)]
    client, mqtt = started(bridge)
    mqtt.drop()
    bridge.conversations = [conversation("c1", 5, 5)]
    mqtt.reconnect()
    deadline = time.monotonic() + 2
    while not asked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(asked) == 1
    started_at = time.monotonic()
    client.close()
    threads = [t for t in threading.enumerate() if t.name.startswith("chat-bridge-catch-up")]
    for t in threads:
        t.join(2)
    assert time.monotonic() - started_at < 2 and not any(t.is_alive() for t in threads)
    assert len(asked) == 1
