"""How many records per second the ledger writer commits (sealed batches, synchronous=FULL).

.venv/bin/python bench/ledger_write.py [--records 200000] [--batch-ms 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tabadol.ledger import LedgerRecord, LedgerWriter  # noqa: E402
from tabadol.ledger.seal import Sealer  # noqa: E402
from tabadol.ledger.store import SqliteLedgerStore  # noqa: E402
from tabadol.pki import CertificateAuthority  # noqa: E402


def broker_like_record(i: int, instance: str = "bench") -> LedgerRecord:
    """The record a broker writes for one small unary call, numbered ``i``."""
    return LedgerRecord(
        start_ns=time.time_ns(),
        end_ns=time.time_ns() + 1_000_000,
        trace_id=f"{i:032x}",
        request_id=f"{i:032x}",
        consumer="post",
        provider="nocr",
        service="tabadol.agencies.nocr.v1.PersonRegistry",
        method="InquirePerson",
        kind="unary",
        status_code=0,
        request_bytes=40,
        request_messages=1,
        response_bytes=180,
        response_messages=1,
        endpoint="127.0.0.1:9101",
        broker_instance=instance,
    )


def measure(records_count: int, batch_ms: float) -> dict[str, Any]:
    """Commit ``records_count`` broker-like records; the rate, the time and the seals."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ca = CertificateAuthority.init(tmp / "pki", "tabadol.example")
        ca.issue_broker()
        sealer = Sealer((ca.dir / "broker.key").read_bytes(), (ca.dir / "broker.crt").read_bytes())
        store = SqliteLedgerStore(tmp / "ledger.db")
        writer = LedgerWriter(store, sealer, batch_interval_s=batch_ms / 1000, buffer_records=10**9)
        records = [broker_like_record(i) for i in range(records_count)]
        started = time.perf_counter()
        for record in records:
            writer.submit(record)
        writer.close(timeout=600)
        elapsed = time.perf_counter() - started
        seals = sum(1 for _ in SqliteLedgerStore(tmp / "ledger.db", readonly=True).seals())
    return {
        "records": records_count,
        "seconds": elapsed,
        "records_per_s": records_count / elapsed,
        "seals": seals,
        "batch_ms": batch_ms,
    }


def main(args: argparse.Namespace) -> None:
    result = measure(args.records, args.batch_ms)
    print(
        f"committed {result['records']} records in {result['seconds']:.2f} s: "
        f"{result['records_per_s']:,.0f} records/s ({result['seals']} sealed batches, "
        f"batch interval {args.batch_ms} ms)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch-ms", type=float, default=100)
    main(parser.parse_args())
