"""`chat-bridge chat USER`: an interactive terminal chat client on the SDK (prompt_toolkit).

Type a line to send it to the open conversation; lines starting with `/` are commands (`/help`).
Incoming messages appear as they arrive, above the input line; the bar at the bottom shows where
you are, unread counts elsewhere, and who is typing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .client import Client
from .errors import ChatBridgeError, ConnectionFailed, ProtocolError, UnknownCommand
from .types import Conversation, Event, Message

HISTORY = 20
HELP = """\
commands:
  /list                     conversations, with unread counts
  /open N|NAME              switch to conversation N of /list (or a user, a title, an id)
  /dm USER                  open the direct conversation with USER (created if needed)
  /group TITLE USER...      create a group with these users and open it
  /invite USER...           add users to the open group
  /leave                    leave the open group
  /history                  show older messages of the open conversation
  /who                      who is online
  /reply SEQ TEXT           reply to message #SEQ (in its thread)
  /edit SEQ TEXT            change your message #SEQ
  /delete SEQ               delete message #SEQ
  /react SEQ EMOJI          react to message #SEQ (again to take it back)
  /search WORDS             search your conversations
  /quit                     leave (Ctrl-D too)
anything else is sent to the open conversation"""

BOLD, DIM, CYAN, GREEN, YELLOW, RED, RESET = (
    "\x1b[1m",
    "\x1b[2m",
    "\x1b[36m",
    "\x1b[32m",
    "\x1b[33m",
    "\x1b[31m",
    "\x1b[0m",
)


def add_chat_command(sub: Any) -> None:
    """Registers `chat` on the `chat-bridge` command line (bridge/cli.py calls this)."""
    env = os.environ.get
    chat = sub.add_parser("chat", help="an interactive terminal chat client", description=__doc__)
    chat.add_argument("user", help="your user id (the MQTT username where the broker has accounts)")
    chat.add_argument(
        "--host", default=env("CHAT_BRIDGE_CHAT_HOST", "127.0.0.1"), help="[env CHAT_BRIDGE_CHAT_HOST]"
    )
    chat.add_argument(
        "--port",
        type=int,
        default=int(env("CHAT_BRIDGE_CHAT_PORT", "1883")),
        help="[env CHAT_BRIDGE_CHAT_PORT]",
    )
    chat.add_argument(
        "--password",
        default=env("CHAT_BRIDGE_PASSWORD"),
        help="where the broker has accounts [env CHAT_BRIDGE_PASSWORD]",
    )
    chat.add_argument(
        "--fallback",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="another broker of the same cluster (a NATS cluster's other MQTT listeners), tried in turn "
        "when the connection fails or is lost; may be given more than once",
    )
    chat.add_argument("--tls", action="store_true", help="connect with TLS (system CAs unless --ca-file)")
    chat.add_argument("--ca-file", help="a CA certificate file for TLS")
    chat.add_argument("--device", help="a device name: a persistent session (alice:DEVICE) that keeps events")
    chat.add_argument("--display-name")
    chat.add_argument("--topic-prefix", default=env("CHAT_BRIDGE_TOPIC_PREFIX", "chat/v1"))
    chat.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # log lines (a reconnect's warnings too) tear the screen
    tls: ssl.SSLContext | bool = False
    if args.tls or args.ca_file:
        tls = ssl.create_default_context(cafile=args.ca_file)
    try:
        client = Client(
            args.user,
            args.host,
            args.port,
            device=args.device,
            password=args.password,
            tls=tls,
            prefix=args.topic_prefix,
            display_name=args.display_name,
            fallbacks=args.fallback,
        )
    except ValueError as exc:
        print(f"chat-bridge chat: {exc}", file=sys.stderr)
        return 2
    return ChatApp(client).main()


def label(conv: Conversation, me: str) -> str:
    if conv["kind"] == "global":
        return "global"
    if conv["kind"] == "direct":
        others = [p for p in conv["participants"] if p != me]
        return "@" + (others[0] if others else me)
    if conv["kind"] == "thread":
        return f"thread {conv['conversation_id'][-6:]}"
    return conv["title"] or ", ".join(p for p in conv["participants"] if p != me)


class ChatApp:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.me = client.user
        self.conversations: dict[str, Conversation] = {}
        self.unread: dict[str, int] = {}
        self.current = "global"
        self.shown: dict[int, Message] = {}  # seq -> message, of the open conversation
        self.oldest_shown: int | None = None
        self.typing: dict[str, tuple[str, float]] = {}  # user -> (conversation, since)
        self.lock = threading.RLock()
        self.status = "connecting"
        self.last_typing = 0.0

    # -- output -----------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text + RESET, flush=True)

    def note(self, text: str) -> None:
        self.say(f"{DIM}-- {text}")

    def show_message(self, m: Message, prefix: str = "") -> None:
        when = m["created_at"][11:16]
        who = f"{GREEN}{m['sender_id']}" if m["sender_id"] == self.me else f"{CYAN}{m['sender_id']}"
        if m.get("deleted_at"):
            body = f"{DIM}(deleted)"
        else:
            body = m["body"] + (f" {DIM}(edited)" if m.get("edited_at") else "")
        reactions = m.get("reactions") or {}
        marks = "".join(f" {e}{len(us)}" for e, us in reactions.items() if us)
        self.say(f"{prefix}{DIM}{when} #{m['seq']}{RESET} {BOLD}{who}{RESET}: {body}{RESET}{marks}")

    def toolbar(self) -> str:
        with self.lock:
            conv = self.conversations.get(self.current)
            here = label(conv, self.me) if conv else self.current
            others = [
                f"{label(self.conversations[cid], self.me)} {n}"
                for cid, n in self.unread.items()
                if n and cid != self.current and cid in self.conversations
            ]
            now = time.monotonic()
            typing = [u for u, (cid, t) in self.typing.items() if cid == self.current and now - t < 10]
        parts = [f" {self.me} in {here}", self.status]
        if others:
            parts.append("unread: " + ", ".join(others))
        if typing:
            parts.append(", ".join(typing) + " typing…")
        return " | ".join(parts) + "   /help"

    # -- events -----------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        handler: Callable[[Event], None] | None = getattr(self, "ev_" + event.type.replace("-", "_"), None)
        if handler is not None:
            with self.lock:
                handler(event)

    def ev_message_added(self, event: Event) -> None:
        m = event.message
        if m is None:
            return
        self.typing.pop(m["sender_id"], None)
        if m["conversation_id"] not in self.conversations:
            return
        if m["conversation_id"] == self.current:
            if event.request_id is None or m["sender_id"] != self.me:
                self.shown[m["seq"]] = m
                self.show_message(m)
                self.mark_read(m["conversation_id"], m["seq"])
        elif m["sender_id"] != self.me:
            self.unread[m["conversation_id"]] = self.unread.get(m["conversation_id"], 0) + 1
            where = label(self.conversations[m["conversation_id"]], self.me)
            self.say(f"{YELLOW}[{where}]{RESET} {CYAN}{m['sender_id']}{RESET}: {m['body'][:80]}")

    def ev_message_edited(self, event: Event) -> None:
        self._changed(event, "edited")

    def ev_message_deleted(self, event: Event) -> None:
        self._changed(event, "deleted")

    def ev_message_updated(self, event: Event) -> None:
        self._changed(event, "changed")

    def ev_reaction_changed(self, event: Event) -> None:
        if event.data.get("user_id") != self.me or event.request_id is None:
            self._changed(event, f"{event.data.get('user_id')} reacted {event.data.get('emoji')}")

    def _changed(self, event: Event, what: str) -> None:
        m = event.message
        if m is not None and m["conversation_id"] == self.current:
            self.shown[m["seq"]] = m
            self.show_message(m, prefix=f"{DIM}({what}) {RESET}")

    def ev_conversation_created(self, event: Event) -> None:
        conv = event.conversation
        if conv is None or conv["conversation_id"] in self.conversations:
            return
        self.conversations[conv["conversation_id"]] = conv
        if event.request_id is None:  # not the answer to our own create
            self.note(f"new conversation {label(conv, self.me)} ({conv['kind']}); /list to see it")

    def ev_conversation_removed(self, event: Event) -> None:
        cid = event.data.get("conversation_id")
        conv = self.conversations.pop(str(cid), None)
        self.unread.pop(str(cid), None)
        if conv is not None:
            self.note(f"{label(conv, self.me)} was removed")
            if cid == self.current:
                self.open("global")

    def ev_participants_added(self, event: Event) -> None:
        cid, users = event.data.get("conversation_id"), event.data.get("user_ids", [])
        conv = self.conversations.get(str(cid))
        if conv is not None:
            conv["participants"] = [
                *conv["participants"],
                *[u for u in users if u not in conv["participants"]],
            ]
            self.note(f"{', '.join(users)} joined {label(conv, self.me)}")

    def ev_participant_left(self, event: Event) -> None:
        cid, user = str(event.data.get("conversation_id")), event.data.get("user_id")
        conv = self.conversations.get(cid)
        if user == self.me:
            self.conversations.pop(cid, None)
            if cid == self.current:
                self.open("global")
        elif conv is not None:
            conv["participants"] = [p for p in conv["participants"] if p != user]
            self.note(f"{user} left {label(conv, self.me)}")

    def ev_user_connected(self, event: Event) -> None:
        user = event.data.get("user", {}).get("user_id")
        if user != self.me:
            self.note(f"{user} is online")

    def ev_user_disconnected(self, event: Event) -> None:
        self.note(f"{event.data.get('user_id')} went offline")

    def ev_typing(self, event: Event) -> None:
        user, cid = str(event.data.get("user_id")), str(event.data.get("conversation_id"))
        if event.data.get("typing"):
            self.typing[user] = (cid, time.monotonic())
        else:
            self.typing.pop(user, None)

    def ev_connected(self, event: Event) -> None:
        if self.status != "online" and self.status != "connecting":
            self.note("connected again")
        self.status = "online"
        for conv in event.data.get("conversations", []):
            self.conversations.setdefault(conv["conversation_id"], conv)
            if conv.get("unread"):
                self.unread[conv["conversation_id"]] = conv["unread"]

    def ev_connection_lost(self, _event: Event) -> None:
        if self.status != "reconnecting":
            self.status = "reconnecting"
            self.note("connection lost; reconnecting")

    def ev_bridge_status(self, event: Event) -> None:
        if event.data.get("status") == "offline" and self.status == "online":
            self.status = "bridge offline"
            self.note("the bridge went offline; waiting for it")
        elif event.data.get("status") == "online" and self.status == "bridge offline":
            self.status = "online"

    def ev_error(self, event: Event) -> None:
        if event.request_id is None or event.data.get("command") == "typing":
            self.say(f"{RED}error: {event.data.get('message')}")

    # -- actions ----------------------------------------------------------------------------------

    def mark_read(self, cid: str, seq: int) -> None:
        threading.Thread(target=self._mark_read, args=(cid, seq), daemon=True).start()

    def _mark_read(self, cid: str, seq: int) -> None:
        with contextlib.suppress(UnknownCommand, ChatBridgeError):  # a 1.0 bridge has no read markers
            self.client.mark_read(cid, seq)

    def find(self, name: str) -> str | None:
        with self.lock:
            ordered = list(self.conversations.values())
        if name.isdigit() and 1 <= int(name) <= len(ordered):
            return ordered[int(name) - 1]["conversation_id"]
        for conv in ordered:
            if name in (conv["conversation_id"], label(conv, self.me), "@" + name, conv["title"]):
                return conv["conversation_id"]
            if label(conv, self.me) == "@" + name:
                return conv["conversation_id"]
        return None

    def open(self, cid: str) -> None:
        with self.lock:
            self.current = cid
            self.shown = {}
            self.unread.pop(cid, None)
            conv = self.conversations.get(cid)
        page = self.client.get_prior_messages(cid, limit=HISTORY)
        self.note(f"{label(conv, self.me) if conv else cid}: {len(page['messages'])} latest messages")
        with self.lock:
            for m in page["messages"]:
                self.shown[m["seq"]] = m
                self.show_message(m)
            self.oldest_shown = page["messages"][0]["seq"] if page["messages"] else None
        if page["messages"]:
            self.mark_read(cid, page["messages"][-1]["seq"])

    def message(self, seq: str) -> Message:
        m = self.shown.get(int(seq)) if seq.lstrip("#").isdigit() else None
        if m is None and seq.lstrip("#").isdigit():
            page = self.client.get_messages(self.current, since_seq=int(seq.lstrip("#")) - 1, limit=1)
            m = page["messages"][0] if page["messages"] else None
        if m is None:
            raise LookupError(f"no message #{seq} here")
        return m

    def command(self, line: str) -> bool:
        """Runs one input line; false to quit."""
        if not line.startswith("/"):
            if line.strip():
                m = self.client.send_message(self.current, line)
                with self.lock:
                    if m["conversation_id"] == self.current:
                        self.shown[m["seq"]] = m
                        self.show_message(m)
            return True
        name, _, rest = line[1:].partition(" ")
        args = rest.split()
        c = self.client
        if name in ("quit", "exit", "q"):
            return False
        if name in ("help", "h", "?"):
            self.say(HELP)
        elif name in ("list", "ls"):
            convs = c.get_conversations()
            with self.lock:
                self.conversations = {conv["conversation_id"]: conv for conv in convs}
                for conv in convs:
                    if "unread" in conv:
                        self.unread[conv["conversation_id"]] = conv["unread"]
                for n, conv in enumerate(convs, 1):
                    mark = ">" if conv["conversation_id"] == self.current else " "
                    unread = self.unread.get(conv["conversation_id"], 0)
                    extra = f" {YELLOW}{unread} unread{RESET}" if unread else ""
                    self.say(f"{mark}{n:>3}  {label(conv, self.me):<24} {DIM}{conv['kind']}{RESET}{extra}")
        elif name == "open" and args:
            cid = self.find(rest.strip())
            if cid is None:
                self.say(f"{RED}no conversation {rest.strip()!r}; /list shows them")
            else:
                self.open(cid)
        elif name == "dm" and len(args) == 1:
            conv = c.create_direct(args[0])
            with self.lock:
                self.conversations[conv["conversation_id"]] = conv
            self.open(conv["conversation_id"])
        elif name == "group" and len(args) >= 2:
            conv = c.create_group(args[1:], args[0])
            with self.lock:
                self.conversations[conv["conversation_id"]] = conv
            self.open(conv["conversation_id"])
        elif name == "invite" and args:
            c.invite(self.current, args)
            self.note(f"invited {', '.join(args)}")
        elif name == "leave":
            c.leave(self.current)
            with self.lock:
                self.conversations.pop(self.current, None)
            self.open("global")
        elif name == "history":
            if self.oldest_shown is None or self.oldest_shown <= 1:
                self.note("nothing older")
            else:
                page = c.get_prior_messages(self.current, before_seq=self.oldest_shown, limit=HISTORY)
                self.note(f"{len(page['messages'])} older messages")
                with self.lock:
                    for m in page["messages"]:
                        self.shown[m["seq"]] = m
                        self.show_message(m)
                    if page["messages"]:
                        self.oldest_shown = page["messages"][0]["seq"]
        elif name == "who":
            users = c.get_active_users()
            self.note("online: " + ", ".join(u["user_id"] for u in users))
        elif name == "reply" and len(args) >= 2:
            m = c.reply(self.message(args[0])["message_id"], rest.split(" ", 1)[1])
            self.note(f"replied in thread {m['conversation_id'][-6:]} (/list, /open to read it)")
        elif name == "edit" and len(args) >= 2:
            c.edit_message(self.message(args[0])["message_id"], rest.split(" ", 1)[1])
        elif name == "delete" and len(args) == 1:
            c.delete_message(self.message(args[0])["message_id"])
        elif name == "react" and len(args) == 2:
            m = self.message(args[0])
            mine = self.me in (m.get("reactions") or {}).get(args[1], [])
            change = c.react(m["message_id"], args[1], not mine)
            with self.lock:
                self.shown[m["seq"]] = change["message"]
                self.show_message(change["message"], prefix=f"{DIM}(reacted) {RESET}")
        elif name == "search" and args:
            results = c.search_messages(rest.strip())
            self.note(f"{len(results['messages'])} found" + (" (more exist)" if results["has_more"] else ""))
            for m in results["messages"]:
                found = self.conversations.get(m["conversation_id"])
                where = label(found, self.me) if found else "?"
                self.show_message(m, prefix=f"{YELLOW}[{where}]{RESET} ")
        else:
            self.say(f"{RED}unknown command or missing arguments: /{name}; /help lists them")
        return True

    def on_keystroke(self, text: str) -> None:
        """Tells the others we are typing, at most every 3 seconds."""
        now = time.monotonic()
        if text and not text.startswith("/") and now - self.last_typing > 3 and self.current != "global":
            self.last_typing = now
            with contextlib.suppress(ChatBridgeError):
                self.client.typing(self.current)

    def main(self) -> int:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.formatted_text import ANSI
        from prompt_toolkit.patch_stdout import patch_stdout

        self.client.on(None, self.on_event)
        try:
            session = self.client.connect()
        except ConnectionFailed as exc:
            print(f"chat-bridge chat: {exc}", file=sys.stderr)
            return 1
        self.status = "online"
        for conv in session["conversations"]:
            self.conversations[conv["conversation_id"]] = conv
            if conv.get("unread"):
                self.unread[conv["conversation_id"]] = conv["unread"]
        prompt: PromptSession[str] = PromptSession(
            bottom_toolbar=lambda: ANSI(self.toolbar()), refresh_interval=1.0
        )
        prompt.default_buffer.on_text_changed += lambda b: self.on_keystroke(b.text)
        with patch_stdout(raw=True):
            self.say(f"{BOLD}connected as {self.me}{RESET}; /help for commands")
            self.open(self.current)
            while True:
                try:
                    with self.lock:
                        here = self.conversations.get(self.current)
                    line = prompt.prompt(ANSI(f"{BOLD}[{label(here, self.me) if here else '?'}]{RESET} > "))
                except (EOFError, KeyboardInterrupt):
                    break
                try:
                    if not self.command(line.strip()):
                        break
                except ProtocolError as exc:
                    self.say(f"{RED}{exc.code}: {exc.message}")
                except (ChatBridgeError, LookupError, ValueError) as exc:
                    self.say(f"{RED}{exc}")
        self.client.close()
        return 0
