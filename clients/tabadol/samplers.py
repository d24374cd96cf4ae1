"""The sampler and exporter names ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_EXPORTER`` may
take, as the OpenTelemetry specification lists them, and how a setting is read. Kept apart
from ``tabadol.client.tracing`` so that configuration checks load no SDK."""

DEFAULT_SAMPLER = "parentbased_always_on"
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
EXPORTERS = ("otlp", "console", "none")


class TracingConfigError(ValueError):
    """A sampler, ratio or exporter setting that the SDK would not understand."""


def parse_sampler(name: str, arg: str | None) -> tuple[str, float]:
    """A sampler's name as the spec spells it (``OTEL_TRACES_SAMPLER``) and its ratio (1.0
    when it takes none), or TracingConfigError naming what is wrong."""
    name = name.strip().lower()
    if name not in SAMPLERS:
        raise TracingConfigError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    ratio = 1.0
    if name.endswith("traceidratio"):
        try:
            ratio = float(arg) if arg not in (None, "") else 1.0
        except ValueError:
            raise TracingConfigError(f"sampler ratio {arg!r} is not a number") from None
        if not 0.0 <= ratio <= 1.0:
            raise TracingConfigError(f"sampler ratio {ratio} is outside 0..1")
    return name, ratio


def check_exporter(name: str) -> str:
    """``name`` if it is an exporter the spec names, else TracingConfigError."""
    if name not in EXPORTERS:
        raise TracingConfigError(
            f"unknown traces exporter {name!r}; expected {', '.join(EXPORTERS[:-1])} or none"
        )
    return name
