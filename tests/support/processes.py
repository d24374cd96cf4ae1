"""Start Tabadol processes for tests and wait on what they print, never on the clock."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABADOL = Path(sys.executable).parent / "tabadol"


class Process:
    """A child process whose output lines are read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, stream: asyncio.StreamReader) -> None:
        self.proc = proc
        self._stream = stream
        self.lines: list[str] = []

    @classmethod
    async def start(cls, *argv: str, read: str = "stderr") -> Process:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if read == "stderr" else asyncio.subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        stream = proc.stderr if read == "stderr" else proc.stdout
        assert stream is not None
        return cls(proc, stream)

    async def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first new output line matching ``pattern``; fails if the process ends first."""

        async def scan() -> re.Match[str]:
            while True:
                raw = await self._stream.readline()
                if not raw:
                    raise AssertionError(
                        f"process ended before printing {pattern!r}; it printed:\n"
                        + "".join(self.lines)
                    )
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if match := re.search(pattern, line):
                    return match

        return await asyncio.wait_for(scan(), timeout)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()

    async def stop(self) -> None:
        self.kill()
        await self.proc.wait()
