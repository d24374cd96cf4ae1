"""The echo provider for benchmarks, in its own process: prints ``listening on PORT``.

    .venv/bin/python -m bench.echo_provider CREDENTIALS_DIR

The tests' EchoProvider, minus its memory: it keeps no history of calls (a run makes
hundreds of thousands, and a growing heap would slow the provider down as the run goes on)
and does not insist on the broker's consumer header, so that direct calls and the other
proxies reach it unchanged. It echoes the person record of ``bench.person_contract`` too.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.person_contract import METHOD as PERSON_ECHO  # noqa: E402
from tabadol.client import ProviderServer  # noqa: E402
from tabadol.protocol import CONSUMER_KEY  # noqa: E402
from tests.conftest import LARGE_MESSAGES  # noqa: E402
from tests.support.echo import EchoProvider, Seen  # noqa: E402


class BenchEcho(EchoProvider):
    def _begin(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Seen:
        metadata = dict(context.invocation_metadata() or ())
        consumer = metadata.get(CONSUMER_KEY, "")
        return Seen(method, str(consumer), metadata, context.time_remaining())

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        if details.method == PERSON_ECHO:  # the record's bytes back, as Unary does
            return grpc.unary_unary_rpc_method_handler(self.unary)
        return super().service(details)


async def main(credentials_dir: str) -> None:
    server = ProviderServer(credentials_dir, options=LARGE_MESSAGES)
    server.server.add_generic_rpc_handlers((BenchEcho(),))
    await server.start()
    print(f"listening on {server.port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
