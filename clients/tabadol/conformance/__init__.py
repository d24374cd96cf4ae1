"""gRPC's interop test service as a Tabadol provider, to prove the broker transparent."""
