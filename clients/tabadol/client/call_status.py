"""Keep the status a peer sent when grpc.aio loses a race between a write and the call's end.

When a client-streaming or bidirectional call ends (the peer answered early with an error,
or its connection dropped) while a request message is still being written, grpc.aio
replaces the call's status with its own ``INTERNAL: Internal error from Core``
(https://github.com/grpc/grpc/issues/36066). A consumer would then see INTERNAL where the
provider sent, say, INVALID_ARGUMENT, or even OK with its answer, and the broker would
relay a status no one sent.

:func:`keep_call_status` changes that step: a write that fails because the call ended
waits for the status Core is about to deliver and reports it. Only if none arrives within
five seconds does the call end INTERNAL, as before. The half-close after the last request
has the same race, where grpc.aio cancelled the call, so that its caller got
CancelledError instead of the status (a deadline, a provider gone) that ended it; it
waits for that status in the same way. The broker applies it at start, and
:func:`tabadol.client.connect` applies it for an agency's own calls; it is idempotent.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import _common
from grpc._cython import cygrpc
from grpc.aio import _call

# How long a failed write waits for the status that explains it.
STATUS_GRACE_S = 5.0
# How Core says it refused a batch before starting it (a misuse, not the call's end).
_REFUSED_UP_FRONT = "Failed grpc_call_start_batch"


async def _write(self: Any, request: Any) -> None:
    # grpc.aio's _StreamRequestMixin._write (grpcio 1.85), but for the InternalError branch.
    if self.done():
        raise asyncio.InvalidStateError(_call._RPC_ALREADY_FINISHED_DETAILS)
    if self._done_writing_flag:
        raise asyncio.InvalidStateError(_call._RPC_HALF_CLOSED_DETAILS)
    if not self._metadata_sent.is_set():
        await self._metadata_sent.wait()
        if self.done():
            await self._raise_for_status()

    serialized_request = _common.serialize(request, self._request_serializer)
    try:
        await self._cython_call.send_serialized_message(serialized_request)
    except cygrpc.InternalError as err:
        if str(err).startswith(_REFUSED_UP_FRONT):  # no status is on its way: fail now
            self._cython_call.set_internal_error(str(err))
            await self._raise_for_status()
        await _ended(self, err)
        await self._raise_for_status()
        # It ended OK (a peer may answer before reading everything): this message was not
        # sent, as for any write after the end.
        raise asyncio.InvalidStateError(_call._RPC_ALREADY_FINISHED_DETAILS) from err
    except asyncio.CancelledError:
        if not self.cancelled():
            self.cancel()
        raise


async def _done_writing(self: Any) -> None:
    # grpc.aio's _StreamRequestMixin._done_writing (grpcio 1.85), but for an InternalError:
    # there the request iterator's consumer cancelled the call, so that its caller got
    # CancelledError instead of the status (a deadline, a provider gone) that ended it.
    if self.done():
        return
    if not self._done_writing_flag:
        self._done_writing_flag = True
        try:
            await self._cython_call.send_receive_close()
        except cygrpc.InternalError as err:
            if str(err).startswith(_REFUSED_UP_FRONT):
                raise
            await _ended(self, err)  # ended: its status says how, as for a finished call
        except asyncio.CancelledError:
            if not self.cancelled():
                self.cancel()
            raise


async def _ended(self: Any, err: Exception) -> None:
    """Wait for the status of a call whose batch failed because it ended: Core delivers it a
    moment later (or already has). INTERNAL, as before, only if none arrives in time."""
    try:
        await asyncio.wait_for(self._cython_call.status(), STATUS_GRACE_S)
    except TimeoutError:
        self._cython_call.set_internal_error(str(err))
    except asyncio.CancelledError:
        if not self.cancelled():
            self.cancel()
        raise


# The names grpc.aio's own steps use in the grpcio these were taken from (1.85). Steps that
# differ are left alone: they may be fixed, or no longer match these copies.
_ORIGINALS = {
    "_write": (_write, frozenset({
        "CancelledError", "InternalError", "InvalidStateError", "_RPC_ALREADY_FINISHED_DETAILS",
        "_RPC_HALF_CLOSED_DETAILS", "_common", "_cython_call", "_done_writing_flag",
        "_metadata_sent", "_raise_for_status", "_request_serializer", "asyncio", "cancel",
        "cancelled", "cygrpc", "done", "is_set", "send_serialized_message", "serialize",
        "set_internal_error", "str", "wait",
    })),
    "_done_writing": (_done_writing, frozenset({
        "CancelledError", "_cython_call", "_done_writing_flag", "asyncio", "cancel",
        "cancelled", "done", "send_receive_close",
    })),
}  # fmt: skip


def keep_call_status() -> bool:
    """Install the corrected steps into grpc.aio (once per process). False when this
    grpcio's steps are not the ones they correct, which are then left as they are."""
    mixin: Any = getattr(_call, "_StreamRequestMixin", None)
    for name, (replacement, names) in _ORIGINALS.items():
        original = getattr(mixin, name, None)
        if original is replacement:
            continue
        code = getattr(original, "__code__", None)
        if code is None or frozenset(code.co_names) != names:
            return False
    for name, (replacement, _) in _ORIGINALS.items():
        setattr(mixin, name, replacement)
    return True
