"""Run the Node.js interop programs of interop/node/ as real processes on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tabadol.governance.load import googleapis_root
from tests.support.processes import ROOT, Process

NODE_DIR = ROOT / "interop" / "node"
PROTOS = ROOT / "protos"
# The contracts import google/api/annotations.proto (their HTTP rules), which is not under
# protos/: the Node programs find it where googleapis-common-protos put it.
GOOGLEAPIS = googleapis_root()
SETUP_HINT = "run `make setup` (it runs `npm ci --prefix interop/node`)"


def node_executable() -> str:
    """The ``node`` binary; fails the test, never skips it, when Node.js or its packages are missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node is missing: the cross-language interop tests need Node.js 18+ and npm "
            f"(apt-get install nodejs npm), then {SETUP_HINT}",
            pytrace=False,
        )
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(
            f"{NODE_DIR / 'node_modules'} has no @grpc/grpc-js: {SETUP_HINT}", pytrace=False
        )
    return node


@dataclass(frozen=True)
class ConsumerRun:
    """What one run of consumer.js printed and how it exited."""

    exit_code: int
    document: dict[str, Any]
    stderr: str


async def run_consumer(
    broker_address: str,
    credentials: Path,
    case: str,
    *args: str,
    stdin: str = "",
    timeout: float = 30,
    script: str = "consumer.js",
) -> ConsumerRun:
    """Run ``SCRIPT CASE ARGS...`` (consumer.js unless told) against a broker and parse the
    JSON it prints."""
    argv = [
        node_executable(),
        str(NODE_DIR / script),
        "--broker", broker_address,
        "--credentials", str(credentials),
        "--protos", str(PROTOS),
        "--include", str(GOOGLEAPIS),
        "--timeout", "10",
        case,
        *args,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{script} {case} did not finish within {timeout} s", pytrace=False)
    assert proc.returncode is not None
    try:
        document = json.loads(out)
    except json.JSONDecodeError:
        pytest.fail(
            f"{script} {case} exited {proc.returncode} without a JSON document;\n"
            f"stdout: {out.decode(errors='replace')}\nstderr: {err.decode(errors='replace')}",
            pytrace=False,
        )
    return ConsumerRun(proc.returncode, document, err.decode(errors="replace"))


async def start_provider(credentials: Path, timeout: float = 30) -> tuple[Process, int]:
    """Start provider.js with an agency bundle; returns the process and its loopback port."""
    proc = await asyncio.create_subprocess_exec(
        node_executable(),
        str(NODE_DIR / "provider.js"),
        "--credentials", str(credentials),
        "--protos", str(PROTOS),
        "--include", str(GOOGLEAPIS),
        "--listen", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,  # so that a start-up failure shows in the assertion
        cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    process = Process(proc, proc.stdout)
    try:
        ready = await process.wait_for(r"^listening on (\d+)$", timeout)
    except BaseException:
        await process.stop()
        raise
    return process, int(ready.group(1))
