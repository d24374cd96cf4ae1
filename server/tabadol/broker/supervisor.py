"""``tabadol broker --workers N``: N broker processes on one port, under one supervisor.

Each worker is a whole broker with its own event loop, bound to the same address (gRPC sets
SO_REUSEPORT on Linux, so the kernel spreads connections across them). The supervisor:

- restarts a worker that dies (at most once a second per slot, so a crash loop stays slow);
- forwards SIGHUP to every worker after checking the new configuration once itself;
- on SIGTERM or SIGINT, forwards it and waits: each worker drains its in-flight calls
  within ``shutdown_grace_seconds``, flushes its ledger records and spans, and exits;
- serves ``/metrics`` for the whole broker from the workers' shared metric files, over
  HTTPS to operators and auditors, with the broker's certificate and CRL, re-read on SIGHUP.

A worker whose supervisor dies (even by SIGKILL) gets SIGTERM from the kernel and drains.

All workers write the one ledger (``tabadol.ledger.store``: each batch links to the head it
finds inside SQLite's write transaction).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tabadol import config as config_module
from tabadol.broker.credentials import BrokerCredentials
from tabadol.errors import ConfigError, TabadolError
from tabadol.revocation import RevocationList

if TYPE_CHECKING:
    from tabadol.broker.metrics_server import MetricsServer

log = logging.getLogger("tabadol.broker")

WORKER_ENV = "TABADOL_WORKER"  # set in workers: the supervisor serves the metrics
SUPERVISOR_ENV = "TABADOL_SUPERVISOR_PID"  # set in workers: whom they follow
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_SPACING_S = 1.0


class Supervisor:
    def __init__(self, config_path: Path, workers: int) -> None:
        self.config_path = config_path
        self.count = workers
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self.restarts = 0
        self._metrics_dir = Path(tempfile.mkdtemp(prefix="tabadol-metrics-"))
        self._last_start: dict[int, float] = {}
        self.credentials: BrokerCredentials | None = None  # for /metrics; loaded by run()

    async def _spawn(self, slot: int) -> None:
        spacing = self._last_start.get(slot, 0.0) + RESTART_SPACING_S - time.monotonic()
        if spacing > 0:
            await asyncio.sleep(spacing)
        if self.stopping:  # SIGTERM came while waiting: a new worker would never get it
            return
        self._last_start[slot] = time.monotonic()
        env = {
            **os.environ,
            WORKER_ENV: str(slot),
            SUPERVISOR_ENV: str(os.getpid()),
            METRICS_DIR_ENV: str(self._metrics_dir),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tabadol.cli", "broker", "--config", str(self.config_path),
            env=env,
        )  # fmt: skip
        self.workers[slot] = process
        log.info("worker %d started (pid %d)", slot, process.pid)
        if self.stopping:  # SIGTERM came while it was starting: pass it on
            process.send_signal(signal.SIGTERM)

    async def _watch(self, slot: int) -> None:
        """Keep a worker running in this slot until the supervisor stops."""
        while True:
            process = self.workers.get(slot)
            if process is None:  # stopped before this slot's first worker started
                return
            code = await process.wait()
            _mark_dead(process.pid, self._metrics_dir)
            if self.stopping:
                return
            log.error(
                "worker %d (pid %d) exited with status %s; restarting it", slot, process.pid, code
            )
            self.restarts += 1
            await self._spawn(slot)

    def _forward(self, sig: signal.Signals) -> None:
        for process in self.workers.values():
            if process.returncode is None:
                process.send_signal(sig)

    def _current_credentials(self) -> BrokerCredentials:
        if self.credentials is None:
            raise RuntimeError("the supervisor's credentials are loaded before /metrics serves")
        return self.credentials

    def _reload(self) -> None:
        try:
            cfg = config_module.load(self.config_path)
            # The workers load the same files: what the supervisor refuses, they would too.
            held = self.credentials.crl if self.credentials is not None else None
            self.credentials = _load_credentials(cfg, held)
        except ConfigError as e:
            log.error("configuration reload refused; the workers keep the previous one:\n%s", e)
            return
        log.info("configuration checked; asking %d workers to reload", len(self.workers))
        self._forward(signal.SIGHUP)

    async def run(self) -> int:
        cfg = config_module.load(self.config_path)
        host, _, port = cfg.broker.listen.rpartition(":")
        if int(port) == 0 and self.count > 1:
            raise ConfigError(
                f"{cfg.path}: [broker] listen: workers share one port; port 0 would give each "
                "its own, so name a port"
            )
        self.credentials = _load_credentials(cfg)
        metrics = _serve_metrics(self._metrics_dir, cfg, self._current_credentials)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def stop(sig: signal.Signals) -> None:
            if not self.stopping:
                log.info("stopping: asking %d workers to drain", len(self.workers))
                self.stopping = True
                self._forward(sig)
            done.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        for slot in range(self.count):
            await self._spawn(slot)
        log.info(
            "supervising %d broker workers on %s:%s (metrics on %s)",
            self.count, host, port, cfg.broker.metrics_listen,
        )  # fmt: skip
        watchers = [asyncio.create_task(self._watch(slot)) for slot in range(self.count)]
        await done.wait()
        await asyncio.gather(*watchers)
        codes = [p.returncode for p in self.workers.values()]
        if metrics is not None:
            metrics.stop()
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("all workers stopped (exit statuses %s)", codes)
        return 0 if all(code == 0 for code in codes) else 1


def _mark_dead(pid: int, directory: Path) -> None:
    """Drop a dead worker's live gauges (in-flight calls, backlog) from the shared scrape."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    except Exception as e:  # the scrape is approximate for a moment; say so, carry on
        log.warning("could not clear the metrics of worker pid %d: %s", pid, e)


def _load_credentials(
    cfg: config_module.BrokerConfig, held: RevocationList | None = None
) -> BrokerCredentials:
    return BrokerCredentials.load(cfg.broker.pki_dir, cfg.broker.trust_domain, cfg.path, held=held)


def _serve_metrics(
    directory: Path, cfg: config_module.BrokerConfig, credentials: Callable[[], BrokerCredentials]
) -> MetricsServer | None:
    listen = cfg.broker.metrics_listen
    if listen is None:
        return None
    from prometheus_client import CollectorRegistry, multiprocess

    from tabadol.broker.metrics_server import MetricsServer

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    try:
        server = MetricsServer(listen, registry, credentials, cfg.broker.trust_domain)
    except ConfigError as e:
        raise ConfigError(f"{cfg.path}: {e}") from e
    except OSError as e:
        raise TabadolError(
            f"[broker] metrics_listen: cannot listen on {listen}: {e.strerror}"
        ) from e
    server.start()
    return server


def follow_supervisor(stop: Callable[[], None]) -> None:
    """In a worker: ``stop`` (drain and exit) when the supervisor dies, even by SIGKILL.

    The kernel sends SIGTERM to the worker when its parent ends (Linux ``PR_SET_PDEATHSIG``),
    so no orphaned worker goes on serving, or holding the port, without a supervisor.
    """
    parent = os.environ.get(SUPERVISOR_ENV)
    if parent is None:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        log.warning("this worker cannot follow its supervisor (prctl: %s); stop it by hand", e)
        return
    if os.getppid() != int(parent):  # the supervisor died before the request took effect
        stop()


def worker_slot() -> int | None:
    """This process's worker slot when run by a supervisor, else None."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None else None


async def supervise(config_path: Path, workers: int) -> int:
    return await Supervisor(config_path, workers).run()
