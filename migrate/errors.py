"""Errors of the node agent and how they travel: every failure reaches the
user as one line with a gRPC status code, never as a traceback."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from vmigrate.migrate import store
from vmigrate.migrate.vms import NoSuchVm, VmBusy, VmExists
from vmigrate.vmm.client import VmmError

log = logging.getLogger("vmigrate.agent")


class AgentError(Exception):
    """A request cannot be done; `code` says what kind of failure it is."""

    def __init__(self, message: str,
                 code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> None:
        super().__init__(message)
        self.code = code


class Refused(AgentError):
    """A peer refused a migration before anything moved (versions, features, CPU)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, grpc.StatusCode.FAILED_PRECONDITION)


class Cancelled(AgentError):
    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message, grpc.StatusCode.CANCELLED)


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status for an expected failure, or None for a bug."""
    if isinstance(e, AgentError):
        return e.code, str(e)
    if isinstance(e, NoSuchVm | store.NotFound):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, VmExists | store.AlreadyExists):
        return grpc.StatusCode.ALREADY_EXISTS, str(e)
    if isinstance(e, VmBusy | store.Conflict):
        return grpc.StatusCode.ABORTED, str(e)
    if isinstance(e, store.StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"cluster store unavailable: {e}"
    if isinstance(e, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, VmmError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    from vmigrate.migrate.snapfile import SnapshotError

    if isinstance(e, SnapshotError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, OSError):
        return grpc.StatusCode.INTERNAL, f"{e.strerror or e}" + (
            f": {e.filename}" if e.filename else "")
    return None


def _abort(context: grpc.ServicerContext, e: BaseException, method: str) -> None:
    st = status_of(e)
    if st is None:
        log.exception("%s failed", method)
        st = (grpc.StatusCode.INTERNAL, f"internal error in {method}: {e!r}")
    context.abort(st[0], st[1])


F = TypeVar("F", bound=Callable[..., Any])


def unary(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        self.last_call = time.monotonic()
        try:
            return fn(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as e:
            if context.code() is not None:    # already aborted
                raise
            _abort(context, e, fn.__name__)
    return wrapper  # type: ignore[return-value]


def streaming(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.last_call = time.monotonic()
        try:
            yield from fn(self, request, context)
        except grpc.RpcError:
            raise
        except GeneratorExit:
            raise
        except Exception as e:
            if context.code() is not None:
                raise
            _abort(context, e, fn.__name__)
    return wrapper  # type: ignore[return-value]
