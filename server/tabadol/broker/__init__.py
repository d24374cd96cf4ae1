"""The Tabadol broker: a transparent, authenticating, authorizing gRPC proxy."""

from tabadol.broker.server import Broker, run

__all__ = ["Broker", "run"]
