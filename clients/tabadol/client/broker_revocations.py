"""The provider's copy of the exchange's CRL: which broker certificates it must refuse.

A provider admits calls only from the broker's certificate. When that certificate is
revoked, or superseded by a new one (``tabadol pki issue --broker --force`` revokes the old
one), the provider must refuse it too, or whoever holds the old key could call it directly
as the broker. The CRL comes from the broker (Discovery ``GetRevocationList``, every
``refresh_seconds``) or from a ``crl.pem`` file the agency keeps up to date. The platform
CA's signature makes it trustworthy whoever delivers it; its number only goes up, so an old
one cannot be replayed; and once it is stale the provider refuses the broker (fail closed).

Once a provider has held a CRL it keeps its number in ``crl.number`` beside ``crl.pem``: a
crl.pem deleted, damaged or put back older then makes it refuse the broker rather than stop
checking. (Whoever can delete both files from the credentials directory can also replace the
agency's key there: that directory is the agency's to protect.)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tabadol.client.credentials import AgencyCredentials
from tabadol.platform.v1 import discovery_pb2, discovery_pb2_grpc
from tabadol.protocol import KEEPALIVE_DIAL
from tabadol.revocation import CrlRefused, RevocationList, check_replacement, crl_number
from tabadol.spiffe import broker_dns_name
from tabadol.state_files import read_regular, replace_file

log = logging.getLogger("tabadol.client")

DEFAULT_REFRESH_SECONDS = 60.0
_FETCH_TIMEOUT_S = 5.0
_FILE_RECHECK_S = 1.0
_CALL_FETCH_EVERY_S = 5.0  # calls arriving with no CRL held ask the broker no more often


class BrokerRevocations:
    """The newest valid CRL this provider has seen, and the verdict on a broker certificate."""

    def __init__(
        self,
        credentials: AgencyCredentials,
        *,
        crl_file: Path | None = None,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        keep: Path | None = None,
    ) -> None:
        self._credentials = credentials
        self._keep = keep  # where a newer CRL from the broker is kept, for the next start
        self._ca = x509.load_pem_x509_certificate(credentials.ca_pem)
        # The number of the newest CRL ever held: none older is taken, and with none held
        # the broker is refused rather than left unchecked.
        self._number_file = keep.with_name("crl.number") if keep is not None else None
        self._number_problem: str | None = None
        self.held_before = self._read_number()
        self._crl_file = crl_file if crl_file is not None or not self.held_before else keep
        self._file_mtime = 0.0
        self.refresh_seconds = refresh_seconds
        self.current: RevocationList | None = None
        self.broker: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._fetching: asyncio.Lock | None = None
        self._last_call_fetch = -_CALL_FETCH_EVERY_S
        self._serials: dict[bytes, int] = {}
        self._warned = False
        self._file_checked = -_FILE_RECHECK_S
        self._on_newer: list[Callable[[frozenset[int]], None]] = []
        self._read_file()  # the CRL kept before: no start goes back to an older one

    def on_newer_crl(self, callback: Callable[[frozenset[int]], None]) -> None:
        """Call ``callback`` with the revoked serials whenever a newer CRL is taken (so that
        calls already in flight from a certificate it revokes can be ended)."""
        self._on_newer.append(callback)

    def offer(self, data: bytes, source: str) -> bool:
        """Take a CRL if the CA signed it and it is newer than the one held; False if not."""
        try:
            crl = RevocationList.from_bytes(data, self._ca)
            check_replacement(crl, self.current, dt.datetime.now(dt.UTC))
            if crl.number < self.held_before:
                raise CrlRefused(
                    f"the CRL is number {crl.number}, older than number {self.held_before} "
                    f"which this provider held before ({self._number_file}): a rollback"
                )
        except CrlRefused as e:
            if self.current is None or _number_of(data) != self.current.number:
                log.warning("broker CRL from %s not taken: %s", source, e)
            return False
        newer = self.current is None or crl.number > self.current.number
        if newer:
            log.info(
                "broker CRL number %d from %s: %d revoked", crl.number, source, len(crl.serials)
            )
        self.current = crl
        if newer:
            if source != str(self._crl_file):
                self._keep_crl(crl)
            self._keep_number(crl.number)
            for callback in self._on_newer:
                callback(crl.serials)
        return True

    def _keep_crl(self, crl: RevocationList) -> None:
        if self._keep is None:
            return
        pem = x509.load_der_x509_crl(crl.der).public_bytes(serialization.Encoding.PEM)
        try:
            replace_file(self._keep, pem, 0o644)
            self._crl_file = self._keep
            self._file_mtime = self._keep.stat().st_mtime
        except OSError as e:
            log.warning(
                "cannot keep the broker CRL in %s (%s): after a restart this provider takes "
                "whatever fresh CRL it is given first",
                self._keep,
                e.strerror,
            )

    def _read_number(self) -> int:
        if self._number_file is None:
            return 0
        try:
            return int(read_regular(self._number_file).decode("ascii").strip())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as e:
            # Damaged is not "never held one": fail closed, the broker is refused until fixed.
            self._number_problem = (
                f"{self._number_file} is damaged ({e}): this provider cannot tell which CRL "
                "it held before; put back the file, or remove it once crl.pem is the newest CRL"
            )
            log.error("%s", self._number_problem)
            return 1

    def _keep_number(self, number: int) -> None:
        if self._number_file is None or number <= self.held_before:
            return
        self.held_before = number
        try:
            replace_file(self._number_file, f"{number}\n".encode(), 0o644)
        except OSError as e:
            log.warning(
                "cannot keep the broker CRL's number in %s (%s): after a restart without "
                "crl.pem this provider would not know it held one",
                self._number_file,
                e.strerror or e,
            )

    def refusal(self, cert_pem: bytes) -> str | None:
        """Why the broker certificate presented must be refused now, or None."""
        self._read_file()
        if self._number_problem is not None:
            return self._number_problem
        crl = self.current
        if crl is None:
            if self.broker is None and self._crl_file is None:
                if not self._warned:  # nothing to learn revocations from: said once
                    self._warned = True
                    log.warning(
                        "provider %s: broker certificates are not checked against the CRL; "
                        "pass broker=ADDRESS to ProviderServer (or keep crl.pem in its "
                        "credentials directory)",
                        self._credentials.agency_id,
                    )
                return None
            if self.held_before:
                return (
                    f"this provider held CRL number {self.held_before} before, but "
                    f"{self._crl_file} is gone or refused: no CRL to check the broker's "
                    "certificate against"
                )
            return "this provider has no CRL yet to check the broker's certificate against"
        if crl.stale(dt.datetime.now(dt.UTC)):
            return (
                f"this provider's CRL (number {crl.number}) went stale at "
                f"{crl.next_update:%Y-%m-%d %H:%M} UTC and no fresh one has arrived"
            )
        serial = self._serial(cert_pem)
        if serial in crl.serials:
            return f"broker certificate {serial:x} is revoked (CRL number {crl.number})"
        return None

    def serial(self, cert_pem: bytes) -> int:
        """The serial number of a (broker) certificate, cached."""
        return self._serial(cert_pem)

    def _serial(self, cert_pem: bytes) -> int:
        serial = self._serials.get(cert_pem)
        if serial is None:
            serial = x509.load_pem_x509_certificate(cert_pem).serial_number
            if len(self._serials) > 64:
                self._serials.clear()
            self._serials[cert_pem] = serial
        return serial

    def _read_file(self) -> None:
        """Take crl.pem again if it changed: looked at no more than once a second, not on
        every call."""
        if self._crl_file is None:
            return
        now = time.monotonic()
        if now - self._file_checked < _FILE_RECHECK_S:
            return
        self._file_checked = now
        try:
            mtime = self._crl_file.stat().st_mtime
            if mtime == self._file_mtime:
                return
            self._file_mtime = mtime
            self.offer(read_regular(self._crl_file), str(self._crl_file))
        except OSError as e:
            if self._file_mtime != -1.0:  # said once until the file changes
                log.warning("%s: cannot read the CRL: %s", self._crl_file, e.strerror or e)
            self._file_mtime = -1.0

    def follow(self, broker_address: str) -> None:
        """Fetch the CRL from this broker now and every ``refresh_seconds``."""
        self.broker = broker_address
        creds = self._credentials
        self._channel = grpc.aio.secure_channel(
            broker_address,
            grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem),
            options=[
                ("grpc.ssl_target_name_override", broker_dns_name(creds.trust_domain)),
                *KEEPALIVE_DIAL,
            ],
        )
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def fetch(self) -> bool:
        """One fetch from the broker (one at a time); False when it could not be had."""
        if self._channel is None:
            return False
        if self._fetching is None:
            self._fetching = asyncio.Lock()
        async with self._fetching:
            stub = discovery_pb2_grpc.DiscoveryStub(self._channel)
            try:
                answer = await stub.GetRevocationList(
                    discovery_pb2.GetRevocationListRequest(), timeout=_FETCH_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as e:
                log.warning(
                    "cannot fetch the CRL from the broker at %s: %s %s",
                    self.broker,
                    e.code().name,
                    e.details(),
                )
                return False
            return self.offer(answer.crl_der, f"the broker at {self.broker}")

    async def ensure(self) -> None:
        """Before judging a call with no CRL held: try to get one, at most once every few
        seconds whatever the calls (each waiting call must not start a fetch of its own)."""
        if self.current is None and self._channel is not None:
            now = time.monotonic()
            if now - self._last_call_fetch < _CALL_FETCH_EVERY_S:
                return
            self._last_call_fetch = now
            await self.fetch()

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.fetch()
            except Exception:
                log.exception("fetching the broker's CRL failed; trying again")
            await asyncio.sleep(self.refresh_seconds)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _number_of(data: bytes) -> int | None:
    """The number of a CRL, checked or not (only to keep the log quiet about repeats)."""
    try:
        return crl_number(
            x509.load_pem_x509_crl(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_crl(data)
        )
    except ValueError:
        return None
