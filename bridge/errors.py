"""The bridge's errors. Each class is one error code of the wire protocol.

ChatError
├── BadRequest        bad-request        not JSON, not an object, a field missing, wrong type or out of range
├── UnknownCommand    unknown-command    the topic's last segment names no command
├── NotFound          not-found          the target does not exist or is not visible to the sender
├── Forbidden         forbidden          the sender may see the target but may not do this to it
├── PayloadTooLarge   payload-too-large  the payload is over the configured limit
├── RateLimited       rate-limited       the sender sent too much too fast (carries retry_after)
└── InternalError     internal           the bridge failed; nothing was done

Handlers raise these; the adapter turns them into `error` events. Backend
exceptions (SQLAlchemy, paho) are translated at the boundary, never leaked.
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorCode = Literal[
    "bad-request",
    "unknown-command",
    "not-found",
    "forbidden",
    "payload-too-large",
    "rate-limited",
    "internal",
]


class ChatError(Exception):
    code: ClassVar[ErrorCode] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ChatError):
    code = "bad-request"


class UnknownCommand(ChatError):
    code = "unknown-command"


class NotFound(ChatError):
    code = "not-found"


class Forbidden(ChatError):
    code = "forbidden"


class PayloadTooLarge(ChatError):
    code = "payload-too-large"


class RateLimited(ChatError):
    code = "rate-limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InternalError(ChatError):
    code = "internal"
