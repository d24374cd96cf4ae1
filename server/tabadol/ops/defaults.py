"""The ops server's defaults, apart from the server so that the command line can name them
without loading it."""

DEFAULT_HTTP = "127.0.0.1:16686"  # the console and its API
DEFAULT_OTLP = "127.0.0.1:4317"  # the OTLP/gRPC collector
DEFAULT_MAX_REQUEST_MB = 4  # an OTLP export request's largest size: gRPC's and the exporters'
