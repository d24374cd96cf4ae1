"""The broker's HTTP entry: Connect and REST/JSON calls for agencies without gRPC."""
