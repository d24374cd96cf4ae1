"""Start Tabadol processes for tests and wait on what they print, never on the clock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABADOL = Path(sys.executable).parent / "tabadol"


class Process:
    """A child process whose output lines are read as they come, into ``lines``.

    The output is drained continuously: a child blocked on a full pipe would look like a
    process that hangs.
    """

    def __init__(self, proc: asyncio.subprocess.Process, stream: asyncio.StreamReader) -> None:
        self.proc = proc
        self.lines: list[str] = []  # every line so far
        self._cursor = 0  # where the next wait_for starts looking
        self._new_line = asyncio.Event()
        self._ended = False
        self._reader = asyncio.get_running_loop().create_task(self._read(stream))

    @classmethod
    async def start(cls, *argv: str, read: str = "stderr") -> Process:
        """Start ``argv``, reading its stderr (or its stdout); the other goes nowhere."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE if read == "stdout" else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE if read == "stderr" else asyncio.subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group: stop() ends its children too
            limit=2**20,  # the longest output line read whole
        )
        stream = proc.stderr if read == "stderr" else proc.stdout
        assert stream is not None
        return cls(proc, stream)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        try:
            async for raw in stream:
                self.lines.append(raw.decode(errors="replace"))
                self._new_line.set()
        finally:
            self._ended = True
            self._new_line.set()

    async def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first line since the last match that matches ``pattern``; fails if the
        process ends first."""
        index = await self.wait_for_line(pattern, after=self._cursor, timeout=timeout)
        self._cursor = index + 1
        match = re.search(pattern, self.lines[index])
        assert match is not None
        return match

    async def wait_for_line(self, pattern: str, *, after: int = 0, timeout: float = 30) -> int:
        """The index of the first line from ``after`` on that matches ``pattern``."""

        async def scan() -> int:
            index = after
            while True:
                while index < len(self.lines):
                    if re.search(pattern, self.lines[index]):
                        return index
                    index += 1
                if self._ended:
                    raise AssertionError(
                        f"process ended before printing {pattern!r}; it printed:\n"
                        + "".join(self.lines)
                    )
                self._new_line.clear()
                await self._new_line.wait()

        try:
            return await asyncio.wait_for(scan(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no line matching {pattern!r} within {timeout:g} s; the process printed:\n"
                + "".join(self.lines)
            ) from None

    async def exit_status(self, timeout: float = 60) -> int:
        """The process's exit status once it ends by itself; fails, showing its output, if it
        has not ended within ``timeout``."""
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"the process had not ended after {timeout:g} s; it printed:\n"
                + "".join(self.lines)
            ) from None

    def kill(self) -> None:
        """SIGKILL the process, and everything it started when it leads a process group."""
        with contextlib.suppress(ProcessLookupError):  # it has ended already
            self.proc.kill()
        with contextlib.suppress(ProcessLookupError):  # no such group, or it has ended
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        """Kill the process and its children if they still run (cleanup), and finish
        reading the output. (Python 3.11's ``wait()`` returns only once every process
        holding the output pipe has ended: a worker left behind would hang it.)"""
        self.kill()
        await asyncio.wait_for(self.proc.wait(), 30)
        await asyncio.wait_for(self._reader, 30)
