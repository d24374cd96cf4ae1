"""A trace viewer on free loopback ports, for tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from tabadol.ops.dashboard import Accounts
from tabadol.ops.server import OpsServer


@contextlib.asynccontextmanager
async def running_ops(
    directory: Path, accounts: Accounts | None = None
) -> AsyncIterator[OpsServer]:
    """An OpsServer with its span store in ``directory``, showing ``accounts`` if given."""
    server = OpsServer(directory / "spans.db", http="127.0.0.1:0", otlp="127.0.0.1:0")
    if accounts is not None:
        server.show_ledger(accounts)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
