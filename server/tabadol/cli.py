"""The ``tabadol`` command: broker, PKI, configuration checks and the demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tabadol.errors import TabadolError

# Only what every command needs is imported here: `ledger verify`'s worker processes import
# this module afresh, and the broker's, the console's and the registry's modules are heavy.

EPILOG = "Documentation: README.md and docs/ in the Tabadol repository."


def _cmd_broker(args: argparse.Namespace) -> int:
    from tabadol.broker import run

    if args.workers < 1:
        raise TabadolError(f"--workers must be at least 1, not {args.workers}")
    if args.workers > 1:
        from tabadol.broker.supervisor import supervise

        return asyncio.run(supervise(args.config, args.workers))
    asyncio.run(run(args.config))
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    from tabadol.broker.credentials import BrokerCredentials
    from tabadol.registry.current import load_current

    cfg = load_current(args.config)
    BrokerCredentials.load(cfg.broker.pki_dir, cfg.broker.trust_domain, cfg.path)
    version = f" (registry version {cfg.registry_version})" if cfg.registry_version else ""
    print(
        f"{cfg.path}: OK{version}: {len(cfg.agencies)} agencies, {len(cfg.services)} services, "
        f"{len(cfg.grants)} grants, {len(cfg.contracts.services)} services in the contracts"
    )
    return 0


def _cmd_pki_init(args: argparse.Namespace) -> int:
    from tabadol.pki import CertificateAuthority

    ca = CertificateAuthority.init(args.dir, args.trust_domain, days=args.days)
    print(f"created the platform CA for {ca.trust_domain} in {args.dir} (ca.key is mode 0600)")
    return 0


def _cmd_pki_issue(args: argparse.Namespace) -> int:
    from tabadol.pki import CertificateAuthority

    ca = CertificateAuthority(args.dir)
    server = args.broker or args.ops
    if not server and (args.dns or args.ip):
        raise TabadolError("--dns and --ip are for the broker's and the ops console's certificates")
    if server:
        issue = ca.issue_broker if args.broker else ca.issue_ops
        path = issue(
            dns_names=args.dns or ["localhost"],
            ips=args.ip or ["127.0.0.1", "::1"],
            days=args.days,
            force=args.force,
        )
        name = "broker" if args.broker else "ops console"
        print(f"issued the {name} certificate: {path} (key: {path.with_suffix('.key')})")
        if args.force:
            print(
                f"the {name}'s previous certificate is revoked as superseded: reload it "
                "(SIGHUP) now, so that it serves the new one and publishes the new CRL"
            )
    elif args.agency:
        bundle = ca.issue_agency(args.agency, days=args.days, force=args.force)
        print(
            f"issued agency {args.agency!r}: {bundle}/ holds ca.crt, agency.crt and agency.key; "
            "hand this directory to the agency over a secure channel"
        )
    else:
        role, name = ("operator", args.operator) if args.operator else ("auditor", args.auditor)
        bundle = ca.issue_person(role, name, days=args.days, force=args.force)
        print(
            f"issued {role} {name!r}: {bundle}/ holds ca.crt, {role}.crt and {role}.key, "
            "for the ops console (docs/security.md shows how to load them into a browser)"
        )
    return 0


def _cmd_pki_revoke(args: argparse.Namespace) -> int:
    from tabadol.pki import CertificateAuthority

    ca = CertificateAuthority(args.dir)
    if args.agency:
        serials, who = ca.revoke_agency(args.agency, reason=args.reason), f"agency {args.agency!r}"
    elif args.operator or args.auditor:
        role, name = ("operator", args.operator) if args.operator else ("auditor", args.auditor)
        serials, who = ca.revoke_person(role, name, reason=args.reason), f"{role} {name!r}"
    elif args.broker or args.ops:
        name = "broker" if args.broker else "ops"
        serials, who = ca.revoke_current(name, reason=args.reason), f"the {name}"
    else:
        try:
            serial = int(args.serial, 16)
        except ValueError:
            raise TabadolError(f"--serial {args.serial!r} is not a hexadecimal serial") from None
        serials, who = ca.revoke([serial], reason=args.reason), f"serial {serial:x}"
    print(
        f"revoked {len(serials)} certificate(s) of {who} ({args.reason}) in "
        f"{args.dir / 'crl.pem'}; send SIGHUP to the broker to apply (providers follow it "
        "within their CRL refresh interval)"
    )
    return 0


def _cmd_pki_crl(args: argparse.Namespace) -> int:
    from tabadol.pki import CRL_DAYS, CertificateAuthority
    from tabadol.revocation import crl_number

    crl = CertificateAuthority(args.dir).write_crl()
    print(
        f"published {args.dir / 'crl.pem'} number {crl_number(crl)} with {len(crl)} "
        f"revocation(s), valid {CRL_DAYS} days; SIGHUP the broker to load it"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tabadol.demo import prepare, run_demo

    root, contracts = prepare(args.dir, args.contracts)
    asyncio.run(
        run_demo(
            root,
            listen=args.listen,
            contracts=contracts,
            ops_http=args.ops_http,
            ops_otlp=args.ops_otlp,
            metrics_listen=args.metrics_listen,
            gateway_listen=args.gateway_listen,
            traffic_every=args.traffic_every,
            once=args.once,
        )
    )
    return 0


def _seal_signers(
    pki_dir: Path, trust_domain: str, *, signer_dated: bool = False
) -> Callable[[bytes, int], str | None]:
    """Seals count only when signed by a broker certificate of this exchange's CA that was
    valid, and not revoked, when the seal was made (by the CRL in the PKI directory).
    ``signer_dated`` (the journal): a certificate revoked for cause counts at no time."""

    from cryptography import x509

    from tabadol.ledger.signers import signer_check
    from tabadol.pki import load_crl
    from tabadol.revocation import RevocationList

    try:
        ca = x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes())
    except (OSError, ValueError) as e:
        raise TabadolError(f"{pki_dir / 'ca.crt'}: cannot load the CA certificate: {e}") from e
    revocations = RevocationList.from_crl(load_crl(pki_dir / "crl.pem", ca), ca)
    revoked_at = (
        revocations.signer_dated_signatures_count_until()
        if signer_dated
        else revocations.signatures_count_until()
    )

    return signer_check(ca_cert=ca, trust_domain=trust_domain, revoked_at=revoked_at)


def _open_ledger(config: Path, *, readonly: bool = True, registry: bool = False) -> tuple[Any, Any]:
    """The configuration (with ``registry``, the registry in force) and its ledger."""
    from tabadol.config import load
    from tabadol.ledger.store import LedgerWriteError, open_ledger
    from tabadol.registry.current import load_current

    cfg = load_current(config) if registry else load(config)
    try:
        return cfg, open_ledger(cfg.ledger, readonly=readonly)
    except LedgerWriteError as e:
        raise TabadolError(str(e)) from e


def _ledger_label(cfg: Any) -> str:
    from tabadol.database import describe

    return describe(cfg.ledger.url) if cfg.ledger.url is not None else str(cfg.ledger.path)


def _checkpoints(args: argparse.Namespace, cfg: Any) -> tuple[list[Any], list[str]]:
    """The trusted checkpoints of the file verify reads (none with --full), and why any
    other line of it is refused."""
    from tabadol.ledger import checkpoints

    if args.full:
        return [], []
    path = args.checkpoints or checkpoints.checkpoints_path(cfg.ledger.path)
    found, problems = checkpoints.read(path)
    if not found:
        return [], problems
    judge = _checkpoint_judge(cfg)
    trusted = []
    for checkpoint in found:
        if why := judge(checkpoint):
            problems.append(f"{path}: checkpoint at {checkpoint.describe()}: {why}; not used")
        else:
            trusted.append(checkpoint)
    return trusted, problems


def _checkpoint_judge(cfg: Any) -> Callable[[Any], str | None]:
    """Why a checkpoint cannot be trusted now (the CA, the CRL and the clock), or None."""
    import functools

    from cryptography import x509

    from tabadol.ledger import checkpoints
    from tabadol.pki import load_crl

    pki_dir = cfg.broker.pki_dir
    try:
        ca = x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes())
        revoked = {entry.serial_number for entry in load_crl(pki_dir / "crl.pem", ca)}
    except (OSError, ValueError) as e:
        raise TabadolError(f"{pki_dir}: cannot judge the checkpoints: {e}") from e
    return functools.partial(
        checkpoints.problem,
        ca_cert=ca,
        trust_domain=cfg.broker.trust_domain,
        revoked=revoked,
        now=dt.datetime.now(dt.UTC),
    )


def _verify_chain(
    args: argparse.Namespace,
    cfg: Any,
    store: Any,
    chain: str,
    signers: Callable[[bytes, int], str | None],
    anchor: list[Any],
    trusted: list[Any],
    floor: Any = None,
    sums: Any = None,
) -> Any:
    """One chain's verdict: from its newest trusted checkpoint whose seal still holds, on
    every core; with --as, a new checkpoint signed at its last seal when intact. ``floor``
    (archive.LiveStart): where the live part begins, the records before it archived.
    ``sums`` (a rollup.Rollup): the records checked are summed into it."""
    import functools
    import time

    from tabadol.ledger import checkpoints
    from tabadol.ledger.store import open_ledger_at
    from tabadol.ledger.verify import Start, Verdict, verify_chain

    witnessed = [seal for seal in anchor if seal.chain == chain]
    seals = {seal.seq: seal for seal in store.seals(chain)}
    start = floor.start if floor is not None else Start()
    if floor is not None and floor.seal is not None:
        seals.setdefault(floor.seal.seq, floor.seal)
    lowest = start.seal_count  # seals before it are archived: checked in their files
    for checkpoint in sorted((c for c in trusted if c.chain == chain), key=lambda c: c.seal):
        if checkpoint.seal < lowest:
            continue
        seal = seals.get(checkpoint.seal)
        if seal is None or (seal.count, seal.head_digest) != (
            checkpoint.count,
            checkpoint.head_digest,
        ):
            return Verdict(
                False,
                checkpoint.count,
                checkpoint.seal,
                checkpoint.count,
                f"seal {checkpoint.seal} no longer matches the checkpoint at "
                f"{checkpoint.describe()}: history before the checkpoint was rewritten",
            )
        if checkpoint.verified_ns < seal.sealed_ns:
            continue  # dated before the seal it vouches for: no one verified it then
        start = Start.after(seal)
    for seal in witnessed:  # the witness covers the whole chain: seals are cheap to compare
        if lowest <= seal.seq <= start.seal_count and seals.get(seal.seq) != seal:
            return Verdict(
                False,
                start.count,
                start.seal_count,
                None,
                f"seal {seal.seq} differs from what the anchor file witnessed",
            )
    verdict = verify_chain(
        store,
        signers,
        witnessed,
        chain=chain,
        start=start,
        reader=functools.partial(open_ledger_at, cfg.ledger.url, cfg.ledger.path, readonly=True),
        sums=sums,
    )
    if verdict.ok and args.as_ is not None and verdict.seals > start.seal_count:
        path = args.checkpoints or checkpoints.checkpoints_path(cfg.ledger.path)
        signed = checkpoints.sign(
            args.as_, cfg.broker.trust_domain, seals[verdict.seals], time.time_ns()
        )
        if why := _checkpoint_judge(cfg)(signed):  # later runs would refuse it: write none
            raise TabadolError(f"--as {args.as_}: cannot vouch for the ledger: {why}")
        checkpoints.append(path, signed)
    return verdict


def _cmd_ledger_verify(args: argparse.Namespace) -> int:
    from tabadol.ledger.rollup import Rollup
    from tabadol.ledger.sessions import alive, session_findings
    from tabadol.ledger.verify import (
        anchor_path,
        chains_missing,
        day_rollup_findings,
        read_anchor,
        rollup_findings,
    )

    cfg, store = _open_ledger(args.config)
    label = _ledger_label(cfg)
    signers = _seal_signers(cfg.broker.pki_dir, cfg.broker.trust_domain)
    anchor = sorted(
        {s for path in [anchor_path(cfg.ledger.path), *args.seals] for s in read_anchor(path)},
        key=lambda seal: (seal.chain, seal.seq),
    )
    chains = store.chains()
    broken = False
    for gone in sorted({seal.chain for seal in anchor} - set(chains)):
        witnessed = [seal for seal in anchor if seal.chain == gone]
        print(
            f"{label}: BROKEN: {f'node {gone}: ' if gone else ''}the seals witness holds "
            f"{len(witnessed)} seals over {witnessed[-1].count} records of this chain, which "
            "the ledger no longer holds at all: it was deleted"
        )
        broken = True
    checkpoints, checkpoint_problems = _checkpoints(args, cfg)
    days: set[int] = set()  # of records after the checkpoints: their rollups are rechecked
    for problem in checkpoint_problems:  # the verifier's own file was written by someone else
        print(f"{label}: checkpoint refused: {problem}")
        broken = True
    archived: dict[str, Any] = {}
    if args.archives is not None:  # the archive files, checked with the live store as one
        from tabadol.ledger.archive import check_archives

        archived, unreadable = check_archives(args.archives, signers)
        for problem in unreadable:
            print(f"{label}: archives: BROKEN: {problem}")
            broken = True
    for chain in sorted({*chains, *archived}) or [""]:  # one report per node's chain
        floor, archive_broken = _archived_part(args, store, label, chain, chains, archived, signers)
        broken |= archive_broken
        if chain not in chains and chains:
            continue
        # Rollups of intact records: all of them, summed as they are checked, or, resuming
        # from a checkpoint, those of the days the new records fall in.
        resumed = max((c.count for c in checkpoints if c.chain == chain), default=0)
        sums = Rollup()  # the walk covers every live record, archived copies or not
        verdict = _verify_chain(args, cfg, store, chain, signers, anchor, checkpoints, floor, sums)
        print(f"{label}: {f'node {chain}: ' if chain else ''}{verdict}")
        broken |= not verdict.ok
        if verdict.ok:
            if resumed:  # the days of the records the walk checked: those after a checkpoint
                days |= {key.day_ns for key in sums.groups}
            else:
                for difference in rollup_findings(store, chain, sums):
                    print(f"{label}: {f'node {chain}: ' if chain else ''}BROKEN: {difference}")
                    broken = True
        if cfg.ledger.tsa_certificate is not None:  # RFC 3161 tokens of the chain's seals
            from tabadol.ledger.timestamper import read_tsa_certificate
            from tabadol.ledger.timestamps import timestamp_findings

            tsa_pem = read_tsa_certificate(cfg.ledger.tsa_certificate)
            for stamped in timestamp_findings(
                store, chain, store.seals(chain), tsa_pem, cfg.ledger.tsa_max_delay_seconds
            ):
                print(f"{label}: {f'node {chain}: ' if chain else ''}timestamps: {stamped}")
                broken |= stamped.startswith("BROKEN")
    for difference in day_rollup_findings(store, days):
        print(f"{label}: BROKEN: {difference}{' (every chain)' if len(chains) > 1 else ''}")
        broken = True
    for missing in chains_missing(store.sessions(), chains, store.chain_for):
        print(f"{label}: BROKEN: {missing}")
        broken = True
    # Answered calls that never reached the ledger: shown by the writers' sessions.
    journal_signers = _seal_signers(cfg.broker.pki_dir, cfg.broker.trust_domain, signer_dated=True)
    sessions, journaled, journal_problems = _journaled(cfg.ledger.path, store, journal_signers)
    findings = session_findings(sessions, alive, journaled)
    for finding in findings:
        print(f"{label}: {finding}")
    for problem in journal_problems:
        print(f"{label}: {problem}")
    gap = any(finding.gap for finding in findings)
    return 0 if not broken and not gap and not journal_problems else 1


def _archived_part(
    args: argparse.Namespace,
    store: Any,
    label: str,
    chain: str,
    chains: list[str],
    archived: dict[str, Any],
    seal_signers: Callable[[bytes, int], str | None],
) -> tuple[Any, bool]:
    """Print what verify says of a chain's archived part (its files with --archives, else
    that it is archived; its signed prefix and archived rollup rows either way); where the
    live part begins, and whether something is wrong."""
    from tabadol.ledger.archive import ChainOfArchives, live_start, prefix_problem
    from tabadol.ledger.verify import Start

    node = f"{label}: {f'node {chain}: ' if chain else ''}"
    broken = False
    found = archived.get(chain)
    if found is not None:
        if found.problem:
            print(f"{node}archives: BROKEN: {found.problem}")
            broken = True
        else:
            print(
                f"{node}archives: OK: records 1 to {found.end.count} (seals 1 to "
                f"{found.end.seal_count}) in {len(found.files)} files, intact and signed"
            )
    if chains and chain not in chains:
        print(f"{node}BROKEN: the archives hold this chain, but the live ledger does not")
        return None, True
    if args.archives is not None and found is None:
        found = ChainOfArchives(chain, (), Start())
    prefix = store.archived(chain)
    archived_rows = store.rollup_rows(chain, archived=True)
    if why := prefix_problem(prefix, archived_rows, store.signers(), seal_signers):
        print(f"{node}BROKEN: {why}")
        broken = True
    floor = live_start(
        found if args.archives is not None else None,
        prefix,
        lambda n: next((s for s in store.seals(chain) if s.seq == n), None),
    )
    for note in floor.notes:
        print(f"{node}{note}")
    if floor.problem:
        print(f"{node}BROKEN: {floor.problem}")
        broken = True
    return floor, broken


def _cmd_ledger_archive(args: argparse.Namespace) -> int:
    import time

    from tabadol.broker.credentials import BrokerCredentials
    from tabadol.ledger.archive import archive_chain, parse_before
    from tabadol.ledger.seal import Sealer
    from tabadol.ledger.store import LedgerWriteError

    try:
        before_ns = parse_before(args.before)
    except ValueError as e:
        raise TabadolError(f"--before: {e}") from e
    cfg, store = _open_ledger(args.config, readonly=False)
    try:
        creds = BrokerCredentials.load(cfg.broker.pki_dir, cfg.broker.trust_domain, cfg.path)
        sealer = Sealer(creds.key_pem, creds.cert_pem)
        signers = _seal_signers(cfg.broker.pki_dir, cfg.broker.trust_domain)
        try:
            args.out.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise TabadolError(
                f"{args.out}: cannot make the archive directory: {e.strerror}"
            ) from e
        for chain in store.chains():
            done = archive_chain(
                store, chain, before_ns, args.out, sealer, signers, time.time_ns,
                records_per_file=args.records_per_file,
            )  # fmt: skip
            print(f"{_ledger_label(cfg)}: {done}")
    except LedgerWriteError as e:
        raise TabadolError(str(e)) from e
    finally:
        store.close()
    return 0


def _records_per_file(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of records, 1 or more")
    return int(text)


def _cmd_ledger_verify_archive(args: argparse.Namespace) -> int:
    """The auditor's check: archive files and the CA certificate, no configuration."""
    from cryptography import x509

    from tabadol.errors import PkiError
    from tabadol.ledger.archive import archive_files, check_archives, timestamps_of
    from tabadol.ledger.signers import signer_check
    from tabadol.ledger.timestamps import DEFAULT_MAX_DELAY_S, timestamp_findings
    from tabadol.pki import load_crl, trust_domain_of
    from tabadol.revocation import RevocationList

    try:
        ca = x509.load_pem_x509_certificate(args.ca.read_bytes())
    except (OSError, ValueError) as e:
        raise TabadolError(f"--ca {args.ca}: cannot load the CA certificate: {e}") from e
    try:
        trust_domain = args.trust_domain or trust_domain_of(ca)
    except PkiError as e:
        raise TabadolError(f"--ca {args.ca}: {e}; give --trust-domain") from e
    revoked_at: dict[int, dt.datetime] = {}
    if args.crl is not None:
        try:
            revoked_at = RevocationList.from_crl(
                load_crl(args.crl, ca), ca
            ).signatures_count_until()
        except (OSError, ValueError, PkiError) as e:
            raise TabadolError(f"--crl {args.crl}: {e}") from e
    tsa_pem = None
    if args.tsa_certificate is not None:
        from tabadol.ledger.timestamper import read_tsa_certificate

        tsa_pem = read_tsa_certificate(args.tsa_certificate)
    signers = signer_check(ca_cert=ca, trust_domain=trust_domain, revoked_at=revoked_at)
    if not archive_files(args.directory):
        print(f"{args.directory}: BROKEN: no archive files (*.tabadol-archive) here")
        return 1
    chains, unreadable = check_archives(args.directory, signers, keep_seals=tsa_pem is not None)
    broken = bool(unreadable)
    for problem in unreadable:
        print(f"{args.directory}: BROKEN: {problem}")
    for chain, found in chains.items():
        name = f"chain {chain or 'main'}"
        if found.problem:
            print(f"{args.directory}: {name}: BROKEN: {found.problem}")
            broken = True
        else:
            print(
                f"{args.directory}: {name}: OK: records 1 to {found.end.count}, seals 1 to "
                f"{found.end.seal_count}, in {len(found.files)} files; chain, seals and "
                "signatures intact"
            )
        for checked in found.files:
            if tsa_pem is None:
                break
            for stamped in timestamp_findings(
                timestamps_of(checked), chain, checked.seals, tsa_pem,
                args.tsa_max_delay_seconds or DEFAULT_MAX_DELAY_S,
            ):  # fmt: skip
                print(f"{args.directory}: {name}: {checked.path.name}: timestamps: {stamped}")
                broken |= stamped.startswith("BROKEN")
    return 1 if broken else 0


def _cmd_ledger_init(args: argparse.Namespace) -> int:
    from tabadol.ledger.store import LedgerWriteError

    cfg, store = _open_ledger(args.config, readonly=False)  # makes what is missing
    try:
        if args.one_role_per_node:
            if cfg.ledger.url is None:
                raise TabadolError(
                    "--one-role-per-node is for a ledger on PostgreSQL ([ledger] url)"
                )
            store.confine_chains_to_roles()
    except LedgerWriteError as e:
        raise TabadolError(str(e)) from e
    finally:
        store.close()
    print(f"{_ledger_label(cfg)}: the ledger's tables are there")
    if args.one_role_per_node:
        print("each node's role, named as its [broker] instance, may write only its own chain")
    return 0


def _cmd_ledger_rollup(args: argparse.Namespace) -> int:
    from tabadol.ledger.store import LedgerWriteError

    cfg, store = _open_ledger(args.config, readonly=False)
    label = _ledger_label(cfg)
    try:
        for chain in store.chains() or [""]:
            before = store.rebuild_rollup(chain)
            differed = len(list(before.differences(store.rollup_rows(chain))))
            node = f"node {chain}: " if chain else ""
            if differed:
                print(f"{label}: {node}{differed} rollup rows differed from the records: rebuilt")
            else:
                print(f"{label}: {node}rollups match the records")
    except LedgerWriteError as e:
        raise TabadolError(str(e)) from e
    finally:
        store.close()
    return 0


def _cmd_ledger_acknowledge(args: argparse.Namespace) -> int:
    from tabadol.ledger.store import LedgerWriteError

    if not args.reason.strip() or not args.by.strip():
        raise TabadolError("--by and --reason must say who looked into the gap and what they found")
    cfg, store = _open_ledger(args.config, readonly=False)
    try:
        matches = [s for s in store.sessions() if s.id.startswith(args.session)]
        if len(matches) != 1:
            found = "no session" if not matches else f"{len(matches)} sessions"
            raise TabadolError(
                f"{_ledger_label(cfg)}: {found} with an id starting {args.session!r}; "
                "`tabadol ledger verify` prints each gap's session id"
            )
        session = matches[0]
        if session.acknowledged:
            raise TabadolError(
                f"session {session.id[:12]}'s gap was already acknowledged by {session.acknowledged}"
            )
        when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        store.acknowledge_session(session.id, f"{args.by} at {when}: {args.reason}")
    except LedgerWriteError as e:
        raise TabadolError(str(e)) from e
    finally:
        store.close()
    print(f"{_ledger_label(cfg)}: session {session.id[:12]}'s gap acknowledged by {args.by}")
    return 0


def _journaled(
    ledger_path: Path, store: Any, signers: Callable[[bytes, int], str | None]
) -> tuple[list[Any], Callable[[str], int | None], list[str]]:
    """The ledger's sessions; per session that stopped into the journal, its records waiting
    for the next start (only what a broker of this exchange signed counts); and what is
    wrong in the journal."""
    from collections import Counter

    from tabadol.ledger.journal import (
        Journal,
        in_ledger,
        journal_path,
        rejected_lines,
        rejected_path,
        review,
    )

    path = journal_path(ledger_path)
    try:
        with Journal(path).reading() as found:  # no start ends a session under our feet
            sessions = store.sessions()
            # Written through when an outage ended: settled, neither waiting nor refused.
            written = in_ledger(found, store.records_between)
        judged = review(found, {s.id: s for s in sessions}, signers, written)
        aside = rejected_lines(path)
    except OSError as e:
        raise TabadolError(f"{path}: cannot read the ledger's journal: {e.strerror}") from e
    entries = [entry for block in judged.accepted for entry in block.entries]
    closed = {entry.session for entry in entries if entry.closed is not None}
    waiting = Counter(entry.session for entry in entries if entry.record is not None)
    problems = []
    if judged.refused:
        problems.append(
            f"UNVERIFIED JOURNAL: {judged.refused_lines} lines in {path} cannot be written to "
            f"the ledger ({judged.reasons()}); the next start will not write them, and sets "
            f"them aside in {rejected_path(path)}"
        )
    if aside:
        problems.append(
            f"REJECTED JOURNAL: {aside} lines in {rejected_path(path)} could not be verified "
            "and were not written; look into them (each says why), then move the file away"
        )
    return sessions, (lambda session: waiting[session] if session in closed else None), problems


def _parse_time(text: str, option: str) -> int:
    """ISO 8601 date or date-time (UTC unless it says otherwise) to epoch nanoseconds."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise TabadolError(f"{option}: {text!r} is not an ISO 8601 date or date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1e9)


def _cmd_ledger_export(args: argparse.Namespace) -> int:
    from tabadol.ledger.export import export

    _, store = _open_ledger(args.config)
    start = _parse_time(args.start, "--from") if args.start else 0
    end = _parse_time(args.end, "--to") if args.end else 2**63 - 1
    out = open(args.out, "w", newline="") if args.out else sys.stdout  # noqa: SIM115
    try:
        count = export(store.records_between(start, end), out, args.format)
    finally:
        if args.out:
            out.close()
    print(f"exported {count} records", file=sys.stderr)
    return 0


def _cmd_report_quarterly(args: argparse.Namespace) -> int:
    from tabadol.reports import Quarter, build_quarterly, write_quarterly

    try:
        quarter = Quarter.parse(args.quarter)
    except ValueError as e:
        raise TabadolError(f"--quarter: {e}") from e
    cfg, store = _open_ledger(args.config, registry=True)  # the agencies it assesses
    try:
        report = build_quarterly(cfg, store, quarter)
    finally:
        store.close()
    for path in write_quarterly(report, args.out):
        print(path)
    return 0


def _discovery(args: argparse.Namespace, ask: Callable[[Any], Any]) -> Any:
    """Ask the broker's Discovery service, as the agency whose credentials are given."""
    import grpc.aio

    from tabadol.client import connect
    from tabadol.platform.v1 import discovery_pb2_grpc

    async def run() -> Any:
        async with connect(args.broker, args.credentials) as channel:
            try:
                return await ask(discovery_pb2_grpc.DiscoveryStub(channel))
            except grpc.aio.AioRpcError as e:
                raise TabadolError(f"{args.broker}: {e.code().name}: {e.details()}") from e

    return asyncio.run(run())


def _cmd_services(args: argparse.Namespace) -> int:
    from tabadol.describe import services_table
    from tabadol.platform.v1 import discovery_pb2

    async def ask(stub: Any) -> tuple[Any, Any]:
        services = await stub.ListServices(discovery_pb2.ListServicesRequest(), timeout=30)
        allowed = await stub.AllowedMethods(discovery_pb2.AllowedMethodsRequest(), timeout=30)
        return services, allowed

    services, allowed = _discovery(args, ask)
    print(services_table(services.services, allowed.agency), end="")
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    from tabadol.describe import describe, openapi_text
    from tabadol.platform.v1 import discovery_pb2

    if args.openapi:
        answer = _discovery(
            args,
            lambda stub: stub.GetOpenAPI(
                discovery_pb2.GetOpenAPIRequest(service=args.service or ""), timeout=30
            ),
        )
        try:
            print(openapi_text(answer.json), end="")
        except ValueError as e:
            raise TabadolError(f"{args.broker}: {e}") from e
        return 0
    if args.service is None:
        raise TabadolError(
            "describe: name a service, e.g. tabadol.agencies.nocr.v1.PersonRegistry, "
            "or ask for the OpenAPI document with --openapi"
        )

    async def ask(stub: Any) -> tuple[Any, Any, Any]:
        contract = await stub.GetContract(
            discovery_pb2.GetContractRequest(service=args.service), timeout=30
        )
        methods = await stub.ListMethods(
            discovery_pb2.ListMethodsRequest(service=args.service), timeout=30
        )
        services = await stub.ListServices(discovery_pb2.ListServicesRequest(), timeout=30)
        return contract, methods, services

    contract, methods, services = _discovery(args, ask)
    provider = next((s.provider for s in services.services if s.name == args.service), "?")
    print(describe(contract, args.service, methods.methods, provider), end="")
    return 0


def _cmd_contracts_check(args: argparse.Namespace) -> int:
    from tabadol.governance import breaking_changes, load_contracts

    found = breaking_changes(load_contracts(args.old), load_contracts(args.new))
    for change in found:
        print(change)
    summary = (
        f"{args.new}: {len(found)} breaking change(s) since {args.old}"
        if found
        else f"{args.new}: no breaking changes since {args.old}"
    )
    print(summary, file=sys.stderr)
    return 1 if found else 0


def _cmd_contracts_lint(args: argparse.Namespace) -> int:
    from tabadol.governance import lint, load_contracts, own_files

    found = lint(load_contracts(args.path), targets=own_files(args.path), only=args.rule)
    for finding in found:
        print(finding)
    print(f"{args.path}: {len(found)} finding(s)", file=sys.stderr)
    return 1 if found else 0


def _request_mb(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MB from 1 to 1024")
    return int(text)


def _cmd_ops(args: argparse.Namespace) -> int:
    from tabadol.ops.server import run
    from tabadol.ops.store import StoreLimits

    if args.config is None:
        raise TabadolError(
            "tabadol ops needs --config broker.toml: the console and the span collector admit "
            "only identities of the platform PKI named in its [broker] section (pki_dir, "
            "trust_domain), and there is no unauthenticated mode. Issue the console's "
            "certificate with `tabadol pki issue --dir PKI --ops`, and yours with "
            "`tabadol pki issue --dir PKI --operator NAME`."
        )
    limits = StoreLimits(
        max_age_seconds=args.retention_hours * 3600, max_bytes=args.max_db_mb * 1024**2
    )
    asyncio.run(
        run(
            args.config,
            args.db,
            args.http,
            args.otlp,
            limits,
            allowed_hosts=args.allowed_host or (),
            login_link=args.login_link,
            otlp_max_request_bytes=args.otlp_max_request_mb * 1024**2,
        )
    )
    return 0


def _cmd_call(args: argparse.Namespace) -> int:
    import grpc.aio
    from google.protobuf import json_format
    from google.protobuf.message import DecodeError

    from tabadol.client import connect
    from tabadol.client.dynamic import DynamicContracts, call_json

    requests = list(args.json) or ["{}"]
    if requests == ["-"]:
        requests = [line for line in sys.stdin.read().splitlines() if line.strip()]

    async def run() -> int:
        contracts = DynamicContracts(args.contracts)
        async with connect(args.broker.split(","), args.credentials) as channel:
            try:
                async for response in call_json(
                    channel, contracts, args.method, requests, timeout=args.timeout
                ):
                    print(response, flush=True)
            except grpc.aio.AioRpcError as e:
                print(f"tabadol: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
        return 0

    try:
        return asyncio.run(run())
    except (LookupError, ValueError, OSError, json_format.ParseError, DecodeError) as e:
        raise TabadolError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    from tabadol.access.cli import add_access_commands
    from tabadol.ops.defaults import DEFAULT_HTTP, DEFAULT_MAX_REQUEST_MB, DEFAULT_OTLP
    from tabadol.ops.store.base import DEFAULT_MAX_AGE_SECONDS, DEFAULT_MAX_BYTES
    from tabadol.pki import REASONS
    from tabadol.registry.cli import add_registry_commands

    parser = argparse.ArgumentParser(
        prog="tabadol",
        description="Tabadol: the national information-exchange platform.",
        epilog=EPILOG,
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = sub.add_parser(
        "broker",
        help="run the broker",
        description="Run the broker. SIGHUP reloads the configuration file, the broker's "
        "certificate and the CRL with no downtime; SIGTERM drains in-flight calls (up to "
        "shutdown_grace_seconds), writes the ledger and the spans, and stops. With --workers N, "
        "N processes share the port under a supervisor that restarts any that dies.",
    )
    broker.add_argument("--config", type=Path, required=True, help="broker TOML configuration")
    broker.add_argument(
        "--workers",
        type=int,
        default=1,
        help="broker processes sharing the port, under a supervisor that restarts any that "
        "dies (default 1: no supervisor)",
    )
    broker.set_defaults(func=_cmd_broker)

    config = sub.add_parser("config", help="work with broker configuration files")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check", help="validate a configuration and its PKI files without starting a broker"
    )
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(func=_cmd_config_check)

    pki = sub.add_parser("pki", help="run the national PKI (CA, certificates, CRL)")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    init = pki_sub.add_parser("init", help="create the platform CA (refuses to overwrite one)")
    init.add_argument("--dir", type=Path, required=True, help="PKI directory")
    init.add_argument("--trust-domain", required=True, help="e.g. tabadol.example")
    init.add_argument("--days", type=int, default=3650, help="CA lifetime (default 3650)")
    init.set_defaults(func=_cmd_pki_init)

    issue = pki_sub.add_parser(
        "issue", help="issue a certificate: an agency's, an operator's, the broker's, ..."
    )
    issue.add_argument("--dir", type=Path, required=True, help="PKI directory")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--agency", metavar="ID", help="agency id, e.g. nocr")
    who.add_argument("--operator", metavar="NAME", help="an operator of the ops console")
    who.add_argument("--auditor", metavar="NAME", help="an auditor (ledger, dashboard, reports)")
    who.add_argument("--broker", action="store_true", help="the broker's certificate")
    who.add_argument("--ops", action="store_true", help="the ops console's certificate")
    issue.add_argument("--dns", action="append", help="extra DNS name (broker, ops; repeatable)")
    issue.add_argument("--ip", action="append", help="extra IP address (broker, ops; repeatable)")
    issue.add_argument("--days", type=int, default=365, help="lifetime (default 365)")
    issue.add_argument(
        "--force",
        action="store_true",
        help="replace an existing certificate (a replaced broker or ops certificate is revoked)",
    )
    issue.set_defaults(func=_cmd_pki_issue)

    revoke = pki_sub.add_parser(
        "revoke",
        help="revoke certificates and publish a new CRL",
        description="Revoke and record it in revoked.jsonl, then publish a new, higher-numbered "
        "CRL built from every recorded revocation.",
    )
    revoke.add_argument("--dir", type=Path, required=True, help="PKI directory")
    what = revoke.add_mutually_exclusive_group(required=True)
    what.add_argument("--agency", metavar="ID", help="every certificate ever issued to it")
    what.add_argument("--operator", metavar="NAME", help="every certificate ever issued to them")
    what.add_argument("--auditor", metavar="NAME", help="every certificate ever issued to them")
    what.add_argument("--broker", action="store_true", help="the certificate in broker.crt")
    what.add_argument("--ops", action="store_true", help="the certificate in ops.crt")
    what.add_argument("--serial", metavar="HEX", help="one certificate, by serial")
    revoke.add_argument(
        "--reason",
        choices=list(REASONS),
        default="unspecified",
        help="recorded in the CRL (default unspecified)",
    )
    revoke.set_defaults(func=_cmd_pki_revoke)

    crl = pki_sub.add_parser(
        "crl",
        help="publish a fresh CRL from the CA's records (run it well within the 7 days)",
    )
    crl.add_argument("--dir", type=Path, required=True, help="PKI directory")
    crl.set_defaults(func=_cmd_pki_crl)

    demo = sub.add_parser(
        "demo",
        help="run a broker and four demo agencies with sample traffic",
        description="Create a PKI and a configuration under DIR (once), start the broker and "
        "the nocr, post, cra and tax agencies, send sample traffic of every RPC kind and keep "
        "running until Ctrl-C.",
    )
    demo.add_argument("--dir", type=Path, default=Path("var"), help="state directory (default var)")
    demo.add_argument("--listen", default="127.0.0.1:7443", help="broker address")
    demo.add_argument(
        "--contracts",
        type=Path,
        default=Path("build/contracts.pb"),
        help="FileDescriptorSet from `make protos` (default build/contracts.pb)",
    )
    demo.add_argument("--once", action="store_true", help="send the traffic, then stop")
    demo.add_argument(
        "--traffic-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="send another round of traffic this often (default 30; 0 = only at start)",
    )
    demo.add_argument(
        "--metrics-listen",
        default="127.0.0.1:9464",
        help="the broker's Prometheus /metrics (default 127.0.0.1:9464)",
    )
    demo.add_argument(
        "--gateway-listen",
        default="127.0.0.1:8443",
        help="the broker's HTTP entry, Connect and REST/JSON (default 127.0.0.1:8443)",
    )
    demo.add_argument(
        "--ops-http", default=DEFAULT_HTTP, help=f"trace viewer (default {DEFAULT_HTTP})"
    )
    demo.add_argument(
        "--ops-otlp", default=DEFAULT_OTLP, help=f"OTLP collector (default {DEFAULT_OTLP})"
    )
    demo.set_defaults(func=_cmd_demo)

    from tabadol.governance.lint import RULES

    contracts = sub.add_parser("contracts", help="check contracts for breaking changes and style")
    contracts_sub = contracts.add_subparsers(
        dest="contracts_command", required=True, metavar="ACTION"
    )
    ccheck = contracts_sub.add_parser(
        "check",
        help="report the changes from OLD to NEW that would break consumers (exit 1 if any)",
        description="Compare contracts within each major version (a package ending in vN): a "
        "removed or renumbered field, a changed field type or cardinality, a removed method, a "
        "changed streaming kind, a removed enum value, a renamed package or service... each is "
        "explained. Additions pass. A new major version (v2) may live beside v1.",
    )
    ccheck.add_argument(
        "old", type=Path, help="published contracts: a .proto directory or a FileDescriptorSet"
    )
    ccheck.add_argument("new", type=Path, help="proposed contracts, in either form")
    ccheck.set_defaults(func=_cmd_contracts_check)
    clint = contracts_sub.add_parser(
        "lint", help="check contracts against Tabadol's style rules (exit 1 on findings)"
    )
    clint.add_argument(
        "path", type=Path, nargs="?", default=Path("protos"),
        help="a .proto directory or a FileDescriptorSet (default protos)",
    )  # fmt: skip
    clint.add_argument("--rule", action="append", choices=RULES, help="only this rule (repeatable)")
    clint.set_defaults(func=_cmd_contracts_lint)

    add_registry_commands(sub)  # tabadol registry import/export/diff/history/publish-crl
    add_access_commands(sub)  # tabadol access request/list/approve/.../audit
    ledger = sub.add_parser("ledger", help="check and export the transaction ledger")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    lverify = ledger_sub.add_parser(
        "verify",
        help="check every record, link and seal; prints OK with the count or the first break",
        description="Check the ledger named by the configuration's [ledger] path or url: "
        "positions, the hash chain, every seal's signature (a broker certificate of this "
        "exchange's CA) and the seals witness (anchor file) beside the ledger; that the "
        "rollups the reports read are the sums of the records; the archived prefix's signature "
        "and rows, and with --archives the archive files too. On PostgreSQL, every "
        "node's chain, one line per node. Exit status 0 when intact, 1 when broken.",
    )
    lverify.add_argument("--config", type=Path, required=True, help="broker configuration")
    lverify.add_argument(
        "--seals",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="another node's seals witness (its <ledger path>.seals, shipped off-box) to check "
        "its chain against; repeat for each node",
    )
    lverify.add_argument(
        "--full",
        action="store_true",
        help="check every record from the first, whatever the checkpoints say",
    )
    lverify.add_argument(
        "--as",
        dest="as_",
        type=Path,
        metavar="DIR",
        help="your credentials (from `tabadol pki issue --auditor NAME` or --operator NAME): "
        "sign a checkpoint at the last seal when intact, so the next verify checks only "
        "what comes after it",
    )
    lverify.add_argument(
        "--checkpoints",
        type=Path,
        metavar="FILE",
        help="where signed checkpoints are read and appended (default: <ledger path>.checkpoints)",
    )
    lverify.add_argument(
        "--archives",
        type=Path,
        metavar="DIR",
        help="the archive files (`tabadol ledger archive --out DIR`): check them and the live "
        "ledger as one chain per node",
    )
    lverify.set_defaults(func=_cmd_ledger_verify)
    larchive = ledger_sub.add_parser(
        "archive",
        help="move the oldest sealed batches into signed archive files",
        description="Per chain, write the longest run of whole sealed batches sealed before "
        "--before that is not archived yet into signed, compressed archive files in --out of "
        "about --records-per-file records each (checked as verify checks them), removing each "
        "file's records from the live ledger once it is written. The chain "
        "continues in the live ledger; rollups are kept, so reports still count the records "
        '(docs/ledger.md, "Archives").',
    )
    larchive.add_argument("--config", type=Path, required=True, help="broker configuration")
    larchive.add_argument(
        "--before",
        required=True,
        metavar="DATE",
        help="archive batches sealed before this: a date (00:00 Asia/Tehran) or an ISO "
        "date-time (Asia/Tehran unless it names its zone)",
    )
    larchive.add_argument("--out", type=Path, required=True, help="directory for the archives")
    larchive.add_argument(
        "--records-per-file",
        type=_records_per_file,
        default=1_000_000,
        metavar="N",
        help="records per archive file (default 1000000): whole sealed batches, so a file "
        "ends with the batch that reaches N",
    )
    larchive.set_defaults(func=_cmd_ledger_archive)
    lcheck = ledger_sub.add_parser(
        "verify-archive",
        help="the auditor's offline check of archive files: no configuration, no database",
        description="Check every archive file in DIR with only the exchange's CA certificate: "
        "each file's signature (a broker certificate of the CA), every record, link and seal, "
        "and that the files continue one another. One OK or BROKEN line per chain; exit "
        "status 0 when intact, 1 when not.",
    )
    lcheck.add_argument("directory", type=Path, metavar="DIR", help="the archive files")
    lcheck.add_argument("--ca", type=Path, required=True, help="the exchange's CA certificate")
    lcheck.add_argument(
        "--crl", type=Path, help="the CA's CRL: also refuse signatures made after a revocation"
    )
    lcheck.add_argument(
        "--trust-domain", help="the exchange's trust domain (default: the CA certificate's)"
    )
    lcheck.add_argument(
        "--tsa-certificate",
        type=Path,
        metavar="FILE",
        help="the TSA's certificate with its CA chain: check the seals' RFC 3161 tokens",
    )
    lcheck.add_argument(
        "--tsa-max-delay-seconds",
        type=float,
        help="how late a token may date its seal (default 86400, as [ledger] says)",
    )
    lcheck.set_defaults(func=_cmd_ledger_verify_archive)
    linit = ledger_sub.add_parser(
        "init",
        help="create the ledger's tables (run once, as the role that is to own them)",
        description="Create the ledger named by the configuration's [ledger] url (or path) "
        "if it is not there. On PostgreSQL, run it once as the role that owns the tables: "
        "broker nodes then need only SELECT, INSERT and UPDATE on them (docs/deployment.md). "
        "A broker creates them itself when its role may.",
    )
    linit.add_argument("--config", type=Path, required=True, help="broker configuration")
    linit.add_argument(
        "--one-role-per-node",
        action="store_true",
        help="row-level security: each node connects as a role named as its [broker] "
        "instance, and may add to and move only its own chain (docs/deployment.md)",
    )
    linit.set_defaults(func=_cmd_ledger_init)
    lack = ledger_sub.add_parser(
        "acknowledge",
        help="record that a reported gap was looked into (who and why)",
        description="A gap that `ledger verify` reports (calls answered but never written, "
        "after a crash, kill -9 or a stop that could save nowhere) keeps verify failing until "
        "someone looks into it. This records who did, when and why; verify then shows the gap "
        "as acknowledged and no longer fails on it.",
    )
    lack.add_argument("--config", type=Path, required=True, help="broker configuration")
    lack.add_argument("--session", required=True, help="the session id (or its first characters)")
    lack.add_argument("--by", required=True, help="who looked into it")
    lack.add_argument("--reason", required=True, help="what was found, e.g. an incident number")
    lack.set_defaults(func=_cmd_ledger_acknowledge)
    lrollup = ledger_sub.add_parser(
        "rollup",
        help="rebuild the rollups (the reports' sums) from the records",
        description="Replace the rollup rows of the live records (per day, consumer, provider, "
        "service, method and status; per provider and five-minute window) with the sums of "
        "the records, in one transaction, and say per chain how many rows differed. Rows of "
        "archived records are kept. `ledger verify` reports rows that differ.",
    )
    lrollup.add_argument("--config", type=Path, required=True, help="broker configuration")
    lrollup.add_argument(
        "--rebuild", action="store_true", required=True, help="rebuild them from the records"
    )
    lrollup.set_defaults(func=_cmd_ledger_rollup)
    lexport = ledger_sub.add_parser("export", help="write records as CSV or JSON lines")
    lexport.add_argument("--config", type=Path, required=True, help="broker configuration")
    lexport.add_argument("--from", dest="start", help="ISO date or date-time (UTC by default)")
    lexport.add_argument("--to", dest="end", help="ISO date or date-time, exclusive")
    lexport.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    lexport.add_argument("--out", type=Path, help="file to write (default: standard output)")
    lexport.set_defaults(func=_cmd_ledger_export)

    report = sub.add_parser("report", help="reports for the exchange's regulators")
    report_sub = report.add_subparsers(dest="report_command", required=True, metavar="REPORT")
    quarterly = report_sub.add_parser(
        "quarterly",
        help="the quarterly e-service assessment (HTML, CSV and JSON)",
        description="Build the quarterly e-service assessment for a Solar Hijri quarter from "
        "the ledger and the registry in the configuration: national totals, per-agency "
        "figures and the indicators against the national targets (docs/reports.md).",
    )
    quarterly.add_argument("--config", type=Path, required=True, help="broker configuration")
    quarterly.add_argument("--quarter", required=True, help="Solar Hijri quarter, e.g. 1405-Q3")
    quarterly.add_argument("--out", type=Path, required=True, help="directory for the files")
    quarterly.set_defaults(func=_cmd_report_quarterly)

    ops = sub.add_parser(
        "ops",
        help="run the ops console (traces, dashboard, reports) and the OTLP span collector",
        description="Run the ops console over HTTPS: a web UI, a Jaeger-compatible JSON API, "
        "the ledger dashboard and the quarterly reports; and an OTLP/gRPC span collector "
        "over mTLS (see docs/tracing.md). --config names the broker configuration: its "
        "[broker] pki_dir and trust_domain say whom to admit, its ledger is what the "
        "dashboard shows. Both ports serve with ops.crt (`tabadol pki issue --ops`). "
        "Operators, auditors and agencies log in with a client certificate of the platform "
        "PKI; operators see everything, auditors the ledger views, an agency only its own "
        "traces, ledger rows and assessment. Spans are kept in SQLite, or with --db "
        "postgresql://... in PostgreSQL shared by several consoles, removed by age and by size.",
    )
    ops.add_argument(
        "--config",
        type=Path,
        help="broker configuration (required): the PKI and trust domain to admit, the ledger",
    )
    ops.add_argument(
        "--http", default=DEFAULT_HTTP, help=f"HTTPS console and API (default {DEFAULT_HTTP})"
    )
    ops.add_argument(
        "--otlp",
        default=DEFAULT_OTLP,
        help=f"OTLP/gRPC collector, mTLS (default {DEFAULT_OTLP})",
    )
    ops.add_argument(
        "--otlp-max-request-mb",
        type=_request_mb,
        metavar="MB",
        default=DEFAULT_MAX_REQUEST_MB,
        help="refuse OTLP requests larger than this with RESOURCE_EXHAUSTED "
        f"(default {DEFAULT_MAX_REQUEST_MB}, gRPC's and the exporters' own)",
    )
    ops.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="another host name browsers use for the console (repeatable); it always answers "
        "to its bind address, localhost, 127.0.0.1, ::1 and the names in ops.crt",
    )
    ops.add_argument(
        "--login-link",
        action="store_true",
        help="print a one-time operator login link for a browser without a certificate "
        "(only when --http is a loopback address)",
    )
    ops.add_argument(
        "--db",
        metavar="PATH|URL",
        default=Path("var/ops/traces.db"),
        help="span store: a SQLite file (default var/ops/traces.db), or a postgresql://... "
        "URL that several ops consoles may share",
    )
    ops.add_argument(
        "--retention-hours",
        type=float,
        default=DEFAULT_MAX_AGE_SECONDS / 3600,
        help=f"drop traces older than this (default {DEFAULT_MAX_AGE_SECONDS // 3600})",
    )
    ops.add_argument(
        "--max-db-mb",
        type=int,
        default=DEFAULT_MAX_BYTES // 1024**2,
        help=f"drop the oldest traces past this size (default {DEFAULT_MAX_BYTES // 1024**2})",
    )
    ops.set_defaults(func=_cmd_ops)

    for name, helptext, func in (
        ("services", "list the exchange's services and what you may call", _cmd_services),
        ("describe", "show one service's contract, with its documentation", _cmd_describe),
    ):
        view = sub.add_parser(
            name,
            help=helptext,
            description=helptext[0].upper() + helptext[1:] + ", as the broker's Discovery "
            "service answers it for the agency whose credentials are given.",
        )
        view.add_argument("--broker", required=True, help="broker address, e.g. 127.0.0.1:7443")
        view.add_argument("--credentials", type=Path, required=True, help="agency credentials dir")
        if name == "describe":
            view.add_argument(
                "service",
                nargs="?",
                help="e.g. tabadol.agencies.nocr.v1.PersonRegistry (optional with --openapi)",
            )
            view.add_argument(
                "--openapi",
                action="store_true",
                help="print the OpenAPI 3.1 document (JSON) of what you may call over HTTP: "
                "every method, or the service's",
            )
        view.set_defaults(func=func)

    call = sub.add_parser(
        "call",
        help="call a method through the broker with JSON (like grpcurl)",
        description="Call METHOD (pkg.Service/Method) through the broker as the agency whose "
        "credentials are given. Each JSON argument is one request message (several for a "
        "client-streaming method; '-' reads one JSON object per line from stdin). Each "
        "response is printed as JSON.",
    )
    call.add_argument(
        "--broker",
        required=True,
        help="broker address, e.g. 127.0.0.1:7443, or the nodes' IP addresses separated by "
        "commas (10.0.0.1:7443,10.0.0.2:7443)",
    )
    call.add_argument("--credentials", type=Path, required=True, help="agency credentials dir")
    call.add_argument(
        "--contracts",
        type=Path,
        action="append",
        default=None,
        help="FileDescriptorSet(s) (default build/contracts.pb)",
    )
    call.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    call.add_argument("method", help="e.g. tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson")
    call.add_argument("json", nargs="*", help="request message(s) as JSON")
    call.set_defaults(func=_cmd_call)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from tabadol.client.credentials import CredentialsError

    parser = build_parser()
    args = parser.parse_args(argv)
    slot = os.environ.get("TABADOL_WORKER")
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s"
        + (f"[worker {slot}]" if slot is not None else "")
        + ": %(message)s",
        stream=sys.stderr,
    )
    # The stores say once that a database is unreachable, and again when it is back; the
    # pool's own warning for every reconnect attempt would bury that.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    if getattr(args, "contracts", None) is None and args.command == "call":
        args.contracts = [Path("build/contracts.pb")]
    try:
        code: int = args.func(args)
    except (TabadolError, CredentialsError) as e:
        print(f"tabadol: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tabadol ledger export | head`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
