"""MQTT 3.1.1 packets: encoding, and a strict incremental decoder.

The bridge's hot path is PUBLISH out, PUBACK in, PUBLISH in and PUBACK out;
those are plain byte concatenation and a `struct` call each. Everything the
broker sends is validated before it is acted on: a malformed packet raises
`MalformedPacket` and the connection is dropped, never half-applied.

A `Decoder` is built for one direction. `Decoder(from_server=True)` (the
client's) accepts only what a server may send (CONNACK, PUBLISH, PUBACK,
SUBACK, UNSUBACK, PINGRESP); `from_server=False` accepts what a client may send
(used by the tests' fake brokers). QoS 2 is not supported: the client never
publishes or subscribes at QoS 2, so a server that sends QoS 2 breaks the
protocol.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

NAMES = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
}

MAX_REMAINING_LENGTH = 268_435_455  # four bytes of variable-length integer
SUBACK_FAILURE = 0x80

CONNACK_REASONS = {
    0: "accepted",
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}

_H = struct.Struct("!H")
_BBH = struct.Struct("!BBH")
_BBBH = struct.Struct("!BBBH")
_PUBACK = bytes([PUBACK << 4, 2])
PINGREQ_PACKET = bytes([PINGREQ << 4, 0])
PINGRESP_PACKET = bytes([PINGRESP << 4, 0])
DISCONNECT_PACKET = bytes([DISCONNECT << 4, 0])


class MalformedPacket(ValueError):
    """The peer sent bytes that are not a valid MQTT 3.1.1 packet for this direction."""


class PacketTooLarge(ValueError):
    """A packet is larger than the limit configured for it (or than MQTT allows)."""


# --- packets -------------------------------------------------------------------


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(slots=True)
class Connect:
    client_id: str
    keepalive: int
    clean_session: bool
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    protocol_level: int = 4


@dataclass(slots=True)
class Connack:
    session_present: bool
    return_code: int


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0


@dataclass(slots=True)
class Puback:
    packet_id: int


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    topics: list[tuple[str, int]]


@dataclass(slots=True)
class Suback:
    packet_id: int
    return_codes: list[int]


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    topics: list[str]


@dataclass(slots=True)
class Unsuback:
    packet_id: int


@dataclass(slots=True)
class Pingreq:
    pass


@dataclass(slots=True)
class Pingresp:
    pass


@dataclass(slots=True)
class Disconnect:
    pass


Packet = (
    Connect
    | Connack
    | Publish
    | Puback
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
)

# --- encoding --------------------------------------------------------------------


def remaining_length(n: int) -> bytes:
    """The variable-length integer of the fixed header."""
    if n < 128:
        return bytes((n,))
    if n < 16_384:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n > MAX_REMAINING_LENGTH:
        raise PacketTooLarge(f"a packet's remaining length is at most {MAX_REMAINING_LENGTH} bytes, not {n}")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    if len(raw) > 65_535:
        raise PacketTooLarge(f"an MQTT string is at most 65535 bytes, not {len(raw)}")
    return _H.pack(len(raw)) + raw


def _check_topic_name(topic: str) -> None:
    if not topic:
        raise ValueError("a topic name must not be empty")
    if "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"a topic name must not contain wildcards or NUL: {topic!r}")


def _check_filter(topic_filter: str) -> None:
    if not topic_filter or "\0" in topic_filter:
        raise ValueError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            raise ValueError(f"invalid topic filter {topic_filter!r}")


def encode_connect(packet: Connect) -> bytes:
    if not 0 <= packet.keepalive <= 65_535:
        raise ValueError("keepalive must be between 0 and 65535 seconds")
    flags = 0x02 if packet.clean_session else 0
    payload = _string(packet.client_id)
    if packet.will is not None:
        will = packet.will
        _check_topic_name(will.topic)
        if will.qos not in (0, 1, 2):
            raise ValueError("a will's QoS is 0, 1 or 2")
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        payload += _string(will.topic) + _string(will.payload)
    if packet.username is not None:
        flags |= 0x80
        payload += _string(packet.username)
    if packet.password is not None:
        if packet.username is None:
            raise ValueError("MQTT 3.1.1 sends a password only with a user name")
        flags |= 0x40
        payload += _string(packet.password)
    body = b"\x00\x04MQTT" + bytes((packet.protocol_level, flags)) + _H.pack(packet.keepalive) + payload
    return bytes((CONNECT << 4,)) + remaining_length(len(body)) + body


def encode_connack(packet: Connack) -> bytes:
    return bytes((CONNACK << 4, 2, 1 if packet.session_present else 0, packet.return_code))


def encode_publish(
    topic: bytes, payload: bytes, qos: int, retain: bool = False, packet_id: int = 0, dup: bool = False
) -> bytes:
    """A PUBLISH from an already encoded topic name (the caller validated it: see `topic_bytes`)."""
    first = 0x30 | qos << 1 | (1 if retain else 0) | (8 if dup else 0)
    tlen = len(topic)
    n = tlen + len(payload) + (4 if qos else 2)
    if n < 128:
        head = _BBH.pack(first, n, tlen)
    elif n < 16_384:
        head = _BBBH.pack(first, n & 0x7F | 0x80, n >> 7, tlen)
    else:
        head = bytes((first,)) + remaining_length(n) + _H.pack(tlen)
    if qos:
        return b"".join((head, topic, _H.pack(packet_id), payload))
    return b"".join((head, topic, payload))


def topic_bytes(topic: str) -> bytes:
    """A topic name, validated and encoded for `encode_publish`."""
    _check_topic_name(topic)
    raw = topic.encode()
    if len(raw) > 65_535:
        raise PacketTooLarge(f"a topic name is at most 65535 bytes, not {len(raw)}")
    return raw


def encode_publish_packet(packet: Publish) -> bytes:
    return encode_publish(
        topic_bytes(packet.topic), packet.payload, packet.qos, packet.retain, packet.packet_id, packet.dup
    )


def encode_puback(packet_id: int) -> bytes:
    return _PUBACK + _H.pack(packet_id)


def encode_subscribe(packet_id: int, topics: list[tuple[str, int]]) -> bytes:
    if not topics:
        raise ValueError("SUBSCRIBE needs at least one topic filter")
    body = bytearray(_H.pack(packet_id))
    for topic_filter, qos in topics:
        _check_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise ValueError("a subscription's QoS is 0, 1 or 2")
        body += _string(topic_filter) + bytes((qos,))
    return bytes((SUBSCRIBE << 4 | 2,)) + remaining_length(len(body)) + bytes(body)


def encode_suback(packet: Suback) -> bytes:
    body = _H.pack(packet.packet_id) + bytes(packet.return_codes)
    return bytes((SUBACK << 4,)) + remaining_length(len(body)) + body


def encode_unsubscribe(packet_id: int, topics: list[str]) -> bytes:
    if not topics:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    body = bytearray(_H.pack(packet_id))
    for topic_filter in topics:
        _check_filter(topic_filter)
        body += _string(topic_filter)
    return bytes((UNSUBSCRIBE << 4 | 2,)) + remaining_length(len(body)) + bytes(body)


def encode_unsuback(packet_id: int) -> bytes:
    return bytes((UNSUBACK << 4, 2)) + _H.pack(packet_id)


def encode(packet: Packet) -> bytes:
    """Any packet (the client's hot path calls the specific encoders directly)."""
    if isinstance(packet, Connect):
        return encode_connect(packet)
    if isinstance(packet, Connack):
        return encode_connack(packet)
    if isinstance(packet, Publish):
        return encode_publish_packet(packet)
    if isinstance(packet, Puback):
        return encode_puback(packet.packet_id)
    if isinstance(packet, Subscribe):
        return encode_subscribe(packet.packet_id, packet.topics)
    if isinstance(packet, Suback):
        return encode_suback(packet)
    if isinstance(packet, Unsubscribe):
        return encode_unsubscribe(packet.packet_id, packet.topics)
    if isinstance(packet, Unsuback):
        return encode_unsuback(packet.packet_id)
    if isinstance(packet, Pingreq):
        return PINGREQ_PACKET
    if isinstance(packet, Pingresp):
        return PINGRESP_PACKET
    return DISCONNECT_PACKET


# --- decoding --------------------------------------------------------------------

_SERVER_SENDS = frozenset({CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP})
_CLIENT_SENDS = frozenset({CONNECT, PUBLISH, PUBACK, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT})
# The fixed header's low four bits, where MQTT 3.1.1 fixes them (PUBLISH carries flags instead).
_RESERVED_FLAGS = {SUBSCRIBE: 2, UNSUBSCRIBE: 2, PUBREL: 2}


def _utf8(raw: bytes, what: str) -> str:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not valid UTF-8") from None
    if "\0" in text:
        raise MalformedPacket(f"{what} contains U+0000")
    return text


def _packet_id(body: bytes, at: int, kind: int) -> int:
    if len(body) < at + 2:
        raise MalformedPacket(f"{NAMES[kind]} is too short for its packet identifier")
    pid = int(_H.unpack_from(body, at)[0])
    if pid == 0:
        raise MalformedPacket(f"{NAMES[kind]} has packet identifier 0")
    return pid


@dataclass(slots=True)
class Decoder:
    """Feed it bytes as they arrive; it returns the whole packets they complete.

    `max_packet_size` bounds a whole packet (fixed header included): a larger
    one is refused as soon as its length is known, before it is buffered.
    """

    from_server: bool = True
    max_packet_size: int = MAX_REMAINING_LENGTH + 5
    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buffer
        buf += data
        out: list[Packet] = []
        pos = 0
        end = len(buf)
        allowed = _SERVER_SENDS if self.from_server else _CLIENT_SENDS
        while pos < end:
            first = buf[pos]
            if first == 0x40 and end - pos >= 4 and buf[pos + 1] == 2:  # PUBACK: the hot path
                pid = buf[pos + 2] << 8 | buf[pos + 3]
                if not pid:
                    raise MalformedPacket("PUBACK has packet identifier 0")
                out.append(Puback(pid))
                pos += 4
                continue
            kind = first >> 4
            if kind not in allowed:
                side = "a server" if self.from_server else "a client"
                what = NAMES.get(kind, f"unknown packet type {kind}")
                raise MalformedPacket(f"{what} is not a packet {side} may send")
            if end - pos < 2:
                break
            # the variable-length integer: at most four bytes
            n = buf[pos + 1]
            if n < 128:
                length, header = n, 2
            else:
                length, shift, i, complete = n & 0x7F, 7, pos + 2, False
                while i < end:
                    n = buf[i]
                    i += 1
                    length |= (n & 0x7F) << shift
                    if n < 128:
                        complete = True
                        break
                    shift += 7
                    if i - pos > 4:
                        raise MalformedPacket("the remaining length takes more than four bytes")
                if not complete:
                    break
                header = i - pos
            if header + length > self.max_packet_size:
                raise PacketTooLarge(
                    f"a {NAMES[kind]} of {header + length} bytes exceeds the limit of {self.max_packet_size}"
                )
            if end - pos < header + length:
                break
            start = pos + header
            pos = start + length
            if kind == PUBLISH:
                out.append(_publish_at(buf, first & 0x0F, start, pos))
            else:
                out.append(self._decode(kind, first & 0x0F, bytes(buf[start:pos])))
        if pos:
            del buf[:pos]
        return out

    def _decode(self, kind: int, flags: int, body: bytes) -> Packet:
        if kind == PUBLISH:
            return _decode_publish(flags, body)
        if flags != _RESERVED_FLAGS.get(kind, 0):
            raise MalformedPacket(f"{NAMES[kind]} with reserved flags {flags:#x}")
        if kind == PUBACK:
            if len(body) != 2:
                raise MalformedPacket("PUBACK must have a remaining length of 2")
            return Puback(_packet_id(body, 0, kind))
        if kind == CONNACK:
            if len(body) != 2:
                raise MalformedPacket("CONNACK must have a remaining length of 2")
            ack_flags, code = body[0], body[1]
            if ack_flags & 0xFE:
                raise MalformedPacket(f"CONNACK with reserved acknowledge flags {ack_flags:#x}")
            if code not in CONNACK_REASONS:
                raise MalformedPacket(f"CONNACK with unknown return code {code}")
            if code and ack_flags:
                raise MalformedPacket("a refusing CONNACK must not claim a session")
            return Connack(bool(ack_flags), code)
        if kind == SUBACK:
            pid = _packet_id(body, 0, kind)
            codes = list(body[2:])
            if not codes:
                raise MalformedPacket("SUBACK without return codes")
            if any(c not in (0, 1, 2, SUBACK_FAILURE) for c in codes):
                raise MalformedPacket(f"SUBACK with an invalid return code in {codes}")
            return Suback(pid, codes)
        if kind == UNSUBACK:
            if len(body) != 2:
                raise MalformedPacket("UNSUBACK must have a remaining length of 2")
            return Unsuback(_packet_id(body, 0, kind))
        if kind in (PINGRESP, PINGREQ, DISCONNECT):
            if body:
                raise MalformedPacket(f"{NAMES[kind]} must have a remaining length of 0")
            return Pingresp() if kind == PINGRESP else Pingreq() if kind == PINGREQ else Disconnect()
        if kind == CONNECT:
            return _decode_connect(body)
        if kind == SUBSCRIBE:
            return _decode_subscribe(body)
        return _decode_unsubscribe(body)


def _decode_publish(flags: int, body: bytes) -> Publish:
    return _publish_at(body, flags, 0, len(body))


def _publish_at(buf: bytes | bytearray, flags: int, start: int, end: int) -> Publish:
    """The PUBLISH whose variable header and payload are buf[start:end] (no copy of the body)."""
    qos = (flags >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    if qos == 2:
        raise MalformedPacket("PUBLISH with QoS 2, which this client never asks for")
    dup = bool(flags & 8)
    if dup and not qos:
        raise MalformedPacket("a QoS 0 PUBLISH must not have the DUP flag")
    if end - start < 2:
        raise MalformedPacket("PUBLISH is too short for its topic name")
    at = start + 2 + (buf[start] << 8 | buf[start + 1])
    if at > end:
        raise MalformedPacket("PUBLISH topic name runs past the end of the packet")
    try:
        topic = buf[start + 2 : at].decode()
    except UnicodeDecodeError:
        raise MalformedPacket("the PUBLISH topic name is not valid UTF-8") from None
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise MalformedPacket(f"invalid PUBLISH topic name {topic!r}")
    pid = 0
    if qos:
        if end - at < 2:
            raise MalformedPacket("PUBLISH is too short for its packet identifier")
        pid = buf[at] << 8 | buf[at + 1]
        if not pid:
            raise MalformedPacket("PUBLISH has packet identifier 0")
        at += 2
    return Publish(topic, bytes(buf[at:end]), qos, bool(flags & 1), dup, pid)


class _Reader:
    def __init__(self, body: bytes, kind: int) -> None:
        self.body, self.at, self.kind = body, 0, kind

    def left(self) -> int:
        return len(self.body) - self.at

    def byte(self) -> int:
        if self.at >= len(self.body):
            raise MalformedPacket(f"{NAMES[self.kind]} is truncated")
        b = self.body[self.at]
        self.at += 1
        return b

    def binary(self) -> bytes:
        if self.left() < 2:
            raise MalformedPacket(f"{NAMES[self.kind]} is truncated")
        n = _H.unpack_from(self.body, self.at)[0]
        start = self.at + 2
        if len(self.body) < start + n:
            raise MalformedPacket(f"a string in {NAMES[self.kind]} runs past the end of the packet")
        self.at = start + n
        return self.body[start : self.at]

    def string(self, what: str) -> str:
        return _utf8(self.binary(), what)


def _decode_connect(body: bytes) -> Connect:
    r = _Reader(body, CONNECT)
    if r.binary() != b"MQTT":
        raise MalformedPacket("CONNECT for a protocol other than MQTT")
    level, flags = r.byte(), r.byte()
    if flags & 1:
        raise MalformedPacket("CONNECT with the reserved flag set")
    keepalive = (r.byte() << 8) | r.byte()
    client_id = r.string("the client identifier")
    will = None
    if flags & 0x04:
        topic = r.string("the will topic")
        will = Will(topic, r.binary(), (flags >> 3) & 3, bool(flags & 0x20))
        if will.qos == 3:
            raise MalformedPacket("CONNECT with will QoS 3")
    elif flags & 0x38:
        raise MalformedPacket("CONNECT with will QoS or retain but no will")
    username = r.string("the user name") if flags & 0x80 else None
    password = r.binary() if flags & 0x40 else None
    if r.left():
        raise MalformedPacket("CONNECT with trailing bytes")
    return Connect(client_id, keepalive, bool(flags & 2), will, username, password, level)


def _decode_subscribe(body: bytes) -> Subscribe:
    r = _Reader(body, SUBSCRIBE)
    pid = _packet_id(body, 0, SUBSCRIBE)
    r.at = 2
    topics = []
    while r.left():
        topic = r.string("a topic filter")
        qos = r.byte()
        if qos > 2:
            raise MalformedPacket("SUBSCRIBE with an invalid QoS")
        topics.append((topic, qos))
    if not topics:
        raise MalformedPacket("SUBSCRIBE without topic filters")
    return Subscribe(pid, topics)


def _decode_unsubscribe(body: bytes) -> Unsubscribe:
    r = _Reader(body, UNSUBSCRIBE)
    pid = _packet_id(body, 0, UNSUBSCRIBE)
    r.at = 2
    topics = []
    while r.left():
        topics.append(r.string("a topic filter"))
    if not topics:
        raise MalformedPacket("UNSUBSCRIBE without topic filters")
    return Unsubscribe(pid, topics)
