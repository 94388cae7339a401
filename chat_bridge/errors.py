"""The SDK's exceptions. A `ProtocolError` subclass per error code of the protocol.

ChatBridgeError
├── ProtocolError          the bridge answered with an `error` event (code, message, command)
│   ├── BadRequest         bad-request
│   ├── UnknownCommand     unknown-command
│   ├── NotFound           not-found
│   ├── Forbidden          forbidden
│   ├── PayloadTooLarge    payload-too-large
│   ├── RateLimited        rate-limited (carries retry_after)
│   └── InternalError      internal (nothing was done; the command may be retried)
├── RequestTimeout         no answer within the timeout (also a TimeoutError)
└── ConnectionFailed       the broker could not be reached or refused us (also a ConnectionError)
"""

from __future__ import annotations

from typing import Any, ClassVar


class ChatBridgeError(Exception):
    """Everything the SDK raises on purpose."""


class ProtocolError(ChatBridgeError):
    """The bridge refused a command: the `error` event's fields, as attributes."""

    code: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        command: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code or self.code}: {message}" + (f" ({command})" if command else ""))
        self.message = message
        self.command = command
        self.request_id = request_id
        if code is not None:
            self.code = code  # type: ignore[misc]  # an error code this SDK does not know yet


class BadRequest(ProtocolError):
    code = "bad-request"


class UnknownCommand(ProtocolError):
    code = "unknown-command"


class NotFound(ProtocolError):
    code = "not-found"


class Forbidden(ProtocolError):
    code = "forbidden"


class PayloadTooLarge(ProtocolError):
    code = "payload-too-large"


class RateLimited(ProtocolError):
    code = "rate-limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class InternalError(ProtocolError):
    code = "internal"


class RequestTimeout(ChatBridgeError, TimeoutError):
    """No answer to a command within its timeout (the command may still have been applied)."""

    def __init__(self, command: str, request_id: str, timeout: float) -> None:
        super().__init__(f"no answer to {command} (request_id {request_id}) within {timeout:g} s")
        self.command = command
        self.request_id = request_id


class ConnectionFailed(ChatBridgeError, ConnectionError):
    """The broker could not be reached, refused the credentials, or the client was closed."""


ERRORS: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (BadRequest, UnknownCommand, NotFound, Forbidden, PayloadTooLarge, RateLimited, InternalError)
}


def error_from(data: dict[str, Any], request_id: str | None) -> ProtocolError:
    """The exception for an `error` event's data."""
    code = str(data.get("code") or "")
    message = str(data.get("message") or code)
    command = data.get("command") if isinstance(data.get("command"), str) else None
    cls = ERRORS.get(code)
    if cls is RateLimited:
        retry = data.get("retry_after")
        return RateLimited(
            message,
            retry_after=float(retry) if isinstance(retry, int | float) else 1.0,
            command=command,
            request_id=request_id,
        )
    if cls is None:
        return ProtocolError(message, code=code or "unknown", command=command, request_id=request_id)
    return cls(message, command=command, request_id=request_id)
