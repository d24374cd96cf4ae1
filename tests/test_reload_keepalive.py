"""No downtime: a new broker certificate on reload; idle links held by keepalive, never cut."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from cryptography import x509

from tabadol import config
from tabadol.client import connect
from tabadol.pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN, RunningProvider, start_broker
from tests.support.echo import UNARY


def served_certificate_serial(port: int, pki: CertificateAuthority, bundle: Path) -> int:
    """The serial of the certificate the broker presents to a new connection."""
    context = ssl.create_default_context(cafile=str(pki.dir / "ca.crt"))
    context.load_cert_chain(bundle / "agency.crt", bundle / "agency.key")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname=f"broker.{TRUST_DOMAIN}") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_renewed_broker_certificate_is_served_after_reload_without_dropping_calls(
    tmp_path: Path, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    own = CertificateAuthority.init(tmp_path / "pki", TRUST_DOMAIN)
    own.issue_broker()
    bundle = own.issue_agency("post")
    echo = own.issue_agency("echo")
    from tabadol.client import ProviderServer
    from tests.support.echo import EchoProvider

    provider = ProviderServer(echo)
    provider.server.add_generic_rpc_handlers((EchoProvider(),))
    await provider.start()
    broker = await start_broker(tmp_path, own.dir, echo_contracts, [provider.address])
    try:
        before = await asyncio.to_thread(served_certificate_serial, broker.port, own, bundle)
        async with connect(f"127.0.0.1:{broker.port}", bundle) as channel:
            in_flight = asyncio.ensure_future(
                channel.unary_unary(UNARY)(
                    b"across", metadata=(("x-test-sleep", "0.5"),), timeout=30
                )
            )
            own.issue_broker(force=True)  # renewal: a new key and certificate
            broker.reload(config.load(tmp_path / "broker.toml"))
            assert await in_flight == b"across"
            assert await channel.unary_unary(UNARY)(b"same link", timeout=10) == b"same link"
        after = await asyncio.to_thread(served_certificate_serial, broker.port, own, bundle)
        assert after != before
        renewed = x509.load_pem_x509_certificate((own.dir / "broker.crt").read_bytes())
        assert after == renewed.serial_number
        async with connect(f"127.0.0.1:{broker.port}", bundle) as channel:
            assert await channel.unary_unary(UNARY)(b"new link", timeout=10) == b"new link"
    finally:
        await broker.stop(0)
        await provider.stop(0)


def test_listeners_accept_pings_as_often_as_dialers_send_them() -> None:
    # too_many_pings is a listener's answer to pings closer together than it allows. Both
    # ends are Tabadol's: the broker and providers accept at least what the broker and
    # agencies send, with no limit on pings while calls are open.
    from tabadol.protocol import KEEPALIVE_DIAL, KEEPALIVE_LISTEN

    dial, listen = dict(KEEPALIVE_DIAL), dict(KEEPALIVE_LISTEN)
    sent_every = dial["grpc.keepalive_time_ms"]
    assert listen["grpc.http2.min_recv_ping_interval_without_data_ms"] < sent_every
    assert listen["grpc.http2.min_ping_interval_without_data_ms"] < sent_every
    assert dial["grpc.http2.max_pings_without_data"] == 0  # no cap while a call is idle
    assert dial["grpc.keepalive_timeout_ms"] < sent_every
