"""A minimal chat client over paho-mqtt, following the protocol's session rules.

    python examples/chat_client.py alice --port 1883 [--keepalive 30]

It connects with the last will the protocol asks for, subscribes to the
user's inbox and the bridge status, sends `connect` (again whenever the bridge
announces a new epoch), prints every event it receives, and sends each line
typed on stdin as a command: `<command> <json fields>`, for example

    create-conversation {"kind": "direct", "participants": ["bob"]}
    send-message {"conversation_id": "c_...", "body": "hi"}
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import uuid

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("user")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--keepalive", type=int, default=30)
    parser.add_argument("--prefix", default="chat/v1")
    parser.add_argument(
        "--username", help="MQTT username (defaults to the user id where the broker needs one)"
    )
    parser.add_argument("--password")
    args = parser.parse_args()

    session_id = uuid.uuid4().hex[:12]
    commands = f"{args.prefix}/users/{args.user}/commands"
    inbox = f"{args.prefix}/users/{args.user}/inbox"
    status = f"{args.prefix}/bridge/status"
    epoch: list[str | None] = [None]

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{args.user}-{session_id}")
    if args.password is not None:
        client.username_pw_set(args.username or args.user, args.password)
    client.will_set(f"{commands}/disconnect", json.dumps({"session_id": session_id, "reason": "lost"}), qos=1)

    def send(command: str, fields: dict[str, object]) -> None:
        client.publish(f"{commands}/{command}", json.dumps(fields), qos=1)

    def on_connect(c: paho.Client, *_: object) -> None:
        c.subscribe([(inbox, 1), (status, 1)])

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        body = json.loads(msg.payload) if msg.payload else None
        if msg.topic == status and isinstance(body, dict):
            if body.get("status") == "online" and body.get("epoch") != epoch[0]:
                epoch[0] = body.get("epoch")
                send("connect", {"session_id": session_id, "request_id": "hello"})
            print(f"[status] {json.dumps(body)}", flush=True)
        else:
            print(f"[{args.user}] {json.dumps(body)}", flush=True)

    def no_delay(_c: paho.Client, _u: object, sock: object) -> None:
        # paho leaves Nagle on: a command published right after acknowledging a delivery could wait ~40 ms
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_connect = on_connect
    client.on_message = on_message
    client.on_socket_open = no_delay
    client.connect(args.host, args.port, keepalive=args.keepalive)
    client.loop_start()
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            command, _, rest = line.partition(" ")
            try:
                fields = json.loads(rest) if rest else {}
            except json.JSONDecodeError as exc:
                print(f"not JSON: {exc}", file=sys.stderr)
                continue
            send(command, fields)
    except KeyboardInterrupt:
        pass
    send("disconnect", {"session_id": session_id, "reason": "client"})
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
