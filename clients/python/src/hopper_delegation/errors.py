"""One exception per gRPC status code, under :class:`HopperError`.

``retryable`` follows the README's "Retries and resuming" table: UNAVAILABLE, ABORTED and
DEADLINE_EXCEEDED may succeed when retried (a write after UNAVAILABLE or DEADLINE_EXCEEDED may
have committed: creates carry a ``request_id`` for that); every refusal gets the same answer
again. The server's error details are decoded: :class:`InvalidArgument` names its ``field``,
:class:`CursorExpired` says where the event log now begins.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import grpc


class HopperError(Exception):
    """A call the service refused or could not serve."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Unavailable(HopperError):
    """The server or its database cannot serve now; retry with backoff, here or elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class Aborted(HopperError):
    """The database rolled the request back (deadlock, serialization); nothing was written."""

    code = grpc.StatusCode.ABORTED
    retryable = True


class DeadlineExceeded(HopperError):
    """The call's deadline passed; a write may have committed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class ResourceExhausted(HopperError):
    """No room to write (a full disk) or a message too large; nothing was written."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class InvalidArgument(HopperError):
    """A request field is malformed; ``field`` names it."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(HopperError):
    """A record the request names does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(HopperError):
    """The id is taken, or the request id was used for a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(HopperError):
    """The current state forbids the request; the message names the state."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(HopperError):
    """The caller is known, but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(HopperError):
    """No credentials, or ones the server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class OutOfRange(HopperError):
    """A cursor outside what the event log holds."""

    code = grpc.StatusCode.OUT_OF_RANGE


class CursorExpired(OutOfRange):
    """The events after the cursor were pruned: re-read the state, then resume after
    ``resume_after`` (``oldest_available`` is the first sequence the log still holds)."""

    def __init__(self, message: str, resume_after: int, oldest_available: int) -> None:
        super().__init__(message)
        self.resume_after = resume_after
        self.oldest_available = oldest_available


class Internal(HopperError):
    """A bug of the server's; its log has the details."""

    code = grpc.StatusCode.INTERNAL


class Cancelled(HopperError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class Unimplemented(HopperError):
    """The server does not have this RPC (it is older than this client)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class DataLoss(HopperError):
    """Unrecoverable data loss (the service does not send it; a proxy may)."""

    code = grpc.StatusCode.DATA_LOSS


class Unknown(HopperError):
    """A status the service does not send (from a proxy, say)."""

    code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[HopperError]] = {
    cls.code: cls
    for cls in (
        Unavailable,
        Aborted,
        DeadlineExceeded,
        ResourceExhausted,
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        OutOfRange,
        Internal,
        Cancelled,
        Unimplemented,
        DataLoss,
        Unknown,
    )
}

_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


def from_rpc_error(error: grpc.RpcError) -> HopperError:
    """The :class:`HopperError` of a failed call (sync or ``grpc.aio``)."""
    call: Any = error
    code: grpc.StatusCode = call.code()
    message: str = call.details() or ""
    details = _details(call.trailing_metadata())
    if code == grpc.StatusCode.OUT_OF_RANGE and _ERROR_INFO in details:
        try:
            reason, metadata = _error_info(details[_ERROR_INFO])
        except (ValueError, IndexError, UnicodeDecodeError):
            reason, metadata = "", {}
        if reason == "CURSOR_EXPIRED":
            return CursorExpired(
                message,
                resume_after=int(metadata.get("resume_after_sequence", "0")),
                oldest_available=int(metadata.get("oldest_available_sequence", "0")),
            )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(message, _first_field(details.get(_BAD_REQUEST)))
    if _transient_reset(code, message):
        return Unavailable(message)
    return _BY_CODE.get(code, Unknown)(message)


_RESET = re.compile(r"RST_STREAM with error code (\d+)\b")


def _transient_reset(code: grpc.StatusCode, message: str) -> bool:
    """A stream reset by a dying server or a proxy: grpcio reports NO_ERROR and
    INTERNAL_ERROR resets as INTERNAL, CANCEL ones as CANCELLED (REFUSED_STREAM is already
    UNAVAILABLE). They are faults, to retry; a PROTOCOL_ERROR is a misconfiguration that a
    retry would meet forever."""
    if code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED):
        return False
    reset = _RESET.search(message)
    return reset is not None and int(reset[1]) in (0, 2, 7, 8)


# --- The status details, read from protobuf's wire format -----------------------------------
# google.rpc.Status {code=1, message=2, repeated Any details=3}, Any {type_url=1, value=2},
# ErrorInfo {reason=1, domain=2, map<string,string> metadata=3},
# BadRequest {repeated FieldViolation {field=1, description=2} field_violations=1}. Decoded by
# hand: googleapis-common-protos would register google.rpc in the process-wide descriptor pool
# and pin protobuf's range for three messages.


def _fields(data: bytes) -> list[tuple[int, bytes | int]]:
    """The (field number, value) pairs of a message: varints as ints, the rest as bytes."""
    out: list[tuple[int, bytes | int]] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            out.append((number, value))
        elif wire == 2:
            length, i = _varint(data, i)
            out.append((number, data[i : i + length]))
            i += length
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _details(trailers: Any) -> dict[str, bytes]:
    """The packed details of a status, by type URL (empty if none or unreadable)."""
    for key, value in trailers or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                found: dict[str, bytes] = {}
                for number, detail in _fields(value):
                    if number == 3 and isinstance(detail, bytes):
                        parts = dict(_fields(detail))
                        url, packed = parts.get(1, b""), parts.get(2, b"")
                        if isinstance(url, bytes) and isinstance(packed, bytes):
                            found[url.decode()] = packed
                return found
            except (ValueError, IndexError, UnicodeDecodeError):
                return {}
    return {}


def _error_info(data: bytes) -> tuple[str, dict[str, str]]:
    reason = ""
    metadata: dict[str, str] = {}
    for number, value in _fields(data):
        if not isinstance(value, bytes):
            continue
        if number == 1:
            reason = value.decode()
        elif number == 3:
            entry = dict(_fields(value))
            k, v = entry.get(1, b""), entry.get(2, b"")
            if isinstance(k, bytes) and isinstance(v, bytes):
                metadata[k.decode()] = v.decode()
    return reason, metadata


def _first_field(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        for number, violation in _fields(data):
            if number == 1 and isinstance(violation, bytes):
                field = dict(_fields(violation)).get(1)
                if isinstance(field, bytes):
                    return field.decode()
    except (ValueError, IndexError, UnicodeDecodeError):
        pass
    return None
