"""Four demo agencies that provide the national contracts over one synthetic population.

They stand in for the real NOCR, National Post, CRA and INTA in demos and tests. The same people
appear at every agency, so a person from `sample_person()` passes every agency's checks.
"""

from collections.abc import Callable

import grpc

from tabadol.demo_agencies import cra, nocr, post, tax
from tabadol.demo_agencies.population import Person, sample_person
from tabadol.demo_agencies.post import sample_postal_code
from tabadol.demo_agencies.tax import sample_invoice

__all__ = [
    "AGENCIES",
    "SERVICES",
    "Person",
    "sample_invoice",
    "sample_person",
    "sample_postal_code",
]

# Agency id -> the function that registers its demo service on a grpc.aio server.
AGENCIES: dict[str, Callable[[grpc.aio.Server], None]] = {
    "nocr": nocr.add_to_server,
    "post": post.add_to_server,
    "cra": cra.add_to_server,
    "tax": tax.add_to_server,
}

# Agency id -> fully-qualified name of the service it registers.
SERVICES: dict[str, str] = {
    "nocr": nocr.SERVICE_NAME,
    "post": post.SERVICE_NAME,
    "cra": cra.SERVICE_NAME,
    "tax": tax.SERVICE_NAME,
}
