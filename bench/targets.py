"""What the load generator calls, each in its own process on loopback: the echo provider
directly, the Tabadol broker with every feature on (over gRPC, and over its HTTP entry as
Connect JSON and as a REST route), nginx, and the bare Python pass-through.

Each target knows how a consumer reaches it (an ``Endpoint``) and whose CPU time is the
proxy's (process ids, read from /proc, children included).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.person_contract import REST_PATH, write_contracts  # noqa: E402
from bench.person_contract import SERVICE as PERSON_SERVICE  # noqa: E402
from tabadol.pki import CertificateAuthority  # noqa: E402
from tabadol.spiffe import agency_dns_name, broker_dns_name  # noqa: E402
from tests.conftest import DEFAULT_GRANTS, TRUST_DOMAIN, broker_toml  # noqa: E402
from tests.support.load import BrokerProcess, unused_port  # noqa: E402
from tests.support.processes import TABADOL, Process  # noqa: E402

PROVIDER_NAME = agency_dns_name(TRUST_DOMAIN, "echo")  # echo.agency.tabadol.example
BROKER_NAME = broker_dns_name(TRUST_DOMAIN)  # what every proxy's certificate proves
NGINX_WORKERS = 1
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User plus system CPU time of a process (all its threads) from /proc/<pid>/stat; with
    ``reaped_children``, also that of its children that have ended (cutime, cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and every descendant, living or ended (nginx: master + workers)."""
    total = cpu_seconds(pid, reaped_children=True)
    for child in psutil.Process(pid).children(recursive=True):
        # One that ended between listing and reading counts in cutime once reaped.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(child.pid)
    return total


@dataclass(frozen=True)
class Endpoint:
    """How a consumer reaches a target: address, its own credentials, the name to verify,
    and the protocol: gRPC, or the broker's HTTP entry as Connect JSON or a REST route."""

    address: str
    ca: Path
    cert: Path
    key: Path
    server_name: str
    protocol: str = "grpc"  # grpc | connect | rest


@dataclass
class Target:
    name: str
    endpoint: Endpoint
    description: str
    pids: list[int] = field(default_factory=list)  # the proxy's processes; none for direct

    def cpu_seconds(self) -> float:
        return sum(tree_cpu_seconds(pid) for pid in self.pids)


@dataclass(frozen=True)
class Platform:
    """One PKI, the bench's contracts (the echo and the person echo) and the consumer's and
    broker's credentials."""

    dir: Path
    pki: Path
    contracts: Path

    @classmethod
    def create(cls, directory: Path) -> Platform:
        ca = CertificateAuthority.init(directory / "pki", TRUST_DOMAIN)
        ca.issue_broker()
        for agency in ("echo", "post"):
            ca.issue_agency(agency)
        ca.issue_person("operator", "prometheus")  # reads /metrics (BrokerProcess.metric)
        ca.issue_ops()  # the span collector's: the broker exports to it over mTLS
        contracts = write_contracts(directory / "bench.pb")
        return cls(directory, ca.dir, contracts)

    @property
    def provider_credentials(self) -> Path:
        return self.pki / "agencies" / "echo"

    def as_consumer(self, address: str, protocol: str = "grpc") -> Endpoint:
        """The agency ``post`` calling a proxy that presents the broker's certificate."""
        bundle = self.pki / "agencies" / "post"
        return Endpoint(
            address, bundle / "ca.crt", bundle / "agency.crt", bundle / "agency.key",
            BROKER_NAME, protocol,
        )  # fmt: skip

    def as_broker(self, address: str) -> Endpoint:
        """The broker's own certificate calling the provider: the only one it admits."""
        return Endpoint(
            address,
            self.pki / "ca.crt",
            self.pki / "broker.crt",
            self.pki / "broker.key",
            PROVIDER_NAME,
        )


# --- The provider and the trace collector -------------------------------------------------


async def start_provider(platform: Platform) -> tuple[Process, str]:
    provider = await Process.start(
        sys.executable, "-m", "bench.echo_provider", str(platform.provider_credentials),
        read="stdout",
    )  # fmt: skip
    port = (await provider.wait_for(r"listening on (\d+)"))[1]
    return provider, f"127.0.0.1:{port}"


async def start_collector(platform: Platform) -> tuple[Process, str]:
    """``tabadol ops`` in its own process: the broker's spans are ingested on its CPU, over
    mTLS, admitted by the platform PKI its configuration names."""
    config = platform.dir / "ops.toml"
    config.write_text(
        f'[broker]\ntrust_domain = "{TRUST_DOMAIN}"\npki_dir = "{platform.pki}"\n'
        f'contracts = ["{platform.contracts}"]\n'
    )
    ops = await Process.start(
        str(TABADOL), "ops", "--config", str(config), "--db", str(platform.dir / "traces.db"),
        "--http", "127.0.0.1:0", "--otlp", "127.0.0.1:0",
        read="stdout",
    )  # fmt: skip
    otlp = (await ops.wait_for(r"OTLP/gRPC with mTLS on ([\d.]+:\d+)"))[1]
    return ops, otlp


def spans_stored(platform: Platform) -> int:
    """Spans the collector has stored so far: evidence that it admitted the broker's exports."""
    store = f"file:{platform.dir / 'traces.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(store, uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM spans").fetchone()[0])


def direct(platform: Platform, provider: str) -> Target:
    return Target(
        "direct",
        platform.as_broker(provider),
        "the load generator calls the echo provider itself (mTLS with the broker's certificate)",
    )


# --- The Tabadol broker -------------------------------------------------------------------

# The person echo, served by the same provider and callable by the same consumer.
PERSON_ENTRIES = f"""
[[service]]
name = "{PERSON_SERVICE}"
provider = "echo"
endpoints = ["{{provider}}"]

[[grant]]
consumer = "post"
service = "{PERSON_SERVICE}"
methods = ["*"]
"""
HTTP_PROTOCOLS = {
    "connect": "Connect protocol, application/json, HTTP/2",
    "rest": "REST route (POST {path}, JSON), HTTP/2",
}


async def start_broker(
    platform: Platform,
    provider: str,
    otlp: str,
    *,
    name: str = "broker",
    sampler: str = "",
    ledger_url: str | None = None,
    gateway: bool = False,
) -> tuple[BrokerProcess, Target]:
    """``tabadol broker --config`` with every feature: mTLS both legs, authorization,
    tracing exported over OTLP with mTLS (its own certificate), the ledger in batched mode and
    /metrics. With ``ledger_url``, the ledger is on PostgreSQL (the node named ``name``); with
    ``gateway``, its HTTP entry listens too (``http_targets``)."""
    directory = platform.dir / name
    directory.mkdir()
    tracing = f'otlp_endpoint = "https://{otlp}"' + (f'\nsampler = "{sampler}"' if sampler else "")
    text = broker_toml(
        pki_dir=platform.pki, contracts=platform.contracts, endpoints=[provider],
        grants=DEFAULT_GRANTS, tracing=tracing,
        extra_broker=f'instance = "{name}"' if ledger_url else "",
    )  # fmt: skip
    url = f'url = "{ledger_url}"\n' if ledger_url else ""
    entry = f'\n[gateway]\nlisten = "127.0.0.1:{unused_port()}"\n' if gateway else ""
    config = directory / "broker.toml"
    config.write_text(
        f"{text}{PERSON_ENTRIES.format(provider=provider)}{entry}\n"
        f'[ledger]\npath = "ledger.db"\n{url}mode = "batched"\n'
    )
    broker = await BrokerProcess.start(config, metrics_port=0)
    broker.metrics_port = await logged_metrics_port(broker)
    description = "tabadol broker: mTLS, identity, policy, tracing, ledger, metrics"
    if sampler:
        description += f" (sampler {sampler})"
    return broker, Target(name, platform.as_consumer(broker.address), description, [broker.pid])


def http_targets(platform: Platform, broker: BrokerProcess, target: Target) -> list[Target]:
    """The broker's HTTP entry, Connect JSON and REST: the same process as ``target``, so
    the same CPU clocks; a row each beside its gRPC row."""
    found = re.search(r'\[gateway\]\nlisten = "([\d.]+:\d+)"', broker.config.read_text())
    if found is None:
        raise RuntimeError(f"{broker.config} has no [gateway] listen: start it with gateway=True")
    return [
        Target(
            f"{target.name}-{protocol}",
            platform.as_consumer(found[1], protocol),
            f"{target.name}'s HTTP entry: {how.format(path=REST_PATH)}",
            target.pids,
        )
        for protocol, how in HTTP_PROTOCOLS.items()
    ]


async def logged_metrics_port(broker: BrokerProcess) -> int:
    """The /metrics port the broker logs (it was asked for any free one)."""
    pattern = r"metrics at https://[\d.]+:(\d+)/metrics"
    logged = re.search(pattern, broker.lines[await broker.wait_for_log(pattern)])
    assert logged is not None
    return int(logged[1])


async def broker_counters(broker: BrokerProcess) -> dict[str, float]:
    """Evidence the features really ran: ledger records written, spans dropped."""
    return {
        "ledger_records_written": await broker.metric("tabadol_ledger_records_written_total"),
        "spans_dropped": await broker.metric("tabadol_spans_dropped_total"),
    }


# --- The bare Python pass-through ---------------------------------------------------------


async def start_bare(platform: Platform, provider: str) -> tuple[Process, Target]:
    bare = await Process.start(
        sys.executable, str(ROOT / "bench" / "bare_proxy.py"),
        "--pki", str(platform.pki), "--contracts", str(platform.contracts),
        "--provider", provider, "--provider-name", PROVIDER_NAME,
        read="stdout",
    )  # fmt: skip
    port = (await bare.wait_for(r"listening on (\d+)"))[1]
    target = Target(
        "bare",
        platform.as_consumer(f"127.0.0.1:{port}"),
        "grpc.aio bytes pass-through, mTLS both legs, no features (bench/bare_proxy.py)",
        [bare.proc.pid],
    )
    return bare, target


# --- nginx ----------------------------------------------------------------------------------


def find_nginx(install: bool = True) -> tuple[str | None, str]:
    """nginx's path, installing Debian's package if it is missing and we may; else None and
    why not."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found:
        return found, "found"
    if not install:
        return None, "nginx is not installed"
    if not shutil.which("apt-get"):
        return None, "nginx is not installed and there is no apt-get to install it"
    if os.geteuid() != 0:
        return None, "nginx is not installed; installing it needs root: apt-get install nginx"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "-qq", "nginx"]
    print("nginx: not found; running apt-get install -y nginx", flush=True)
    done = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # perhaps stale package lists
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        done = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"apt-get install nginx failed: {last[0]}"
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return (found, "installed") if os.access(found, os.X_OK) else (None, "nginx not found")


def nginx_version(nginx: str) -> tuple[int, ...]:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else (0, 0, 0)


def nginx_conf(platform: Platform, listen: str, provider: str, version: tuple[int, ...]) -> str:
    """gRPC over mTLS on both legs, one worker, upstream connections kept alive."""
    pki = platform.pki
    # `http2 on` exists from nginx 1.25.1; older versions say it on the listen line.
    http2_listen, http2_directive = (
        ("", "        http2 on;\n") if version >= (1, 25, 1) else (" http2", "")
    )
    return f"""worker_processes {NGINX_WORKERS};
pid nginx.pid;
error_log error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    upstream echo_provider {{
        server {provider};
        keepalive 128;               # without it, every call is a new TLS handshake
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }}
    server {{
        listen {listen} ssl{http2_listen};
{http2_directive}        ssl_certificate {pki / "broker.crt"};
        ssl_certificate_key {pki / "broker.key"};
        ssl_client_certificate {pki / "ca.crt"};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_requests 100000000;  # HTTP/2: no GOAWAY after 1000 calls
        keepalive_timeout 600s;
        client_max_body_size 0;  # a stream's messages add up: 1 MiB (the default) resets it
        location / {{
            grpc_pass grpcs://echo_provider;
            grpc_ssl_certificate {pki / "broker.crt"};
            grpc_ssl_certificate_key {pki / "broker.key"};
            grpc_ssl_trusted_certificate {pki / "ca.crt"};
            grpc_ssl_verify on;
            grpc_ssl_name {PROVIDER_NAME};
            grpc_ssl_server_name on;
            grpc_ssl_protocols TLSv1.2 TLSv1.3;
            grpc_read_timeout 600s;
            grpc_send_timeout 600s;
        }}
    }}
}}
"""


class NginxProcess:
    """nginx in the foreground: a master and its workers, its output in files (a worker
    holding a pipe open would outlive a killed master)."""

    def __init__(self, proc: asyncio.subprocess.Process, prefix: Path) -> None:
        self.proc = proc
        self.prefix = prefix

    @classmethod
    async def start(cls, nginx: str, prefix: Path, conf: Path) -> NginxProcess:
        with (prefix / "stderr.log").open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
                "-g", "daemon off;",
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        return cls(proc, prefix)

    def log(self) -> str:
        """What nginx said on stderr and in its error log."""
        return "".join(
            path.read_text(errors="replace")
            for path in (self.prefix / "stderr.log", self.prefix / "error.log")
            if path.exists()
        )

    async def stop(self) -> None:
        """SIGTERM: the master stops its workers, then exits; SIGKILL each of them if not."""
        if self.proc.returncode is not None:
            return
        workers = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def start_nginx(
    platform: Platform, provider: str, nginx: str
) -> tuple[NginxProcess, Target, tuple[int, ...]]:
    """nginx in the foreground (``daemon off``) from a generated configuration."""
    prefix = platform.dir / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    prefix.chmod(0o755)  # the worker may run as nobody
    port = unused_port()
    version = nginx_version(nginx)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(platform, f"127.0.0.1:{port}", provider, version))
    process = await NginxProcess.start(nginx, prefix, conf)
    try:
        await _listening(port, process)
    except BaseException:
        await process.stop()
        raise
    target = Target(
        "nginx",
        platform.as_consumer(f"127.0.0.1:{port}"),
        f"nginx {'.'.join(map(str, version))} grpc_pass grpcs://, mTLS both legs, "
        f"worker_processes {NGINX_WORKERS}",
        [process.proc.pid],
    )
    return process, target, version


async def _listening(port: int, process: NginxProcess, timeout: float = 10) -> None:
    """Until nginx accepts connections on ``port``: a bounded poll (it prints nothing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if process.proc.returncode is not None:
            raise RuntimeError(f"nginx exited with {process.proc.returncode}: {process.log()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise RuntimeError(
                    f"nginx did not listen on port {port} within {timeout}s: {process.log()}"
                ) from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
