"""The MQTT 3.1.1 codec: round trips, byte-exact encodings, and broker input it must refuse."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import mqtt_codec as c


def decode_one(data: bytes, *, from_server: bool = True, max_packet_size: int | None = None) -> c.Packet:
    decoder = c.Decoder(from_server=from_server)
    if max_packet_size is not None:
        decoder.max_packet_size = max_packet_size
    packets = decoder.feed(data)
    assert len(packets) == 1
    return packets[0]


# --- encodings, byte for byte (MQTT 3.1.1 section 3) ---------------------------


def test_connect_bytes() -> None:
    packet = c.encode_connect(
        c.Connect(
            "chat-bridge",
            30,
            clean_session=False,
            will=c.Will("chat/v1/bridge/status", b"off", qos=1, retain=True),
            username="u",
            password=b"p",
        )
    )
    body = (
        b"\x00\x04MQTT\x04"
        + bytes([0x80 | 0x40 | 0x20 | 0x08 | 0x04])
        + b"\x00\x1e"
        + b"\x00\x0bchat-bridge"
        + b"\x00\x15chat/v1/bridge/status"
        + b"\x00\x03off"
        + b"\x00\x01u\x00\x01p"
    )
    assert packet == bytes([0x10, len(body)]) + body


def test_publish_bytes() -> None:
    assert c.encode_publish(b"a/b", b"hi", 1, retain=True, packet_id=258) == b"\x33\x09\x00\x03a/b\x01\x02hi"
    assert c.encode_publish(b"a/b", b"hi", 0) == b"\x30\x07\x00\x03a/bhi"
    assert c.encode_publish(b"a", b"", 1, packet_id=1, dup=True)[0] == 0x3A


def test_small_packets_bytes() -> None:
    assert c.encode_puback(7) == b"\x40\x02\x00\x07"
    assert c.encode_subscribe(1, [("a/+", 1)]) == b"\x82\x08\x00\x01\x00\x03a/+\x01"
    assert c.encode_unsubscribe(2, ["a/#"]) == b"\xa2\x07\x00\x02\x00\x03a/#"
    assert c.PINGREQ_PACKET == b"\xc0\x00"
    assert c.DISCONNECT_PACKET == b"\xe0\x00"


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length(n: int, encoded: bytes) -> None:
    assert c.remaining_length(n) == encoded


def test_remaining_length_over_the_maximum() -> None:
    with pytest.raises(c.PacketTooLarge):
        c.remaining_length(268_435_456)


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "a\0b"])
def test_invalid_topic_names_are_not_encoded(topic: str) -> None:
    with pytest.raises(ValueError):
        c.topic_bytes(topic)


@pytest.mark.parametrize("topic_filter", ["", "a+/b", "a/#/b", "a/b#", "x\0"])
def test_invalid_filters_are_not_encoded(topic_filter: str) -> None:
    with pytest.raises(ValueError):
        c.encode_subscribe(1, [(topic_filter, 1)])


def test_a_password_needs_a_user_name() -> None:
    with pytest.raises(ValueError):
        c.encode_connect(c.Connect("x", 30, True, password=b"p"))


# --- round trips -------------------------------------------------------------


SERVER_PACKETS: list[c.Packet] = [
    c.Connack(True, 0),
    c.Connack(False, 5),
    c.Publish("chat/v1/users/alice/inbox", b'{"type":"x"}', qos=1, retain=False, dup=True, packet_id=65535),
    c.Publish("t", b"", qos=0, retain=True),
    c.Puback(1),
    c.Suback(9, [1, 0x80]),
    c.Unsuback(3),
    c.Pingresp(),
]
CLIENT_PACKETS: list[c.Packet] = [
    c.Connect("alice:phone", 60, False, c.Will("w", b"gone", 1, True), "alice", b"pw"),
    c.Connect("x", 0, True),
    c.Publish("a/b", b"x" * 300, qos=1, packet_id=12),
    c.Puback(65535),
    c.Subscribe(4, [("a/+/c", 1), ("#", 0)]),
    c.Unsubscribe(5, ["a/#"]),
    c.Pingreq(),
    c.Disconnect(),
]


@pytest.mark.parametrize("packet", SERVER_PACKETS, ids=lambda p: type(p).__name__)
def test_server_packets_round_trip(packet: c.Packet) -> None:
    assert decode_one(c.encode(packet)) == packet


@pytest.mark.parametrize("packet", CLIENT_PACKETS, ids=lambda p: type(p).__name__)
def test_client_packets_round_trip(packet: c.Packet) -> None:
    assert decode_one(c.encode(packet), from_server=False) == packet


@given(
    st.text(alphabet=st.characters(blacklist_characters="+#\0", blacklist_categories=("Cs",)), min_size=1),
    st.binary(max_size=20_000),
    st.integers(1, 65_535),
    st.booleans(),
    st.lists(st.integers(1, 50), max_size=8),
)
def test_publishes_survive_any_split(
    topic: str, payload: bytes, pid: int, retain: bool, cuts: list[int]
) -> None:
    packet = c.Publish(topic, payload, qos=1, retain=retain, packet_id=pid)
    data = c.encode(packet) * 2 + c.encode_puback(pid)
    decoder = c.Decoder()
    out: list[c.Packet] = []
    at = 0
    for cut in cuts:
        out += decoder.feed(data[at : at + cut])
        at += cut
    out += decoder.feed(data[at:])
    assert out == [packet, packet, c.Puback(pid)]


def test_one_byte_at_a_time() -> None:
    data = b"".join(c.encode(p) for p in SERVER_PACKETS)
    decoder = c.Decoder()
    out: list[c.Packet] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == SERVER_PACKETS


# --- malformed broker input --------------------------------------------------


def test_truncated_packets_wait_for_the_rest() -> None:
    for packet in SERVER_PACKETS:
        data = c.encode(packet)
        decoder = c.Decoder()
        assert decoder.feed(data[:-1]) == []
        assert decoder.feed(data[-1:]) == [packet]


MALFORMED = {
    # remaining length: five bytes, or a fixed-size packet with the wrong length
    "remaining length of five bytes": b"\x30\xff\xff\xff\xff\x01",
    "PUBACK of length 3": b"\x40\x03\x00\x01\x00",
    "PUBACK of length 1": b"\x40\x01\x00",
    "PUBACK id 0": b"\x40\x02\x00\x00",
    "PUBACK with flags": b"\x42\x02\x00\x01",
    "CONNACK of length 3": b"\x20\x03\x00\x00\x00",
    "CONNACK reserved flags": b"\x20\x02\x02\x00",
    "CONNACK unknown code": b"\x20\x02\x00\x06",
    "CONNACK refusal with session": b"\x20\x02\x01\x05",
    "PINGRESP with a body": b"\xd0\x01\x00",
    "UNSUBACK of length 0": b"\xb0\x00",
    "SUBACK without codes": b"\x90\x02\x00\x01",
    "SUBACK bad code": b"\x90\x03\x00\x01\x03",
    # PUBLISH: flags, topic, packet id
    "PUBLISH QoS 3": b"\x36\x05\x00\x01a\x00\x01",
    "PUBLISH QoS 2": b"\x34\x05\x00\x01a\x00\x01",
    "PUBLISH QoS 0 with DUP": b"\x38\x03\x00\x01a",
    "PUBLISH topic past the end": b"\x32\x05\x00\x09a\x00\x01",
    "PUBLISH too short for topic": b"\x30\x01\x00",
    "PUBLISH QoS 1 without packet id": b"\x32\x03\x00\x01a",
    "PUBLISH packet id 0": b"\x32\x05\x00\x01a\x00\x00",
    "PUBLISH empty topic": b"\x30\x02\x00\x00",
    "PUBLISH wildcard topic": b"\x30\x04\x00\x02a#",
    "PUBLISH invalid UTF-8 topic": b"\x30\x04\x00\x02\xc3\x28",
    "PUBLISH NUL in topic": b"\x30\x04\x00\x02a\x00",
    # packet types: unknown (0, 15), QoS 2 flow, and what only a client sends
    "type 0": b"\x00\x00",
    "type 15": b"\xf0\x00",
    "PUBREC": b"\x50\x02\x00\x01",
    "PUBREL": b"\x62\x02\x00\x01",
    "PUBCOMP": b"\x70\x02\x00\x01",
    "CONNECT from a server": c.encode_connect(c.Connect("x", 1, True)),
    "SUBSCRIBE from a server": c.encode_subscribe(1, [("a", 1)]),
    "PINGREQ from a server": b"\xc0\x00",
    "DISCONNECT from a server": b"\xe0\x00",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_server_input_is_refused(data: bytes) -> None:
    with pytest.raises(c.MalformedPacket):
        c.Decoder().feed(data)


def test_unknown_type_is_refused_before_its_body_arrives() -> None:
    with pytest.raises(c.MalformedPacket):
        c.Decoder().feed(b"\xf0")


def test_five_byte_length_is_refused_before_the_body_arrives() -> None:
    decoder = c.Decoder()
    assert decoder.feed(b"\x30\xff\xff\xff") == []
    with pytest.raises(c.MalformedPacket):
        decoder.feed(b"\xff")


def test_oversized_packet_is_refused_from_its_header() -> None:
    decoder = c.Decoder(max_packet_size=1024)
    header = b"\x30" + c.remaining_length(2000)
    with pytest.raises(c.PacketTooLarge):
        decoder.feed(header)  # refused before a byte of the body is buffered
    largest = c.encode_publish(b"t", b"x" * 1018, 0)
    assert len(largest) == 1024
    assert len(c.Decoder(max_packet_size=1024).feed(largest)) == 1


def test_a_client_decoder_refuses_server_packets() -> None:
    for data in (b"\x20\x02\x00\x00", b"\x90\x03\x00\x01\x01", b"\xd0\x00"):
        with pytest.raises(c.MalformedPacket):
            c.Decoder(from_server=False).feed(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x1e\x00\x00",  # not MQTT
        b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x1e\x00\x00",  # reserved flag
        b"\x10\x0c\x00\x04MQTT\x04\x0a\x00\x1e\x00\x00",  # will QoS without a will
        b"\x10\x0a\x00\x04MQTT\x04\x02\x00\x1e",  # no client id
        b"\x80\x06\x00\x01\x00\x01a\x01",  # SUBSCRIBE without its reserved flags
        b"\x82\x06\x00\x01\x00\x01a\x03",  # SUBSCRIBE QoS 3
        b"\x82\x02\x00\x01",  # SUBSCRIBE without filters
    ],
)
def test_malformed_client_input_is_refused(data: bytes) -> None:
    with pytest.raises(c.MalformedPacket):
        c.Decoder(from_server=False).feed(data)


@given(st.binary(max_size=64))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    with contextlib.suppress(c.MalformedPacket, c.PacketTooLarge):
        c.Decoder().feed(data)
