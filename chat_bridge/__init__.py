"""chat_bridge: the Python SDK for chat-bridge (`chat_bridge.client`) and its test helpers
(`chat_bridge.testing`)."""

from __future__ import annotations

from .aio import AsyncClient
from .client import Client
from .errors import (
    BadRequest,
    ChatBridgeError,
    ConnectionFailed,
    Forbidden,
    InternalError,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    RateLimited,
    RequestTimeout,
    UnknownCommand,
)
from .types import Conversation, Event, Message, User

__all__ = [
    "AsyncClient",
    "BadRequest",
    "ChatBridgeError",
    "Client",
    "ConnectionFailed",
    "Conversation",
    "Event",
    "Forbidden",
    "InternalError",
    "Message",
    "NotFound",
    "PayloadTooLarge",
    "ProtocolError",
    "RateLimited",
    "RequestTimeout",
    "UnknownCommand",
    "User",
]
