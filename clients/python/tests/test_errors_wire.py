"""How grpcio's statuses become exceptions, for the cases no real server here can produce: a
proxy's stream resets (transient ones are faults, a protocol error is not) and malformed
details. Real statuses are in test_errors.py."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from hopper_delegation import Cancelled, Internal, InvalidArgument, Unavailable
from hopper_delegation.errors import HopperError, from_rpc_error


class Status(grpc.RpcError):
    """A finished call's status, as grpcio's RpcError carries it."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailers: tuple[tuple[str, str | bytes], ...] = (),
    ):
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:  # grpc-stubs: a tuple of _Metadatum
        return self._trailers


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", Unavailable),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 0", Unavailable),
        (grpc.StatusCode.CANCELLED, "Received RST_STREAM with error code 8", Unavailable),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 1", Internal),
        (grpc.StatusCode.CANCELLED, "Locally cancelled by application!", Cancelled),
        (grpc.StatusCode.INTERNAL, "internal error; see the server log", Internal),
    ],
)
def test_a_transient_stream_reset_is_a_fault(
    code: grpc.StatusCode, details: str, expected: type[HopperError]
) -> None:
    error = from_rpc_error(Status(code, details))
    assert type(error) is expected
    assert error.retryable == (expected is Unavailable)


def test_malformed_details_are_ignored() -> None:
    garbage = (("grpc-status-details-bin", b"\x1a\xff\xff\xff"),)
    error = from_rpc_error(Status(grpc.StatusCode.INVALID_ARGUMENT, "title: bad", garbage))
    assert isinstance(error, InvalidArgument)
    assert error.field is None
