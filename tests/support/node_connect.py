"""Run interop/node/connect_consumer.js, @connectrpc/connect-node's client, against a broker's
HTTP entry as a real process."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import CONTRACTS
from tests.support.node import NODE_DIR, SETUP_HINT, node_executable


@dataclass(frozen=True)
class ConnectRun:
    """What one run printed: the responses in order, then how the call ended."""

    exit_code: int
    responses: list[dict[str, Any]]
    outcome: dict[str, Any]
    stderr: str


async def run_connect_consumer(
    url: str,
    credentials: Path,
    call: dict[str, Any],
    *options: str,
    timeout: float = 30,
) -> ConnectRun:
    """Make one call with connect_consumer.js (``options`` such as ``--codec json``); the
    call's JSON goes in on stdin."""
    node = node_executable()
    if not (NODE_DIR / "node_modules" / "@connectrpc" / "connect-node").is_dir():
        pytest.fail(
            f"{NODE_DIR / 'node_modules'} has no @connectrpc/connect-node: {SETUP_HINT}",
            pytrace=False,
        )
    argv = [
        node,
        str(NODE_DIR / "connect_consumer.js"),
        "--url", url,
        "--credentials", str(credentials),
        "--contracts", str(CONTRACTS),
        "--timeout", "10",
        *options,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(call).encode()), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"connect_consumer.js did not finish within {timeout} s", pytrace=False)
    assert proc.returncode is not None
    try:
        lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    except json.JSONDecodeError:
        lines = []
    if not lines or "response" in lines[-1]:
        pytest.fail(
            f"connect_consumer.js exited {proc.returncode} without its JSON lines;\n"
            f"stdout: {out.decode(errors='replace')}\nstderr: {err.decode(errors='replace')}",
            pytrace=False,
        )
    responses = [line["response"] for line in lines[:-1]]
    return ConnectRun(proc.returncode, responses, lines[-1], err.decode(errors="replace"))
