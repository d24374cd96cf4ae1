"""Demo National Post: the AddressDirectory service over a synthetic address directory.

Addresses are never stored: each is rebuilt from its postal code on demand, so the directory
can hold thousands of them and stream them without holding them in memory.
"""

import itertools
import random
from collections.abc import AsyncIterator, Iterator

import grpc

from tabadol.agencies.post.v1 import address_directory_pb2 as pb
from tabadol.agencies.post.v1 import address_directory_pb2_grpc as pb_grpc
from tabadol.demo_agencies.geography import CITIES, City
from tabadol.identifiers import postal_code_problem

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AddressDirectory"].full_name

_STREETS = (
    "Valiasr Street", "Enghelab Street", "Azadi Street", "Shariati Street", "Ferdowsi Street",
    "Hafez Street", "Saadi Street", "Motahari Street", "Chamran Boulevard", "Keshavarz Boulevard",
    "Taleghani Street", "Bahar Street", "Golestan Boulevard", "Imam Reza Street",
)  # fmt: skip
_ALLEYS = (
    "Golestan Alley", "Yas Alley", "Nastaran Alley", "Laleh Alley", "Sousan Alley",
    "Baharestan Alley", "Shaghayegh Alley", "Narges Alley", "Alley 3", "Alley 7", "Alley 12",
)  # fmt: skip
_CITY_BY_PREFIX = {city.postal_prefix: city for city in CITIES}


def find_address(postal_code: str) -> pb.Address | None:
    """The address designated by a well-formed postal code, if the directory has one."""
    city = _CITY_BY_PREFIX.get(postal_code[:5])
    if city is None or not 1 <= int(postal_code[5:]) <= city.addresses:
        return None
    return _address(city, int(postal_code[5:]))


def cities_in(province: str, city: str = "") -> list[City]:
    """Cities of a region in postal code order; ValueError if malformed, LookupError if unknown."""
    if not province:
        raise ValueError("region.province is required")
    in_province = [known for known in CITIES if known.province.casefold() == province.casefold()]
    if not in_province:
        raise LookupError(f"the directory has no province named {province!r}")
    if city:
        in_province = [known for known in in_province if known.name.casefold() == city.casefold()]
        if not in_province:
            raise LookupError(f"the directory has no city named {city!r} in province {province!r}")
    return sorted(in_province, key=lambda known: known.postal_prefix)


def addresses_in(cities: list[City]) -> Iterator[pb.Address]:
    """Every address of these cities, built one at a time as the caller asks for them."""
    for city in cities:
        for serial in range(1, city.addresses + 1):
            yield _address(city, serial)


def sample_postal_code(rng: random.Random | None = None) -> str:
    """A postal code that the directory knows, for demo traffic."""
    rng = rng if rng is not None else random.Random()
    city = rng.choice(CITIES)
    return _postal_code(city, rng.randint(1, city.addresses))


class AddressDirectory(pb_grpc.AddressDirectoryServicer):
    """The National Post's address directory, serving synthetic addresses."""

    async def LookupPostalCode(
        self,
        request: pb.LookupPostalCodeRequest,
        context: grpc.aio.ServicerContext[pb.LookupPostalCodeRequest, pb.Address],
    ) -> pb.Address:
        problem = postal_code_problem(request.postal_code)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        address = find_address(request.postal_code)
        if address is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no address has postal code {request.postal_code}"
            )
        return address

    async def ListAddresses(
        self,
        request: pb.ListAddressesRequest,
        context: grpc.aio.ServicerContext[pb.ListAddressesRequest, pb.Address],
    ) -> AsyncIterator[pb.Address]:
        try:
            cities = cities_in(request.region.province, request.region.city)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except LookupError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        addresses = addresses_in(cities)
        if request.max_results:
            addresses = itertools.islice(addresses, request.max_results)
        for address in addresses:
            yield address


def add_to_server(server: grpc.aio.Server) -> None:
    """Registers the demo AddressDirectory on a server that has not started yet."""
    # The generated registration function has no type hints.
    pb_grpc.add_AddressDirectoryServicer_to_server(AddressDirectory(), server)


def _postal_code(city: City, serial: int) -> str:
    return f"{city.postal_prefix}{serial:05d}"


def _address(city: City, serial: int) -> pb.Address:
    postal_code = _postal_code(city, serial)
    # Seeded by the postal code so that a lookup and a listing build the same address.
    rng = random.Random(postal_code)
    address = pb.Address(
        postal_code=postal_code,
        province=city.province,
        city=city.name,
        district=f"District {rng.randint(1, city.districts)}",
        street=rng.choice(_STREETS),
        alley=rng.choice(_ALLEYS) if rng.random() < 0.7 else "",
        building_number=str(rng.randint(1, 240)) + ("/1" if rng.random() < 0.05 else ""),
    )
    if rng.random() < 0.6:
        address.floor = rng.randint(-1, 12)
        address.unit = str(rng.randint(1, 4) + 4 * max(address.floor, 0))
    if rng.random() < 0.9:
        address.location.latitude = round(city.latitude + rng.uniform(-0.05, 0.05), 6)
        address.location.longitude = round(city.longitude + rng.uniform(-0.05, 0.05), 6)
    return address
