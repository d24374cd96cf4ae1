"""How fast `ledger verify` checks a ledger: full (every core) and resumed from a checkpoint.

.venv/bin/python bench/ledger_verify.py [--records 1000000] [--new 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ledger_write import broker_like_record  # noqa: E402
from tabadol.ledger import LedgerWriter  # noqa: E402
from tabadol.ledger.seal import Sealer  # noqa: E402
from tabadol.ledger.store import SqliteLedgerStore  # noqa: E402
from tabadol.ledger.verify import Start, verify_chain  # noqa: E402
from tabadol.pki import CertificateAuthority  # noqa: E402


def fill(path: Path, sealer: Sealer, first: int, count: int) -> None:
    """Append ``count`` broker-like records through the real writer (sealed batches)."""
    writer = LedgerWriter(
        SqliteLedgerStore(path), sealer, batch_interval_s=0.1, buffer_records=10**9
    )
    for i in range(first, first + count):
        writer.submit(broker_like_record(i))
    writer.close(timeout=3600)


def timed(path: Path, start: Start) -> tuple[float, int]:
    store = SqliteLedgerStore(path, readonly=True)
    try:
        began = time.perf_counter()
        verdict = verify_chain(
            store,
            lambda cert, ns: (
                None
            ),  # the signer's certificate is judged once per seal, as in the CLI
            start=start,
            reader=functools.partial(SqliteLedgerStore, path, readonly=True),
        )
        elapsed = time.perf_counter() - began
    finally:
        store.close()
    assert verdict.ok, verdict
    return elapsed, verdict.records - start.count


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ca = CertificateAuthority.init(tmp / "pki", "tabadol.example")
        ca.issue_broker()
        sealer = Sealer((ca.dir / "broker.key").read_bytes(), (ca.dir / "broker.crt").read_bytes())
        path = tmp / "ledger.db"
        fill(path, sealer, 0, args.records)
        full = [timed(path, Start()) for _ in range(args.runs)]
        rates = sorted(n / s for s, n in full)
        print(
            f"full verify, {args.records} records: median {statistics.median(rates):,.0f} "
            f"records/s (range {rates[0]:,.0f} to {rates[-1]:,.0f}, {args.runs} runs)"
        )
        last = SqliteLedgerStore(path, readonly=True).last_seal()
        assert last is not None
        fill(path, sealer, args.records, args.new)
        incremental = sorted(timed(path, Start.after(last))[0] for _ in range(args.runs))
        print(
            f"incremental verify of {args.new} new records: median "
            f"{statistics.median(incremental):.2f} s (range {incremental[0]:.2f} to "
            f"{incremental[-1]:.2f} s)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    main(parser.parse_args())
