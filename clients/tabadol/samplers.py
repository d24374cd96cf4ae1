"""The samplers ``OTEL_TRACES_SAMPLER`` may name, as the OpenTelemetry specification lists
them. Kept apart from ``tabadol.client.tracing`` so that configuration checks load no SDK."""

DEFAULT_SAMPLER = "parentbased_always_on"
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
