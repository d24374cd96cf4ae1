"""Archive files of a ledger chain's oldest sealed batches, and their check.

An archive is a zip container, as X-Road's message log archives are (docs/ledger.md,
"Archives"): ``mimetype``; ``ledger.jsonl`` (deflated), a header line, the signers'
certificates, then each sealed batch as its seal, its timestamp token if any, and its
records; and ``META-INF/signature.json``, the broker's ECDSA signature over SHA-256 of
``ledger.jsonl``. The chain runs on from one file to the next and into the live store.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import lzma
import multiprocessing
import os
import re
import stat
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tabadol.errors import TabadolError
from tabadol.ledger.record import (
    FIELD_NAMES,
    FIELD_TYPES,
    PROTOCOLS,
    SCHEMA_VERSION,
    LedgerRecord,
    Seal,
    StoredRecord,
    chain_digest,
)
from tabadol.ledger.rollup import DAY_ZONE, Rollup, to_ns
from tabadol.ledger.seal import Sealer, signature_valid, signed_by
from tabadol.ledger.store.base import (
    ArchivedPrefix,
    ArchiveLog,
    LedgerLog,
    RollupLog,
    SealTimestamp,
    TimestampLog,
)
from tabadol.ledger.verify import Start, Verdict, verify

FORMAT = "tabadol-ledger-archive/1"
MIMETYPE = b"application/vnd.tabadol.ledger-archive+zip"
SUFFIX = ".tabadol-archive"
COMPRESSION = zipfile.ZIP_DEFLATED  # docs/ledger.md, "Archives": why not LZMA
CONTENT = "ledger.jsonl"
SIGNATURE = "META-INF/signature.json"
# What an archive holds, each once: a file with any other member (or one twice, which zip
# allows and readers resolve differently) is no archive of ours.
MEMBERS = frozenset({"mimetype", CONTENT, SIGNATURE})
# A line of ledger.jsonl is a record, a seal, a token or a certificate: a few KB. A longer
# one is refused before it is held whole, so a file that inflates to gigabytes (a
# decompression bomb handed to the auditor) costs a bounded amount of memory.
MAX_LINE = 1 << 20
_MAX_SMALL_MEMBER = 1 << 16  # mimetype and META-INF/signature.json
RECORDS_PER_FILE = 1_000_000  # `ledger archive --records-per-file`: whole batches, so a bit more
_NAME = re.compile(r"ledger-(.+)-(\d{12})-(\d{12})" + re.escape(SUFFIX))
_SAFE_CHAIN = re.compile(r"[A-Za-z0-9._:@+-]+")

# What reading a damaged or cut-short file raises: zip's, LZMA's and JSON's errors.
_UNREADABLE = (OSError, ValueError, EOFError, LookupError, zipfile.BadZipFile, lzma.LZMAError)
SignerProblem = Callable[[bytes, int], str | None]  # a certificate and a time (ns): why not


class ArchiveRefused(TabadolError):
    """Nothing was archived or removed; the text says why."""


@dataclass(frozen=True)
class ArchiveHeader:
    """What an archive holds: seals ``first_seal`` to ``last_seal`` of ``chain``, records
    ``first_record`` to ``last_record``, and where the chain stood before them."""

    format: str
    chain: str
    first_seal: int
    last_seal: int
    first_record: int
    last_record: int
    prev_digest: str  # the digest of record first_record - 1 (GENESIS for the first)
    prev_sealed_ns: int  # when seal first_seal - 1 was made (0 for the first)
    created_ns: int

    def start(self) -> Start:
        return Start(
            self.first_record - 1, self.prev_digest, self.first_seal - 1, self.prev_sealed_ns
        )


def archive_name(chain: str, first_seal: int, last_seal: int) -> str:
    """A name that sorts in chain order: ledger-<chain or main>-<first seal>-<last seal>."""
    if chain and not _SAFE_CHAIN.fullmatch(chain):
        raise ArchiveRefused(f"chain {chain!r}: its name cannot name a file")
    return f"ledger-{chain or 'main'}-{first_seal:012d}-{last_seal:012d}{SUFFIX}"


def signature_payload(content_sha256: str, signed_ns: int) -> bytes:
    return f"tabadol-ledger-archive:v1:{content_sha256}:{signed_ns}".encode()


# -- lines of ledger.jsonl (pure) -------------------------------------------------------

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def header_line(header: ArchiveHeader) -> bytes:
    return (_JSON.encode({"header": dataclasses.asdict(header)}) + "\n").encode()


def signer_line(fingerprint: str, pem: bytes) -> bytes:
    return (_JSON.encode({"signer": fingerprint, "certificate": pem.decode()}) + "\n").encode()


def seal_line(seal: Seal) -> bytes:
    fields = [seal.seq, seal.count, seal.head_digest, seal.sealed_ns, seal.signer, seal.signature]
    return (_JSON.encode({"seal": fields}) + "\n").encode()


def timestamp_line(stamp: SealTimestamp) -> bytes:
    token = base64.b64encode(stamp.token).decode()
    return (_JSON.encode({"timestamp": [stamp.seal_seq, token, stamp.gen_time_ns]}) + "\n").encode()


def record_line(stored: StoredRecord) -> bytes:
    """A record: its fields in order. Not its digest: 32 random bytes would more than treble
    the file, and the reader computes it; the seals then say which batch changed."""
    return line_of(stored.record.canonical())


# A record line is its canonical bytes (what its digest covers) without the schema number,
# schema 1's two missing fields put back: so the reader hashes the line's own bytes. A gRPC
# call's record keeps its schema's line, as archives before protocols hold it: with no grant
# its last value is consumer_verified (a boolean), a schema 3 line's is grant (a string).
# A schema 4 line ends in grant and protocol: '","rest"]' is no end of a schema 3 line (its
# quote before rest would be one inside grant, escaped). How the end of a line tells the
# schema; a call by a protocol not in PROTOCOLS is read value by value.
_SCHEMA_1 = b"[1,"
_SCHEMA_1_TAIL = b',"",true]'  # consumer_serial "", consumer_verified true: schema 1's form
_SCHEMA_2 = b"[2,"
_SCHEMA_3 = b"[3,"
_SCHEMA_4 = b"[%d," % SCHEMA_VERSION
_SCHEMA_4_TAILS = tuple(b'","%s"]' % p.encode() for p in PROTOCOLS if p != "grpc")


def line_of(canonical: bytes) -> bytes:
    """The archive line of a record whose canonical bytes (LedgerRecord.canonical) these are."""
    if canonical.startswith(_SCHEMA_1):
        return b"[" + canonical[3:-1] + _SCHEMA_1_TAIL + b"\n"
    return b"[" + canonical[canonical.index(b",") + 1 :] + b"\n"


def canonical_of(line: bytes) -> bytes:
    """What a record line's digest covers, if the line is as ``line_of`` writes it (compact
    ASCII JSON); any other line yields bytes no seal matches, and is read value by value."""
    if line.endswith(b'"]'):
        return (_SCHEMA_4 if line.endswith(_SCHEMA_4_TAILS) else _SCHEMA_3) + line[1:]
    if line.endswith(_SCHEMA_1_TAIL):
        return _SCHEMA_1 + line[1 : -len(_SCHEMA_1_TAIL)] + b"]"
    return _SCHEMA_2 + line[1:]


class Malformed(ValueError):
    """A line that is none of an archive's kinds."""


_RECORD_TYPES = tuple(FIELD_TYPES[name] for name in FIELD_NAMES)
# A line of a gRPC call ends before protocol; one no grant admitted, before grant too.
_LINE_TYPES = (_RECORD_TYPES[:-2], _RECORD_TYPES[:-1], _RECORD_TYPES)
_LINE_LENGTHS = tuple(map(len, _LINE_TYPES))


def _record(fields: Any) -> LedgerRecord:
    if type(fields) is list and tuple(map(type, fields)) in _LINE_TYPES:  # the usual case
        return LedgerRecord(*fields)
    if not isinstance(fields, list) or len(fields) not in _LINE_LENGTHS:
        raise Malformed("a record line with the wrong number of fields")
    for name, value in zip(FIELD_NAMES, fields, strict=False):
        if type(value) is not FIELD_TYPES[name]:
            raise Malformed(f"a record whose {name} is not of type {FIELD_TYPES[name].__name__}")
    return LedgerRecord(*fields)  # pragma: no cover (the types matched after all)


def _record_of_canonical(canonical: bytes) -> LedgerRecord:
    """The record whose canonical bytes these are (Malformed, ValueError: none is)."""
    version, *fields = json.loads(canonical)
    return _record([*fields, "", True] if version == 1 else fields)


def _seal(fields: Any, chain: str) -> Seal:
    types = (int, int, str, int, str, str)
    if not isinstance(fields, list) or [type(f) for f in fields] != list(types):
        raise Malformed("a seal line that is not a seal")
    seq, count, head_digest, sealed_ns, signer, signature = fields
    return Seal(seq, count, head_digest, sealed_ns, signer, signature, chain)


# -- reading ----------------------------------------------------------------------------


Item = StoredRecord | Seal


@dataclass
class ArchiveContents:
    """An archive read as it is streamed: ``items`` (seals and records in file order) is
    consumed once; the rest is filled in as it goes, and the signature checked at the end."""

    path: Path
    header: ArchiveHeader
    signers: dict[str, bytes]
    timestamps: list[SealTimestamp]
    seals_seen: list[Seal]
    items: Iterator[Item]
    signature: dict[str, Any] | None = None  # META-INF/signature.json, if well-formed
    content_sha256: str = ""  # once items are exhausted


def open_archive(path: Path, *, keep_seals: bool = False) -> ArchiveContents:
    """The header and signers of an archive, and a stream of its batches. ValueError (or
    zipfile/lzma errors while streaming) when it is no readable archive."""
    zf = zipfile.ZipFile(path)
    try:
        _check_members(zf)
        if _small_member(zf, "mimetype") != MIMETYPE:
            raise Malformed("it is not a Tabadol ledger archive (its mimetype differs)")
        stream = zf.open(CONTENT)
    except KeyError as e:
        zf.close()
        raise Malformed(f"it lacks {e.args[0]}") from None
    except BaseException:
        zf.close()
        raise
    digest = hashlib.sha256()

    def lines() -> Iterator[Any]:
        while raw := stream.readline(MAX_LINE + 1):
            if len(raw) > MAX_LINE:
                raise Malformed(f"a line longer than {MAX_LINE} bytes: no archive holds one")
            digest.update(raw)
            try:
                yield json.loads(raw)
            except (ValueError, RecursionError):
                raise Malformed("a line that is not JSON") from None

    source = lines()
    try:
        header = _header(next(source, None))
    except BaseException:
        stream.close()
        zf.close()
        raise
    contents = ArchiveContents(path, header, {}, [], [], iter(()))

    def items() -> Iterator[Item]:
        try:
            previous = header.prev_digest
            seq = header.first_record - 1
            for line in source:
                if isinstance(line, list):
                    record = _record(line)
                    record_digest = chain_digest(previous, record)
                    seq += 1
                    yield StoredRecord(seq, record, previous, record_digest)
                    previous = record_digest
                elif isinstance(line, dict) and line.keys() == {"seal"}:
                    seal = _seal(line["seal"], header.chain)
                    if keep_seals:
                        contents.seals_seen.append(seal)
                    yield seal
                elif isinstance(line, dict) and line.keys() == {"timestamp"}:
                    if stamp := _timestamp(line["timestamp"], header.chain, keep_seals):
                        contents.timestamps.append(stamp)
                elif isinstance(line, dict) and line.keys() == {"signer", "certificate"}:
                    fingerprint, pem = _signer(line)
                    contents.signers[fingerprint] = pem
                else:
                    raise Malformed("a line of no kind an archive holds")
            contents.content_sha256 = digest.hexdigest()
        finally:
            stream.close()

    contents.items = items()
    contents.signature = _read_signature(zf)
    zf.close()  # the open stream keeps the file open until it is read or closed
    # The signers come before the first seal: read them now, so verify has them.
    first_item = next(contents.items, None)
    if first_item is not None:
        contents.items = _chain_one(first_item, contents.items)
    return contents


def _header(first: Any) -> ArchiveHeader:
    if not isinstance(first, dict) or set(first) != {"header"}:
        raise Malformed("its first line is no header")
    fields = first["header"]
    wanted = {f.name: f.type for f in dataclasses.fields(ArchiveHeader)}
    if not isinstance(fields, dict) or fields.keys() != wanted.keys():
        raise Malformed("its header lacks fields or has others")
    for name, kind in wanted.items():
        if type(fields[name]).__name__ != kind:
            raise Malformed(f"its header's {name} is not of type {kind}")
    header = ArchiveHeader(**fields)
    if header.format != FORMAT:
        raise Malformed(f"format {header.format!r}; this verifier reads {FORMAT!r}")
    return header


def _timestamp(stamp: Any, chain: str, keep: bool) -> SealTimestamp | None:
    if not (isinstance(stamp, list) and [type(v) for v in stamp] == [int, str, int]):
        raise Malformed("a timestamp line that is not one")
    if not keep:
        return None
    return SealTimestamp(chain, stamp[0], base64.b64decode(stamp[1], validate=True), stamp[2])


def _signer(line: dict[str, Any]) -> tuple[str, bytes]:
    if type(line["signer"]) is not str or type(line["certificate"]) is not str:
        raise Malformed("a signer line that is not one")
    return line["signer"], line["certificate"].encode()


def _chain_one(first: Item, rest: Iterator[Item]) -> Iterator[Item]:
    yield first
    yield from rest


def _check_members(zf: zipfile.ZipFile) -> None:
    names = [info.filename for info in zf.infolist()]
    if len(names) != len(set(names)) or not set(names) <= MEMBERS:
        raise Malformed(
            f"it holds the members {names}; an archive holds {', '.join(sorted(MEMBERS))}, "
            "each once, and nothing else"
        )


def _small_member(zf: zipfile.ZipFile, name: str) -> bytes:
    """A small member whole; Malformed when it inflates past what it should hold."""
    with zf.open(name) as member:
        data = member.read(_MAX_SMALL_MEMBER + 1)
    if len(data) > _MAX_SMALL_MEMBER:
        raise Malformed(f"its {name} is over {_MAX_SMALL_MEMBER} bytes")
    return data


def _read_signature(zf: zipfile.ZipFile) -> dict[str, Any] | None:
    try:
        signature = json.loads(_small_member(zf, SIGNATURE))
    except (KeyError, ValueError, RecursionError):
        return None
    types = {"content_sha256": str, "signed_ns": int, "certificate": str, "signature": str}
    if not isinstance(signature, dict) or signature.keys() != types.keys():
        return None
    if not all(type(signature[k]) is t for k, t in types.items()):
        return None
    return signature


def split(items: Iterable[Item]) -> tuple[Iterator[StoredRecord], Iterator[Seal]]:
    """One ordered stream of seals and records as the two streams ``verify`` walks
    together; only what one has read ahead of the other is held."""
    source = iter(items)
    records: deque[StoredRecord] = deque()
    seals: deque[Seal] = deque()

    def pull() -> bool:
        item = next(source, None)
        if item is None:
            return False
        (seals if isinstance(item, Seal) else records).append(item)  # type: ignore[arg-type]
        return True

    def record_stream() -> Iterator[StoredRecord]:
        while records or pull():
            if records:
                yield records.popleft()

    def seal_stream() -> Iterator[Seal]:
        while seals or pull():
            if seals:
                yield seals.popleft()

    return record_stream(), seal_stream()


# -- the fast read: every record's digest computed once, in any process -----------------


@dataclass(frozen=True)
class Batch:
    """A sealed batch as read: its seal, its last record, and the digests before and after
    that record as computed from the records."""

    seal: Seal
    prev_digest: str
    last: LedgerRecord
    head: str


@dataclass(frozen=True)
class FileDigests:
    """What reading an archive file once yields, for ``_accepted`` to judge (in the process
    that holds the signer checks, which do not travel to a worker)."""

    header: ArchiveHeader
    signers: dict[str, bytes]
    batches: tuple[Batch, ...]
    timestamps: tuple[SealTimestamp, ...]
    signature: dict[str, Any] | None
    content_sha256: str


_READ_BYTES = 1 << 20


def digest_file(path: Path, keep_seals: bool = False) -> FileDigests | None:
    """Read an archive once, hashing each record line as its canonical bytes; None at the
    first doubt of any kind (the one-by-one check then says what it is). A worker's task."""
    try:
        with zipfile.ZipFile(path) as zf:
            _check_members(zf)
            if _small_member(zf, "mimetype") != MIMETYPE:
                return None
            signature = _read_signature(zf)
            with zf.open(CONTENT) as stream:
                return _digests(stream, signature, keep_seals)
    except Exception:  # damaged, cut short, not an archive: the one-by-one check says how
        return None


def _lines(stream: Any, content: Any) -> Iterator[bytes]:
    """The lines of ``stream`` (read a MiB at a time), each byte hashed into ``content``."""
    rest = b""
    while chunk := stream.read(_READ_BYTES):
        content.update(chunk)
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:
            raise Malformed(f"a line longer than {MAX_LINE} bytes: no archive holds one")
        yield from lines
    if rest:
        yield rest


def _digests(stream: Any, signature: dict[str, Any] | None, keep_seals: bool) -> FileDigests | None:
    content = hashlib.sha256()
    lines = _lines(stream, content)
    header = _header(json.loads(next(lines)))
    signers: dict[str, bytes] = {}
    batches: list[Batch] = []
    stamps: list[SealTimestamp] = []
    sha256 = hashlib.sha256
    running = previous = bytes.fromhex(header.prev_digest)
    count, pending = header.first_record - 1, None
    for line in lines:
        if line[:1] == b"[":  # a record: the usual line, so the loop's first test
            if pending is None:
                return None  # records no seal line announced: the one-by-one check says how
            if line.isascii():
                canonical = canonical_of(line)
            else:  # an archive written before lines were ASCII
                canonical = _record(json.loads(line)).canonical()
            previous, running = running, sha256(running + canonical).digest()
            count += 1
            if count == pending.count:
                last = _record(json.loads(line))
                batches.append(Batch(pending, previous.hex(), last, running.hex()))
                pending = None
            continue
        item = json.loads(line)
        if isinstance(item, dict) and item.keys() == {"seal"}:
            seal = _seal(item["seal"], header.chain)
            if pending is not None or seal.count <= count:
                return None
            pending = seal
        elif isinstance(item, dict) and item.keys() == {"timestamp"}:
            if stamp := _timestamp(item["timestamp"], header.chain, keep_seals):
                stamps.append(stamp)
        elif isinstance(item, dict) and item.keys() == {"signer", "certificate"}:
            fingerprint, pem = _signer(item)
            signers[fingerprint] = pem
        else:
            return None
    if pending is not None or not batches:
        return None
    return FileDigests(
        header, signers, tuple(batches), tuple(stamps), signature, content.hexdigest()
    )


def _accepted(
    path: Path,
    start: Start | None,
    read: FileDigests,
    brokers: SignerProblem,
    keep_seals: bool,
) -> ArchiveVerdict | None:
    """The verdict on a file read by ``digest_file``, if it is intact; None at any doubt.
    Each seal is judged by ``verify`` itself, given its batch's last record and the digest
    before it: so a seal passes here only where the one-by-one walk passes it."""
    header = read.header
    try:
        named = archive_name(header.chain, header.first_seal, header.last_seal)
    except ArchiveRefused:
        return None
    own = header.start()
    if path.name != named or (
        start is not None
        and (start.count, start.running, start.seal_count)
        != (own.count, own.running, own.seal_count)
    ):
        return None
    good = start if start is not None else own
    for batch in read.batches:
        seal = batch.seal
        before = Start(seal.count - 1, batch.prev_digest, good.seal_count, good.sealed_ns)
        last = StoredRecord(seal.count, batch.last, batch.prev_digest, batch.head)
        if not verify([last], [seal], read.signers, brokers, (), before).ok:
            return None
        good = Start.after(seal)
    if (good.seal_count, good.count) != (header.last_seal, header.last_record):
        return None
    if _signature_problem(read.signature, read.content_sha256, brokers):
        return None
    seals = tuple(batch.seal for batch in read.batches) if keep_seals else ()
    return ArchiveVerdict(
        path, header, Verdict(True, good.count, good.seal_count), good, read.batches[-1].seal,
        seals, read.timestamps if keep_seals else (),
    )  # fmt: skip


# -- checking archives ------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveVerdict:
    """One file's check: where it stands in its chain, and what is wrong with it."""

    path: Path
    header: ArchiveHeader | None
    verdict: Verdict
    end: Start  # where the chain stands after this file (when it is intact)
    last_seal: Seal | None
    seals: tuple[Seal, ...] = ()
    timestamps: tuple[SealTimestamp, ...] = ()

    def __str__(self) -> str:
        return f"{self.path.name}: {self.verdict}"


def check_archive(
    path: Path,
    start: Start | None,
    brokers: SignerProblem,
    *,
    keep_seals: bool = False,
) -> ArchiveVerdict:
    """Check one archive file: its signature, every record, link and seal (each signed by a
    certificate ``brokers`` accepts, at the time it signed), from ``start`` (where the
    previous file, or the chain's beginning, left the chain; None: take the header's word)."""
    read = digest_file(path, keep_seals)
    return _judged(path, start, read, brokers, keep_seals)


def _judged(
    path: Path,
    start: Start | None,
    read: FileDigests | None,
    brokers: SignerProblem,
    keep_seals: bool,
) -> ArchiveVerdict:
    """``check_archive`` given what ``digest_file`` read (None: it was in doubt)."""
    if read is not None:
        verdict = _accepted(path, start, read, brokers, keep_seals)
        if verdict is not None:
            return verdict
    # A doubt: the one-by-one walk, which finds the first problem and words it as verify.
    return _check_slowly(path, start, brokers, keep_seals=keep_seals)


def _check_slowly(
    path: Path,
    start: Start | None,
    brokers: SignerProblem,
    *,
    keep_seals: bool = False,
) -> ArchiveVerdict:
    """``check_archive`` record by record, through ``verify``."""

    def broken(
        problem: str, header: ArchiveHeader | None = None, position: int | None = None
    ) -> ArchiveVerdict:
        return ArchiveVerdict(path, header, Verdict(False, 0, 0, position, problem), Start(), None)

    try:
        contents = open_archive(path, keep_seals=keep_seals)
    except _UNREADABLE as e:
        return broken(f"it cannot be read as an archive: {_why(e)}")
    header = contents.header
    own_start = header.start()
    try:
        named = archive_name(header.chain, header.first_seal, header.last_seal)
    except ArchiveRefused:
        named = ""
    if path.name != named:  # the names put the files in order: a renamed file is out of it
        contents.items = iter(())
        return broken(
            f"its name does not match what it holds ({named or 'a chain no file can name'}): "
            "archive files were renamed or swapped",
            header,
        )
    if start is not None and (start.count, start.running, start.seal_count) != (
        own_start.count, own_start.running, own_start.seal_count,
    ):  # fmt: skip
        return broken(
            f"it begins after seal {own_start.seal_count} (record {own_start.count}), but the "
            f"chain before it ends at seal {start.seal_count} (record {start.count}): "
            + (
                "an archive before it is missing"
                if own_start.seal_count > start.seal_count
                else "it overlaps the archive before it, or the files were swapped"
                if own_start.seal_count < start.seal_count
                else "it does not continue the chain before it"
            ),
            header,
            own_start.count + 1,
        )
    begin = start if start is not None else own_start
    last: list[Seal] = []

    def watched(items: Iterator[Item]) -> Iterator[Item]:
        for item in items:
            if isinstance(item, Seal):
                last[:] = [item]
            yield item

    try:
        records, seals = split(watched(contents.items))
        verdict = verify(records, seals, contents.signers, brokers, (), begin)
        if verdict.ok:
            for _ in contents.items:  # read to the end: the digest covers every byte
                pass
    except _UNREADABLE as e:
        return broken(f"it cannot be read to the end (altered or cut short): {_why(e)}", header)
    if not verdict.ok:
        return ArchiveVerdict(path, header, verdict, Start(), None)
    if why := _signature_problem(contents.signature, contents.content_sha256, brokers):
        return broken(f"its signature does not hold: {why}", header)
    if (verdict.seals, verdict.records) != (header.last_seal, header.last_record):
        return broken(
            f"its header says it holds seals to {header.last_seal} (record "
            f"{header.last_record}), but it holds them to {verdict.seals} (record "
            f"{verdict.records})",
            header,
        )
    end = Start.after(last[0]) if last else begin
    return ArchiveVerdict(
        path, header, verdict, end, last[0] if last else None,
        tuple(contents.seals_seen), tuple(contents.timestamps),
    )  # fmt: skip


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _signature_problem(
    signature: dict[str, Any] | None, content_sha256: str, brokers: SignerProblem
) -> str | None:
    if signature is None:
        return f"it has no well-formed {SIGNATURE}"
    if signature["content_sha256"] != content_sha256:
        return f"{CONTENT} was changed after it was signed (its SHA-256 differs)"
    pem = signature["certificate"].encode()
    if why := brokers(pem, signature["signed_ns"]):
        return f"it is not signed by a broker of this exchange: {why}"
    payload = signature_payload(content_sha256, signature["signed_ns"])
    if not signed_by(payload, signature["signature"], pem):
        return "the signature does not match its certificate (forged or altered)"
    return None


def archive_files(directory: Path) -> list[Path]:
    """The archive files in a directory, by name (so in chain order, per chain)."""
    try:
        return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX) and p.is_file())
    except OSError as e:
        raise TabadolError(f"{directory}: cannot list the archives: {e.strerror or e}") from e


def header_of(path: Path) -> ArchiveHeader | None:
    """An archive's header (its first line), or None when the file is no readable archive."""
    try:
        contents = open_archive(path)
    except _UNREADABLE:
        return None
    contents.items = iter(())
    return contents.header


@dataclass(frozen=True)
class ChainOfArchives:
    """A chain's archives checked in order: where the chain stands after the last good one,
    the files' verdicts, and the first problem."""

    chain: str
    files: tuple[ArchiveVerdict, ...]
    end: Start
    problem: str = ""
    position: int | None = None


def check_archives(
    directory: Path,
    brokers: SignerProblem,
    *,
    keep_seals: bool = False,
    workers: int | None = None,
) -> tuple[dict[str, ChainOfArchives], list[str]]:
    """Every chain's archives in ``directory``, checked from the chain's first record; and
    the files that are no archive at all.

    ``workers`` processes (default: one per core) read the files at once, each from its own
    header; this one then takes them in chain order, checks that each begins where the one
    before ended and judges its seals and signature. A file in doubt is checked again one
    record at a time, so the first problem, and its words, are the sequential check's."""
    by_chain: dict[str, list[Path]] = {}
    unreadable = []
    for path in archive_files(directory):
        header = header_of(path)
        if header is None:
            verdict = check_archive(path, None, brokers)
            unreadable.append(f"{path.name}: {verdict.verdict}")
            continue
        by_chain.setdefault(header.chain, []).append(path)
    every = [path for _, paths in sorted(by_chain.items()) for path in paths]
    workers = min(workers or os.cpu_count() or 1, len(every))
    result = {}
    with _Readers(every, keep_seals, workers) as reads:
        for chain, found in sorted(by_chain.items()):
            files: list[ArchiveVerdict] = []
            at = Start()
            problem, position = "", None
            for path in found:  # in name order, which is chain order
                read = reads.result(path)
                verdict = _judged(path, at, read, brokers, keep_seals)
                files.append(verdict)
                if not verdict.verdict.ok:
                    problem, position = str(verdict), verdict.verdict.position
                    reads.cancel(found)
                    break
                at = verdict.end
            result[chain] = ChainOfArchives(chain, tuple(files), at, problem, position)
    return result, unreadable


class _Readers:
    """``digest_file`` of many files in a pool of spawned processes (no forked copies of a
    caller's threads), or, with one worker or one file, of each file when it is asked for."""

    def __init__(self, paths: list[Path], keep_seals: bool, workers: int) -> None:
        self._keep_seals = keep_seals
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Path, Future[FileDigests | None]] = {}
        if workers > 1 and len(paths) > 1:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(workers, mp_context=context)
            self._futures = {p: self._pool.submit(digest_file, p, keep_seals) for p in paths}

    def result(self, path: Path) -> FileDigests | None:
        future = self._futures.get(path)
        if future is None:
            return digest_file(path, self._keep_seals)
        try:
            return future.result()
        except Exception:  # a worker that died: the file is checked here, one by one
            return None

    def cancel(self, paths: Iterable[Path]) -> None:
        for path in paths:
            if future := self._futures.get(path):
                future.cancel()

    def __enter__(self) -> _Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _ArchivedTimestamps:
    """An archive's tokens, as timestamp_findings reads them from a store."""

    def __init__(self, stamps: Iterable[SealTimestamp]) -> None:
        self._stamps = list(stamps)

    def timestamps(self, chain: str = "") -> Iterator[SealTimestamp]:
        return iter(self._stamps)


def timestamps_of(verdict: ArchiveVerdict) -> TimestampLog:
    return _ArchivedTimestamps(verdict.timestamps)  # type: ignore[return-value]


# -- writing ----------------------------------------------------------------------------


def batches(
    store: LedgerLog, timestamps: TimestampLog, chain: str, seals: Iterable[Seal], first_record: int
) -> Iterator[Item | SealTimestamp]:
    """Each of ``seals`` then its token (if any) and records, read from the store."""
    records = store.records(chain, first_record)
    stamps = timestamps.timestamps(chain)
    stamp = next(stamps, None)
    pending: StoredRecord | None = next(records, None)
    for seal in seals:
        yield seal
        while stamp is not None and stamp.seal_seq < seal.seq:
            stamp = next(stamps, None)
        if stamp is not None and stamp.seal_seq == seal.seq:
            yield stamp
        while pending is not None and pending.seq <= seal.count:
            yield pending
            pending = next(records, None)


@dataclass(frozen=True)
class Archived:
    """What ``archive_chain`` did."""

    chain: str
    paths: tuple[Path, ...]  # the files written, in chain order (none: nothing to archive)
    seals: tuple[int, int] = (0, 0)
    records: tuple[int, int] = (0, 0)
    finished: tuple[str, ...] = ()  # archives of an interrupted run whose removal it finished

    @property
    def path(self) -> Path | None:
        """The last file written (None: nothing to archive)."""
        return self.paths[-1] if self.paths else None

    def __str__(self) -> str:
        name = _node(self.chain)
        done = "".join(
            f"{name}finished removing what {f} holds (a run was interrupted)\n"
            for f in self.finished
        )
        if not self.paths:
            return f"{done}{name}nothing sealed before that date is left to archive"
        where = (
            str(self.paths[0])
            if len(self.paths) == 1
            else f"{len(self.paths)} files in {self.paths[0].parent} ({self.paths[0].name} "
            f"to {self.paths[-1].name})"
        )
        return (
            f"{done}{name}records {self.records[0]} to {self.records[1]} (seals {self.seals[0]} "
            f"to {self.seals[1]}) archived in {where} and removed from the live ledger"
        )


class ArchiveStore(LedgerLog, TimestampLog, RollupLog, ArchiveLog, Protocol):
    """What archiving needs of a store."""


def archive_chain(
    store: ArchiveStore,
    chain: str,
    before_ns: int,
    out: Path,
    sealer: Sealer,
    seal_signers: SignerProblem,
    now_ns: Callable[[], int],
    *,
    records_per_file: int = RECORDS_PER_FILE,
) -> Archived:
    """Archive the chain's longest prefix of whole batches sealed before ``before_ns`` not
    archived yet into files in ``out`` of about ``records_per_file`` records each (whole
    batches: a file ends with the batch that reaches the bound), each checked as verify
    checks it and removed from the store once it is written. First finishes a run that
    wrote a file but was stopped before removing it."""
    if records_per_file < 1:
        raise ArchiveRefused(f"{records_per_file} records per file: it must be at least 1")
    finished = []
    while True:
        prefix = store.archived(chain)
        archived_rows = store.rollup_rows(chain, archived=True)
        if why := prefix_problem(prefix, archived_rows, store.signers(), seal_signers):
            raise ArchiveRefused(f"{_node(chain)}{why}; nothing archived, nothing removed")
        start = Start.after(prefix.seal) if prefix is not None else Start()
        done = _interrupted(store, chain, start, out, seal_signers)
        if done is None:
            break
        through, done_path = done
        _check_live(store, chain, start, through, done_path, seal_signers)
        store.remove_archived(
            chain, through, now_ns(), _label(done_path), sealer.sign, sealer.cert_pem
        )
        finished.append(done_path.name)
    seals = _seals_before(store, chain, start, before_ns)
    if not seals:
        return Archived(chain, (), finished=tuple(finished))
    first_record = start.count + 1
    written: list[Path] = []
    # One removal per file, just after it is safe on disk: each transaction is a file's
    # size, and a run stopped anywhere leaves at most one file to finish (as above).
    for group in _files_of(seals, start, records_per_file):
        path = _archive_file(store, chain, group, start, out, sealer, seal_signers, now_ns, written)
        store.remove_archived(
            chain, group[-1], now_ns(), _label(path), sealer.sign, sealer.cert_pem
        )
        written.append(path)
        start = Start.after(group[-1])
    return Archived(
        chain, tuple(written), (seals[0].seq, seals[-1].seq), (first_record, seals[-1].count),
        tuple(finished),
    )  # fmt: skip


def _files_of(seals: list[Seal], start: Start, records_per_file: int) -> Iterator[list[Seal]]:
    """``seals`` in runs of whole batches, each ending with the batch that brings it to
    ``records_per_file`` records or more (the last run: whatever is left)."""
    group: list[Seal] = []
    begin = start.count
    for seal in seals:
        group.append(seal)
        if seal.count - begin >= records_per_file:
            yield group
            group, begin = [], seal.count
    if group:
        yield group


def _archive_file(
    store: ArchiveStore,
    chain: str,
    seals: list[Seal],
    start: Start,
    out: Path,
    sealer: Sealer,
    seal_signers: SignerProblem,
    now_ns: Callable[[], int],
    written: list[Path],
) -> Path:
    """Write seals ``seals`` (from ``start``) into one archive file, checked; its path."""
    first, last = seals[0], seals[-1]
    name = archive_name(chain, first.seq, last.seq)
    header = ArchiveHeader(
        FORMAT, chain, first.seq, last.seq, start.count + 1, last.count,
        start.running, start.sealed_ns, now_ns(),
    )  # fmt: skip
    path = out / name
    temporary = out / f".{name}.{os.getpid()}.partial"
    before = (
        f" (the {len(written)} files before it, to seal {first.seq - 1}, were archived and removed)"
        if written
        else ""
    )
    signers = store.signers()
    named = sorted({seal.signer for seal in seals})
    preamble = [header_line(header)]
    preamble += [signer_line(fp, signers[fp]) for fp in named if fp in signers]
    try:
        try:
            verdict = _write(
                temporary, preamble, sealer, now_ns,
                lambda put: _checked_batches(put, store, chain, seals, start, signers, seal_signers),
            )  # fmt: skip
            if verdict is None:  # a doubt: write it again as verify walks it, which says why
                temporary.unlink()
                verdict = _write(
                    temporary, preamble, sealer, now_ns,
                    lambda put: _verified_batches(put, store, chain, seals, start, signers, seal_signers),
                )  # fmt: skip
            if verdict is None or not verdict.ok:
                raise ArchiveRefused(
                    f"{_node(chain)}the part to archive (seals {first.seq} to {last.seq}) does "
                    f"not verify: {verdict}; {'it is not archived' if written else 'nothing archived'}, "
                    f"nothing {'more ' if written else ''}removed{before}"
                )
            os.replace(temporary, path)
            _fsync_directory(out)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as e:
        raise ArchiveRefused(
            f"{out}: cannot write the archive {name}: {e.strerror or e}; nothing "
            f"{'more ' if written else ''}removed{before}"
        ) from e
    return path


def _node(chain: str) -> str:
    return f"node {chain}: " if chain else ""


def _label(path: Path) -> str:
    with path.open("rb") as f:
        return f"{path.name} sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"


def _seals_before(store: LedgerLog, chain: str, start: Start, before_ns: int) -> list[Seal]:
    chosen = []
    for seal in store.seals(chain):
        if seal.seq <= start.seal_count:
            continue
        if seal.sealed_ns >= before_ns:
            break
        chosen.append(seal)
    return chosen


def _interrupted(
    store: ArchiveStore, chain: str, start: Start, out: Path, seal_signers: SignerProblem
) -> tuple[Seal, Path] | None:
    """The last seal of an intact archive in ``out`` that begins where the live chain does and ends at a
    seal the store still holds: written by a run stopped before it removed the records."""
    for path in archive_files(out):
        header = header_of(path)
        if header is None or header.chain != chain or header.first_seal != start.seal_count + 1:
            continue
        _hold_durably(path)  # records are removed on its word: it must be a file on disk
        verdict = check_archive(path, start, seal_signers)
        if not verdict.verdict.ok or verdict.last_seal is None:
            raise ArchiveRefused(
                f"{path}: an archive of the live part of the chain that does not verify "
                f"({verdict.verdict}); move it away, then archive again"
            )
        live = next((s for s in store.seals(chain) if s.seq == verdict.last_seal.seq), None)
        if live != verdict.last_seal:
            raise ArchiveRefused(
                f"{path}: it ends at seal {verdict.last_seal.seq}, which the live ledger holds "
                "otherwise: the archive and the ledger disagree; nothing removed"
            )
        return live, path
    return None


def _hold_durably(path: Path) -> None:
    """Refuse to remove records on the word of anything but a regular file in the archive
    directory, and make sure it is on disk first: a link left in a file's place (its target
    movable or deletable) would let them go with no archive holding them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ArchiveRefused(
            f"{path}: cannot open it as a regular file ({e.strerror}: a link?); move it away, "
            "then archive again; nothing removed"
        ) from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArchiveRefused(
                f"{path}: not a regular file; move it away, then archive again; nothing removed"
            )
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_live(
    store: ArchiveStore,
    chain: str,
    start: Start,
    through: Seal,
    path: Path,
    seal_signers: SignerProblem,
) -> None:
    """Refuse (ArchiveRefused) to remove the live batches an interrupted run's ``path``
    holds unless they verify (records, links, seals): removing edited live records on the
    word of an intact file would erase the evidence of the edit."""
    seals = [s for s in store.seals(chain) if start.seal_count < s.seq <= through.seq]
    signers = store.signers()

    def discard(line: bytes) -> None:
        pass

    verdict = _checked_batches(discard, store, chain, seals, start, signers, seal_signers)
    if verdict is None:  # a doubt: verify walks them, and says what is wrong
        verdict = _verified_batches(discard, store, chain, seals, start, signers, seal_signers)
    if not verdict.ok:
        raise ArchiveRefused(
            f"{path}: the live records it holds (seals {start.seal_count + 1} to "
            f"{through.seq}) do not verify in the live ledger: {verdict}; nothing removed"
        )


Put = Callable[[bytes], None]
_WRITE_LINES = 4096  # lines handed to the compressor at once


def _write(
    temporary: Path,
    preamble: list[bytes],
    sealer: Sealer,
    now_ns: Callable[[], int],
    body: Callable[[Put], Verdict | None],
) -> Verdict | None:
    """Write an archive to ``temporary`` (0600, fsynced): ``preamble``'s lines, then what
    ``body`` puts while it checks it; signed when body's verdict is OK."""
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as raw:
        with zipfile.ZipFile(raw, "w") as zf:
            zf.writestr(zipfile.ZipInfo("mimetype"), MIMETYPE, compress_type=zipfile.ZIP_STORED)
            digest = hashlib.sha256()
            info = zipfile.ZipInfo(CONTENT)
            info.compress_type = COMPRESSION
            with zf.open(info, "w", force_zip64=True) as content:
                pending: list[bytes] = list(preamble)

                def flush() -> None:
                    chunk = b"".join(pending)
                    pending.clear()
                    digest.update(chunk)
                    content.write(chunk)

                def put(line: bytes) -> None:
                    pending.append(line)
                    if len(pending) >= _WRITE_LINES:
                        flush()

                verdict = body(put)
                flush()
            if verdict is not None and verdict.ok:
                signed_ns = now_ns()
                payload = signature_payload(digest.hexdigest(), signed_ns)
                signature = {
                    "content_sha256": digest.hexdigest(),
                    "signed_ns": signed_ns,
                    "certificate": sealer.cert_pem.decode(),
                    "signature": sealer.sign(payload),
                }
                zf.writestr(SIGNATURE, json.dumps(signature, indent=1))
        raw.flush()
        os.fsync(raw.fileno())
    return verdict


def _canonical_rows(
    store: LedgerLog, chain: str, first: int, last: int
) -> Iterator[tuple[int, str, str, bytes]]:
    """(seq, prev_digest, digest, canonical bytes) of records ``first`` to ``last``: SQLite
    renders most records' canonical bytes itself (canonical_rows), as verify_chain reads."""
    rows = getattr(store, "canonical_rows", None)
    if rows is not None and not chain:
        return iter(rows(first, last))
    return (
        (r.seq, r.prev_digest, r.digest, r.record.canonical())
        for r in itertools.takewhile(lambda r: r.seq <= last, store.records(chain, first))
    )


def _checked_batches(
    put: Put,
    store: ArchiveStore,
    chain: str,
    seals: list[Seal],
    start: Start,
    signers: dict[str, bytes],
    seal_signers: SignerProblem,
) -> Verdict | None:
    """Put each batch (seal, token, records) while checking it: each record's digest once,
    each seal by ``verify`` given its batch's last record. None at the first doubt."""
    rows = _canonical_rows(store, chain, start.count + 1, seals[-1].count)
    stamps = store.timestamps(chain)
    stamp = next(stamps, None)
    sha256, fromhex = hashlib.sha256, bytes.fromhex
    count, running, good = start.count, start.running, start
    try:
        for seal in seals:
            put(seal_line(seal))
            while stamp is not None and stamp.seal_seq < seal.seq:
                stamp = next(stamps, None)
            if stamp is not None and stamp.seal_seq == seal.seq:
                put(timestamp_line(stamp))
            if seal.count <= count:
                return None
            previous, canonical = running, b""
            for seq, prev_digest, digest, canonical in itertools.islice(rows, seal.count - count):
                if seq != count + 1 or prev_digest != running:
                    return None
                if sha256(fromhex(running) + canonical).hexdigest() != digest:
                    return None
                put(line_of(canonical))
                previous, running, count = running, digest, seq
            if count != seal.count:
                return None
            last = StoredRecord(count, _record_of_canonical(canonical), previous, running)
            before = Start(count - 1, previous, good.seal_count, good.sealed_ns)
            if not verify([last], [seal], signers, seal_signers, (), before).ok:
                return None
            good = Start.after(seal)
    except (TypeError, ValueError):  # a value no record holds: verify says which
        return None
    return Verdict(True, count, good.seal_count)


def _verified_batches(
    put: Put,
    store: ArchiveStore,
    chain: str,
    seals: list[Seal],
    start: Start,
    signers: dict[str, bytes],
    seal_signers: SignerProblem,
) -> Verdict:
    """Put each batch while ``verify`` walks it, record by record: its verdict."""

    def written() -> Iterator[Item]:
        for item in batches(store, store, chain, seals, start.count + 1):
            if isinstance(item, Seal):
                put(seal_line(item))
                yield item
            elif isinstance(item, SealTimestamp):
                put(timestamp_line(item))
            else:
                put(record_line(item))
                yield item

    records, seal_stream = split(written())
    return verify(records, seal_stream, signers, seal_signers, (), start)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the date, and where the live store takes over (pure) --------------------------------


def parse_before(text: str) -> int:
    """``--before``: a date (its 00:00 in Asia/Tehran, the reports' days) or an ISO date-time
    (Asia/Tehran unless it names its zone), as UTC epoch ns. ValueError says why not."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 date or date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=DAY_ZONE)
    return to_ns(moment)


@dataclass(frozen=True)
class LiveStart:
    """Where verify takes a chain up in the live store, and what it says about the rest."""

    start: Start
    seal: Seal | None  # the seal the live part continues from (None: the beginning)
    notes: tuple[str, ...] = ()
    problem: str = ""


def prefix_problem(
    prefix: ArchivedPrefix | None,
    archived_rows: Rollup,
    signers: dict[str, bytes],
    seal_signers: SignerProblem,
) -> str | None:
    """Why a chain's archived prefix, and its archived rollup rows, are not as a broker of
    this exchange archived them (None: they are). The prefix's statement must be signed by
    a broker (judged at archived_ns, as seals are), its seal a genuine seal, and the rows
    what the statement signed; no prefix: no archived rows."""
    if prefix is None:
        if archived_rows.groups or archived_rows.provider_days:
            return (
                "rollup rows are marked archived, but nothing was archived: a database "
                "writer added them (the reports count them)"
            )
        return None
    seal = prefix.seal
    what = (
        f"the archived prefix (records 1 to {seal.count}, seals 1 to {seal.seq}, {prefix.archive})"
    )
    if not signed_by(prefix.statement(), prefix.signature, prefix.certificate):
        return f"{what} is not signed by its certificate: forged or altered"
    if why := seal_signers(prefix.certificate, prefix.archived_ns):
        return f"{what} is not signed by a broker of this exchange: {why}"
    cert = signers.get(seal.signer)
    if cert is None or not signature_valid(seal, cert):
        return f"{what} ends at a seal {seal.seq} no broker of this exchange signed"
    if why := seal_signers(cert, seal.sealed_ns):
        return f"{what} ends at a seal {seal.seq} no broker of this exchange signed: {why}"
    if archived_rows.digest() != prefix.rollup_sha256:
        return (
            f"the archived rollup rows differ from those {what} signed: they were changed "
            "after archiving (the reports count them)"
        )
    return None


def live_start(
    archives: ChainOfArchives | None,
    prefix: ArchivedPrefix | None,
    live_seal: Callable[[int], Seal | None],
) -> LiveStart:
    """Join a chain's archives (None: not given) to its live store, which holds its records
    after ``prefix`` (``live_seal(n)``: its seal n). The archives may overlap the live store
    (a run stopped between writing and removing) where they agree; the live part is then
    walked from its own start all the same, so an edited live copy shows."""
    if archives is None:
        if prefix is None:
            return LiveStart(Start(), None)
        note = (
            f"records 1 to {prefix.seal.count} (seals 1 to {prefix.seal.seq}) archived "
            f"({prefix.archive}); not checked here (verify --archives DIR checks them)"
        )
        return LiveStart(Start.after(prefix.seal), prefix.seal, (note,))
    covered = archives.end
    last = next((f.last_seal for f in reversed(archives.files) if f.verdict.ok), None)
    # On a problem, the live part is still checked, from where the live store begins.
    fallback = (
        LiveStart(Start.after(prefix.seal), prefix.seal) if prefix else LiveStart(Start(), None)
    )
    if prefix is not None and covered.seal_count < prefix.seal.seq:
        why = (
            "the archives that hold them are broken (above)"
            if archives.problem
            else "no archive given holds them: an archive file is missing"
        )
        return dataclasses.replace(
            fallback,
            problem=(
                f"records {covered.count + 1} to {prefix.seal.count} (seals "
                f"{covered.seal_count + 1} to {prefix.seal.seq}) were archived ({prefix.archive}), "
                f"but {why}"
            ),
        )
    if last is None:
        return fallback
    live = (
        prefix.seal if prefix is not None and prefix.seal.seq == last.seq else live_seal(last.seq)
    )
    if live != last:
        held = "lacks" if live is None else "holds otherwise: they disagree"
        return dataclasses.replace(
            fallback, problem=f"the archives end at seal {last.seq}, which the live ledger {held}"
        )
    if prefix is None or last.seq > prefix.seal.seq:
        return fallback  # they overlap the live records: those are checked as they stand
    return LiveStart(covered, last)
