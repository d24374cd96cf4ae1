"""Keep the status a peer sent when grpc.aio loses a race between a write and the call's end.

When a client-streaming or bidirectional call ends (the peer answered early with an error,
or its connection dropped) while a request message is still being written, grpc.aio
replaces the call's status with its own ``INTERNAL: Internal error from Core``
(https://github.com/grpc/grpc/issues/36066). A consumer would then see INTERNAL where the
provider sent, say, INVALID_ARGUMENT, or even OK with its answer, and the broker would
relay a status no one sent.

:func:`keep_call_status` changes that one step: a write that fails because the call ended
waits for the status Core is about to deliver and reports it. Only if none arrives within
five seconds does the call end INTERNAL, as before. The broker applies it at start, and
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
# The names grpc.aio's own write step uses in the grpcio this was taken from (1.85). Any
# other write step is left alone: it may be fixed, or no longer match this copy.
_ORIGINAL_NAMES = frozenset(
    {
        "CancelledError", "InternalError", "InvalidStateError", "_RPC_ALREADY_FINISHED_DETAILS",
        "_RPC_HALF_CLOSED_DETAILS", "_common", "_cython_call", "_done_writing_flag",
        "_metadata_sent", "_raise_for_status", "_request_serializer", "asyncio", "cancel",
        "cancelled", "cygrpc", "done", "is_set", "send_serialized_message", "serialize",
        "set_internal_error", "str", "wait",
    }
)  # fmt: skip


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
        # The write failed because the call ended: report how it ended, which Core
        # delivers a moment later (or already has), rather than an INTERNAL of our own.
        try:
            await asyncio.wait_for(self._cython_call.status(), STATUS_GRACE_S)
        except TimeoutError:
            self._cython_call.set_internal_error(str(err))
        except asyncio.CancelledError:
            if not self.cancelled():
                self.cancel()
            raise
        await self._raise_for_status()
        # It ended OK (a peer may answer before reading everything): this message was not
        # sent, as for any write after the end.
        raise asyncio.InvalidStateError(_call._RPC_ALREADY_FINISHED_DETAILS) from err
    except asyncio.CancelledError:
        if not self.cancelled():
            self.cancel()
        raise


def keep_call_status() -> bool:
    """Install the corrected write step into grpc.aio (once per process). False when this
    grpcio's write step is not the one it corrects, which is then left as it is."""
    mixin: Any = getattr(_call, "_StreamRequestMixin", None)
    original = getattr(mixin, "_write", None)
    if original is _write:
        return True
    code = getattr(original, "__code__", None)
    if code is None or frozenset(code.co_names) != _ORIGINAL_NAMES:
        return False
    mixin._write = _write
    return True
