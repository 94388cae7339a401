"""Random command sequences from several users against the core; invariants checked after every step."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from world import World

from bridge.core import members
from bridge.memory import MemoryStore, MemoryUnitOfWork
from bridge.model import words

USERS = ["u0", "u1", "u2", "u3", "u4"]
users = st.sampled_from(USERS)
# Events whose recipients must take part in the conversation after the command, or before it.
AFTER = {
    "message-added",
    "conversation-created",
    "participants-added",
    # (1.1)
    "message-edited",
    "message-deleted",
    "reaction-changed",
    "read-marker",
    "typing",
}
BEFORE = {"participant-left", "conversation-removed"}


class ChatMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.world = World()
        self.conversations: list[str] = ["global"]
        self.messages: list[str] = []
        self.removed: set[str] = set()
        self.changes: dict[str, int] = {}  # conversation -> rev-taking changes seen (1.1)
        self.markers: dict[tuple[str, str], int] = {}  # the highest read marker answered, per (conv, user)

    @property
    def store(self) -> MemoryStore:
        assert isinstance(self.world.uow, MemoryUnitOfWork)
        return self.world.uow.store

    def membership(self) -> dict[str, set[str]]:
        return {cid: set(members(self.store, conv)) for cid, conv in self.store._s.conversations.items()}

    def run(self, user: str, command: str, **fields: Any) -> dict[str, Any]:
        before = self.membership()
        rid = f"r{len(self.messages)}-{len(self.conversations)}-{command}"
        out = self.world.do(user, command, request_id=rid, **fields)
        after = self.membership()
        answers = [e for e in out.inbox(user) if e["request_id"] == rid]
        silent = command == "disconnect" or (command == "typing" and not out.inbox(user))
        assert len(answers) == (0 if silent and not answers else 1), answers
        for d in out.deliveries:
            if d.kind == "notification":  # (1.1) only to an absent participant, never the sender
                note = d.payload.model_dump(mode="json")["data"]
                assert d.key != user and d.key in after[note["conversation_id"]], note
                assert not self.store.has_active_session(d.key)
            if d.kind != "inbox":
                continue
            event = d.payload.model_dump(mode="json")
            if event["type"] not in AFTER | BEFORE:
                continue
            data = event["data"]
            cid = (
                data.get("conversation_id")
                or (data.get("conversation") or data.get("message"))["conversation_id"]
            )
            if cid == "global":
                continue
            if event["type"] in AFTER:
                assert d.key in after.get(cid, set()), (event, d.key)
            else:
                assert d.key in before.get(cid, set()), (event, d.key)
        for e in out.inbox(user):
            if e["type"] == "conversation-created":
                cid = e["data"]["conversation"]["conversation_id"]
                if cid not in self.conversations:
                    self.conversations.append(cid)
            if e["type"] == "message-added":
                mid = e["data"]["message"]["message_id"]
                if mid not in self.messages:
                    self.messages.append(mid)
            if e["type"] == "conversation-removed":
                self.removed.add(e["data"]["conversation_id"])
                self.removed |= {c for c in self.conversations if c not in after}  # its threads
        self.count_changes(user, out, answers)
        return answers[0] if answers else {}

    def count_changes(self, user: str, out: Any, answers: list[dict[str, Any]]) -> None:
        """(1.1) Each change that took a rev is broadcast (to the conversation topic); a no-op is not."""
        for d in out.deliveries:
            event = d.payload.model_dump(mode="json")
            if d.kind == "conversation" and event["type"] in (
                "message-added",
                "message-edited",
                "message-deleted",
                "reaction-changed",
            ):
                cid = event["data"]["message"]["conversation_id"]
                self.changes[cid] = self.changes.get(cid, 0) + 1
        for e in answers:
            if e["type"] == "read-marker":
                key = (e["data"]["conversation_id"], user)
                assert e["data"]["read_seq"] >= self.markers.get(key, 0), "a read marker moved back"
                self.markers[key] = e["data"]["read_seq"]
            if e["type"] in ("participant-left", "conversation-removed"):
                self.markers = {k: v for k, v in self.markers.items() if k[1] != user}
            if e["type"] == "search-results":
                for m in e["data"]["messages"]:
                    stored = self.store.get_message(m["message_id"])
                    assert stored is not None and not stored.deleted, "search found a tombstone"
                    assert set(words(e["data"]["query"])) <= set(words(stored.body))

    @initialize()
    def connect_everyone(self) -> None:
        for u in USERS:
            self.run(u, "connect", session_id=f"{u}-s")

    @rule(a=users, b=users)
    def create_direct(self, a: str, b: str) -> None:
        self.run(a, "create-conversation", kind="direct", participants=[b])

    @rule(owner=users, others=st.lists(users, min_size=1, max_size=4))
    def create_group(self, owner: str, others: list[str]) -> None:
        self.run(owner, "create-conversation", kind="group", participants=others)

    @rule(user=users, i=st.integers(0, 30), invited=st.lists(users, min_size=1, max_size=3))
    def invite(self, user: str, i: int, invited: list[str]) -> None:
        self.run(
            user, "invite", conversation_id=self.conversations[i % len(self.conversations)], user_ids=invited
        )

    @rule(user=users, i=st.integers(0, 30))
    def leave(self, user: str, i: int) -> None:
        self.run(user, "leave", conversation_id=self.conversations[i % len(self.conversations)])

    @rule(user=users, i=st.integers(0, 30))
    def remove(self, user: str, i: int) -> None:
        self.run(user, "remove-conversation", conversation_id=self.conversations[i % len(self.conversations)])

    @rule(user=users, i=st.integers(0, 30), cmid=st.none() | st.sampled_from(["a", "b"]))
    def send(self, user: str, i: int, cmid: str | None) -> None:
        fields: dict[str, Any] = {
            "conversation_id": self.conversations[i % len(self.conversations)],
            "body": "x",
        }
        if cmid:
            fields["client_msg_id"] = cmid
        self.run(user, "send-message", **fields)

    @rule(user=users, i=st.integers(0, 60))
    def reply(self, user: str, i: int) -> None:
        if self.messages:
            self.run(user, "reply", message_id=self.messages[i % len(self.messages)], body="re")

    @rule(user=users, i=st.integers(0, 30), back=st.booleans(), limit=st.integers(1, 4))
    def history(self, user: str, i: int, back: bool, limit: int) -> None:
        cid = self.conversations[i % len(self.conversations)]
        if back:
            self.run(user, "get-prior-messages", conversation_id=cid, limit=limit)
        else:
            self.run(user, "get-messages", conversation_id=cid, since_seq=0, limit=limit)

    # --- 1.1 ---

    def message(self, i: int) -> str:
        return self.messages[i % len(self.messages)] if self.messages else "m_none"

    @rule(user=users, i=st.just(0) | st.integers(0, 30), seq=st.integers(0, 6))
    def mark_read(self, user: str, i: int, seq: int) -> None:
        self.run(user, "mark-read", conversation_id=self.conversations[i % len(self.conversations)], seq=seq)

    @rule(user=users, i=st.integers(0, 60), body=st.sampled_from(["x", "apple", "Apple pie", "pie"]))
    def edit(self, user: str, i: int, body: str) -> None:
        self.run(user, "edit-message", message_id=self.message(i), body=body)

    @rule(user=users, i=st.integers(0, 60))
    def delete(self, user: str, i: int) -> None:
        self.run(user, "delete-message", message_id=self.message(i))

    @rule(user=users, i=st.integers(0, 60), emoji=st.sampled_from(["👍", "🎉"]), on=st.booleans())
    def react(self, user: str, i: int, emoji: str, on: bool) -> None:
        self.run(user, "react", message_id=self.message(i), emoji=emoji, on=on)

    @rule(user=users, query=st.sampled_from(["x", "apple", "PIE", "re", "apple pie"]))
    def search(self, user: str, query: str) -> None:
        self.run(user, "search-messages", query=query, limit=5)

    @rule(user=users, i=st.integers(0, 30), typing=st.booleans())
    def typing(self, user: str, i: int, typing: bool) -> None:
        self.run(
            user, "typing", conversation_id=self.conversations[i % len(self.conversations)], typing=typing
        )

    @invariant()
    def revs_are_gapless(self) -> None:
        for cid in self.conversations:
            conv = self.store.get_conversation(cid)
            if conv is None:
                continue
            assert conv.last_rev == self.changes.get(cid, 0), (cid, conv.last_rev, self.changes.get(cid))
            revs = [m.rev for m in self.store.messages_after_rev(cid, 0, 10**6)]
            assert revs == sorted(set(revs)) and all(0 < r <= conv.last_rev for r in revs), (cid, revs)
            assert (
                self.store.messages_after_rev(cid, conv.last_rev - 1, 10)[-1:]
                == [m for m in self.store.messages_after_seq(cid, 0, 10**6) if m.rev == conv.last_rev]
                or conv.last_rev == 0
            ), "the newest rev is stamped on a message"

    @invariant()
    def markers_never_move_back(self) -> None:
        membership = self.membership()
        for (cid, user), seq in self.markers.items():
            if user in membership.get(cid, ()):  # leaving forgets one's markers; removal everyone's
                assert self.store.read_seq(cid, user) >= seq, (cid, user)

    @invariant()
    def unread_is_never_negative(self) -> None:
        for (cid, _user), seq in self.store._s.read_markers.items():
            conv = self.store.get_conversation(cid)
            assert conv is not None, "a marker outlived its conversation"
            assert 0 <= seq <= conv.last_seq

    @invariant()
    def tombstones_are_empty_and_never_found(self) -> None:
        every = list(self.store._s.conversations)
        for m in self.store._s.message_index.values():
            if m.deleted:
                assert (m.body, m.reactions) == ("", ())
        for query in (["apple"], ["pie"], ["x"]):
            assert not [m for m in self.store.search(every, query, None, 10**6) if m.deleted]

    @rule(user=users, on=st.booleans())
    def presence(self, user: str, on: bool) -> None:
        self.run(user, "connect" if on else "disconnect", session_id=f"{user}-s")

    @invariant()
    def seqs_are_gapless(self) -> None:
        for cid in self.conversations:
            conv = self.store.get_conversation(cid)
            if conv is not None:
                seqs = [m.seq for m in self.store.messages_after_seq(cid, 0, 10**6)]
                assert seqs == list(range(1, conv.last_seq + 1)), (cid, seqs)

    @invariant()
    def threads_follow_their_parent(self) -> None:
        for cid in self.conversations:
            conv = self.store.get_conversation(cid)
            if conv is not None and conv.kind == "thread":
                assert conv.parent_conversation_id is not None
                parent = self.store.get_conversation(conv.parent_conversation_id)
                assert parent is not None, "a thread outlived its parent"
                assert members(self.store, conv) == members(self.store, parent)
        roots = [c.parent_message_id for c in self.store._s.conversations.values() if c.kind == "thread"]
        assert len(roots) == len(set(roots)), "two threads for one root message"

    @invariant()
    def removed_conversations_are_invisible(self) -> None:
        for cid in self.removed:
            assert self.store.get_conversation(cid) is None
            for u in USERS:
                listed = {c.conversation_id for c in self.store.conversations_of(u)}
                assert cid not in listed


TestChat = ChatMachine.TestCase
TestChat.settings = settings(
    max_examples=200, stateful_step_count=35, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
