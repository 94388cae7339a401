"""How the broker's and the HTTP server's limits count a peer: by `address_key`."""

from __future__ import annotations

import socket

_V4_MAPPED = bytes(10) + b"\xff\xff"


def address_key(address: str) -> str:
    """What the throttle and the connection caps count a peer address as: an IPv6 address by its /64
    (one subscriber's prefix: its addresses cost nothing to change), an IPv4-mapped one as IPv4."""
    if ":" not in address:
        return address
    try:
        packed = socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
    except OSError:
        return address
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"
