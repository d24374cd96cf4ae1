"""Run the echo provider as its own process (so a test can kill it): prints its port."""

import asyncio
import sys

from tabadol.client import ProviderServer
from tests.support.echo import EchoProvider


async def main(credentials_dir: str) -> None:
    server = ProviderServer(credentials_dir)
    server.server.add_generic_rpc_handlers((EchoProvider(),))
    await server.start()
    print(f"listening on {server.port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
