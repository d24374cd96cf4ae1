"""Specification of the four demo agencies, called over a real gRPC server on loopback."""

import asyncio
from collections.abc import AsyncIterator, Awaitable
from random import Random

import grpc
import grpc.aio
import pytest

from tabadol.agencies.cra.v1 import mobile_ownership_pb2 as cra_pb
from tabadol.agencies.cra.v1 import mobile_ownership_pb2_grpc as cra_grpc
from tabadol.agencies.nocr.v1 import person_registry_pb2 as nocr_pb
from tabadol.agencies.nocr.v1 import person_registry_pb2_grpc as nocr_grpc
from tabadol.agencies.post.v1 import address_directory_pb2 as post_pb
from tabadol.agencies.post.v1 import address_directory_pb2_grpc as post_grpc
from tabadol.agencies.tax.v1 import invoice_registry_pb2 as tax_pb
from tabadol.agencies.tax.v1 import invoice_registry_pb2_grpc as tax_grpc
from tabadol.demo_agencies import (
    AGENCIES,
    SERVICES,
    Person,
    population,
    sample_invoice,
    sample_person,
    sample_postal_code,
)
from tabadol.demo_agencies.solar_hijri import SolarDate
from tabadol.identifiers import make_national_id
from tabadol.type.v1.date_pb2 import Date

# No city issues national ids starting with 999, so this valid id belongs to nobody.
STRANGER_ID = make_national_id("999000001")
DECEASED = next(person for person in population.PEOPLE if not person.alive)


@pytest.fixture(scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    for add_to_server in AGENCIES.values():
        add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(grace=None)


@pytest.fixture
def registry(channel: grpc.aio.Channel) -> nocr_grpc.PersonRegistryStub:
    return nocr_grpc.PersonRegistryStub(channel)


@pytest.fixture
def directory(channel: grpc.aio.Channel) -> post_grpc.AddressDirectoryStub:
    return post_grpc.AddressDirectoryStub(channel)


@pytest.fixture
def ownership(channel: grpc.aio.Channel) -> cra_grpc.MobileOwnershipStub:
    return cra_grpc.MobileOwnershipStub(channel)


@pytest.fixture
def invoices(channel: grpc.aio.Channel) -> tax_grpc.InvoiceRegistryStub:
    return tax_grpc.InvoiceRegistryStub(channel)


@pytest.fixture
def person() -> Person:
    return sample_person(Random(7))


def date(solar_date: SolarDate) -> Date:
    return Date(year=solar_date.year, month=solar_date.month, day=solar_date.day)


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def test_each_agency_registers_its_published_service() -> None:
    assert SERVICES == {
        "nocr": "tabadol.agencies.nocr.v1.PersonRegistry",
        "post": "tabadol.agencies.post.v1.AddressDirectory",
        "cra": "tabadol.agencies.cra.v1.MobileOwnership",
        "tax": "tabadol.agencies.tax.v1.InvoiceRegistry",
    }
    assert AGENCIES.keys() == SERVICES.keys()


# NOCR PersonRegistry


async def test_inquire_person_returns_the_civil_registration_record(
    registry: nocr_grpc.PersonRegistryStub, person: Person
) -> None:
    record = await registry.InquirePerson(
        nocr_pb.InquirePersonRequest(
            national_id=person.national_id, birth_date=date(person.birth_date)
        )
    )
    assert record.national_id == person.national_id
    assert (record.first_name, record.last_name, record.father_name) == (
        person.first_name,
        person.last_name,
        person.father_name,
    )
    assert record.birth_date == date(person.birth_date)
    assert record.gender in (nocr_pb.GENDER_FEMALE, nocr_pb.GENDER_MALE)
    assert (record.birth_place, record.issue_place) == (person.birth_place, person.issue_place)
    assert record.life_status == nocr_pb.LIFE_STATUS_ALIVE
    assert not record.HasField("death_date")


async def test_inquire_person_reports_a_death_with_its_date(
    registry: nocr_grpc.PersonRegistryStub,
) -> None:
    assert DECEASED.death_date is not None
    record = await registry.InquirePerson(
        nocr_pb.InquirePersonRequest(
            national_id=DECEASED.national_id, birth_date=date(DECEASED.birth_date)
        )
    )
    assert record.life_status == nocr_pb.LIFE_STATUS_DECEASED
    assert record.death_date == date(DECEASED.death_date)


async def test_inquire_person_rejects_a_national_id_failing_its_check_digit(
    registry: nocr_grpc.PersonRegistryStub,
) -> None:
    error = await rpc_error(
        registry.InquirePerson(
            nocr_pb.InquirePersonRequest(national_id="0012345678", birth_date=Date(year=1370))
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "national id 0012345678 fails its check digit: expected 9, got 8"


async def test_inquire_person_requires_a_birth_date(
    registry: nocr_grpc.PersonRegistryStub, person: Person
) -> None:
    error = await rpc_error(
        registry.InquirePerson(nocr_pb.InquirePersonRequest(national_id=person.national_id))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "birth_date is required"


async def test_inquire_person_answers_a_wrong_birth_date_like_an_unknown_national_id(
    registry: nocr_grpc.PersonRegistryStub, person: Person
) -> None:
    wrong_year = Date(year=person.birth_date.year - 1, month=1, day=1)
    for national_id in (person.national_id, STRANGER_ID):
        error = await rpc_error(
            registry.InquirePerson(
                nocr_pb.InquirePersonRequest(national_id=national_id, birth_date=wrong_year)
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == (
            f"no person with national id {national_id} born on {person.birth_date.year - 1}/01/01"
        )


async def test_verify_people_answers_every_query_in_order_with_its_verdict(
    registry: nocr_grpc.PersonRegistryStub, person: Person
) -> None:
    born = date(person.birth_date)
    queries = [
        nocr_pb.VerifyPersonRequest(
            reference="match", national_id=person.national_id, birth_date=born
        ),
        nocr_pb.VerifyPersonRequest(reference="bad-id", national_id="0012345678", birth_date=born),
        nocr_pb.VerifyPersonRequest(reference="stranger", national_id=STRANGER_ID, birth_date=born),
        nocr_pb.VerifyPersonRequest(reference="no-birth-date", national_id=person.national_id),
        nocr_pb.VerifyPersonRequest(
            reference="wrong-name",
            national_id=person.national_id,
            birth_date=born,
            first_name=person.first_name + "x",
        ),
        nocr_pb.VerifyPersonRequest(
            reference="deceased",
            national_id=DECEASED.national_id,
            birth_date=date(DECEASED.birth_date),
        ),
        nocr_pb.VerifyPersonRequest(
            reference="names-in-any-case",
            national_id=person.national_id,
            birth_date=born,
            first_name=f"  {person.first_name.upper()} ",
            last_name=person.last_name.lower(),
        ),
    ]
    results = [result async for result in registry.VerifyPeople(iter(queries))]
    assert [(result.reference, result.verdict) for result in results] == [
        ("match", nocr_pb.VERDICT_MATCH),
        ("bad-id", nocr_pb.VERDICT_INVALID_NATIONAL_ID),
        ("stranger", nocr_pb.VERDICT_NOT_FOUND),
        ("no-birth-date", nocr_pb.VERDICT_NOT_FOUND),
        ("wrong-name", nocr_pb.VERDICT_MISMATCH),
        ("deceased", nocr_pb.VERDICT_DECEASED),
        ("names-in-any-case", nocr_pb.VERDICT_MATCH),
    ]
    assert "check digit" in results[1].reason
    # The mismatch names the field, never what the record holds.
    assert results[4].reason == "first_name does not match the record"


async def test_verify_people_answers_each_query_before_the_stream_ends(
    registry: nocr_grpc.PersonRegistryStub, person: Person
) -> None:
    call = registry.VerifyPeople()
    for reference in ("first", "second"):
        await call.write(
            nocr_pb.VerifyPersonRequest(
                reference=reference,
                national_id=person.national_id,
                birth_date=date(person.birth_date),
            )
        )
        # Bounded, so a registry that waits for the end of the stream fails here, not hangs.
        result = await asyncio.wait_for(call.read(), timeout=5)
        assert (result.reference, result.verdict) == (reference, nocr_pb.VERDICT_MATCH)
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


# National Post AddressDirectory


async def test_lookup_postal_code_returns_the_same_address_as_the_listing(
    directory: post_grpc.AddressDirectoryStub,
) -> None:
    listed = [
        address
        async for address in directory.ListAddresses(
            post_pb.ListAddressesRequest(
                region=post_pb.Region(province="Fars", city="Shiraz"), max_results=3
            )
        )
    ]
    for address in listed:
        found = await directory.LookupPostalCode(
            post_pb.LookupPostalCodeRequest(postal_code=address.postal_code)
        )
        assert found == address
        assert (found.province, found.city) == ("Fars", "Shiraz")
        assert found.street and found.building_number and found.district


async def test_lookup_postal_code_finds_every_sample_postal_code(
    directory: post_grpc.AddressDirectoryStub,
) -> None:
    rng = Random(3)
    for _ in range(20):
        postal_code = sample_postal_code(rng)
        address = await directory.LookupPostalCode(
            post_pb.LookupPostalCodeRequest(postal_code=postal_code)
        )
        assert address.postal_code == postal_code


@pytest.mark.parametrize(
    ("postal_code", "reason"),
    [
        ("13156", "postal code '13156' must be 10 digits, got 5"),
        ("0315600001", "postal code 0315600001 is not valid: postal codes do not start with 0"),
        ("13156 0001", "postal code '13156 0001' must contain only ASCII digits 0-9, found ' '"),
    ],
)
async def test_lookup_postal_code_rejects_a_malformed_postal_code(
    directory: post_grpc.AddressDirectoryStub, postal_code: str, reason: str
) -> None:
    error = await rpc_error(
        directory.LookupPostalCode(post_pb.LookupPostalCodeRequest(postal_code=postal_code))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == reason


@pytest.mark.parametrize(
    "postal_code",
    [
        "9999999999",  # no city has this prefix
        "1315600000",  # Tehran, but serials start at 1
        "1315699999",  # Tehran, beyond its addresses
    ],
)
async def test_lookup_postal_code_of_no_address_is_not_found(
    directory: post_grpc.AddressDirectoryStub, postal_code: str
) -> None:
    error = await rpc_error(
        directory.LookupPostalCode(post_pb.LookupPostalCodeRequest(postal_code=postal_code))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == f"no address has postal code {postal_code}"


async def test_list_addresses_streams_every_address_of_a_province_in_postal_code_order(
    directory: post_grpc.AddressDirectoryStub,
) -> None:
    addresses = [
        address
        async for address in directory.ListAddresses(
            post_pb.ListAddressesRequest(region=post_pb.Region(province="isfahan"))
        )
    ]
    # Isfahan (1200 addresses) and Kashan (400).
    assert len(addresses) == 1600
    assert {address.city for address in addresses} == {"Isfahan", "Kashan"}
    assert {address.province for address in addresses} == {"Isfahan"}
    postal_codes = [address.postal_code for address in addresses]
    assert postal_codes == sorted(set(postal_codes))


async def test_list_addresses_streams_thousands_of_a_city_and_honours_max_results(
    directory: post_grpc.AddressDirectoryStub,
) -> None:
    tehran = post_pb.Region(province="Tehran", city="Tehran")
    everything = directory.ListAddresses(post_pb.ListAddressesRequest(region=tehran))
    assert len([address async for address in everything]) == 3000
    first = directory.ListAddresses(post_pb.ListAddressesRequest(region=tehran, max_results=25))
    assert len([address async for address in first]) == 25


@pytest.mark.parametrize(
    ("region", "code", "reason"),
    [
        (post_pb.Region(), grpc.StatusCode.INVALID_ARGUMENT, "region.province is required"),
        (
            post_pb.Region(province="Atlantis"),
            grpc.StatusCode.NOT_FOUND,
            "the directory has no province named 'Atlantis'",
        ),
        (
            post_pb.Region(province="Fars", city="Tabriz"),
            grpc.StatusCode.NOT_FOUND,
            "the directory has no city named 'Tabriz' in province 'Fars'",
        ),
    ],
)
async def test_list_addresses_names_the_region_it_cannot_list(
    directory: post_grpc.AddressDirectoryStub,
    region: post_pb.Region,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    call = directory.ListAddresses(post_pb.ListAddressesRequest(region=region))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == code
    assert caught.value.details() == reason


# CRA MobileOwnership


# {} is the number without its leading 0, as in 9121234567.
@pytest.mark.parametrize("written", ["0{}", "{}", "98{}", "0098{}", "+98{}"])
async def test_match_mobile_matches_the_owner_in_every_accepted_form(
    ownership: cra_grpc.MobileOwnershipStub, person: Person, written: str
) -> None:
    mobile = written.format(person.mobile[1:])
    response = await ownership.MatchMobile(
        cra_pb.MatchMobileRequest(national_id=person.national_id, mobile=mobile)
    )
    assert response.result == cra_pb.MATCH_RESULT_MATCH


async def test_match_mobile_does_not_match_someone_elses_line_or_an_unknown_one(
    ownership: cra_grpc.MobileOwnershipStub, person: Person
) -> None:
    someone_else = next(other for other in population.PEOPLE if other != person)
    for national_id, mobile in [
        (person.national_id, someone_else.mobile),
        (STRANGER_ID, person.mobile),
        (person.national_id, "09000000000"),
    ]:
        response = await ownership.MatchMobile(
            cra_pb.MatchMobileRequest(national_id=national_id, mobile=mobile)
        )
        assert response.result == cra_pb.MATCH_RESULT_NO_MATCH


@pytest.mark.parametrize(
    ("national_id", "mobile", "reason"),
    [
        ("0012345678", "09121234567", "fails its check digit"),
        ("0012345679", "02188776655", "expected 11 digits starting with 09"),
        ("0012345679", "+19121234567", "the country code must be +98"),
    ],
)
async def test_match_mobile_rejects_a_malformed_national_id_or_mobile(
    ownership: cra_grpc.MobileOwnershipStub, national_id: str, mobile: str, reason: str
) -> None:
    error = await rpc_error(
        ownership.MatchMobile(cra_pb.MatchMobileRequest(national_id=national_id, mobile=mobile))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (error.details() or "")


async def test_a_sample_person_is_known_to_the_registry_and_owns_their_mobile(
    registry: nocr_grpc.PersonRegistryStub, ownership: cra_grpc.MobileOwnershipStub
) -> None:
    rng = Random(11)
    for _ in range(10):
        someone = sample_person(rng)
        record = await registry.InquirePerson(
            nocr_pb.InquirePersonRequest(
                national_id=someone.national_id, birth_date=date(someone.birth_date)
            )
        )
        response = await ownership.MatchMobile(
            cra_pb.MatchMobileRequest(national_id=record.national_id, mobile=someone.mobile)
        )
        assert record.life_status == nocr_pb.LIFE_STATUS_ALIVE
        assert response.result == cra_pb.MATCH_RESULT_MATCH


# INTA InvoiceRegistry


async def test_submit_invoices_sums_the_accepted_and_explains_each_rejection(
    invoices: tax_grpc.InvoiceRegistryStub,
) -> None:
    rng = Random(5)
    good = [sample_invoice(rng) for _ in range(3)]
    bad_total = sample_invoice(rng)
    bad_total.total_rials += 1
    stranger_seller = sample_invoice(rng)
    stranger_seller.seller_national_id = STRANGER_ID
    bad_buyer = sample_invoice(rng)
    bad_buyer.buyer_national_id = "0012345678"
    no_items = sample_invoice(rng)
    del no_items.line_items[:]
    no_items.total_rials = 0
    repeated = tax_pb.Invoice()
    repeated.CopyFrom(good[0])
    submitted = [
        good[0],
        bad_total,
        good[1],
        stranger_seller,
        bad_buyer,
        no_items,
        good[2],
        repeated,
    ]

    receipt = await invoices.SubmitInvoices(iter(submitted))

    assert receipt.receipt_id
    assert (receipt.accepted_count, receipt.rejected_count) == (3, 5)
    assert receipt.accepted_total_rials == sum(invoice.total_rials for invoice in good)
    assert receipt.accepted_vat_rials == sum(
        item.vat_rials for invoice in good for item in invoice.line_items
    )
    assert receipt.accepted_vat_rials > 0
    assert [(rejection.index, rejection.invoice_number) for rejection in receipt.rejections] == [
        (1, bad_total.invoice_number),
        (3, stranger_seller.invoice_number),
        (4, bad_buyer.invoice_number),
        (5, no_items.invoice_number),
        (7, repeated.invoice_number),
    ]
    reasons = [rejection.reason for rejection in receipt.rejections]
    assert reasons[0] == (
        f"total_rials is {bad_total.total_rials} but the line items add up to"
        f" {bad_total.total_rials - 1}"
    )
    assert reasons[1] == f"seller_national_id {STRANGER_ID} is not a registered taxpayer"
    assert reasons[2].startswith("buyer_national_id: national id 0012345678 fails its check digit")
    assert reasons[3].startswith("line_items is empty")
    assert "already sent by seller" in reasons[4]


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        ({"invoice_number": ""}, "invoice_number is empty"),
        ({"issue_date": Date(year=1403, month=13, day=1)}, "issue_date 1403/13/01: month 13"),
        ({"issue_date": Date(year=1403, month=7, day=31)}, "issue_date 1403/07/31: day 31"),
    ],
)
async def test_submit_invoices_rejects_an_invoice_with_a_bad_field(
    invoices: tax_grpc.InvoiceRegistryStub, spoil: dict[str, object], reason: str
) -> None:
    invoice = sample_invoice(Random(9))
    for field, value in spoil.items():
        if isinstance(value, Date):
            getattr(invoice, field).CopyFrom(value)
        else:
            setattr(invoice, field, value)
    receipt = await invoices.SubmitInvoices(iter([invoice]))
    assert (receipt.accepted_count, receipt.rejected_count) == (0, 1)
    assert receipt.rejections[0].reason.startswith(reason)


async def test_submit_invoices_rejects_a_line_item_with_no_quantity(
    invoices: tax_grpc.InvoiceRegistryStub,
) -> None:
    invoice = sample_invoice(Random(9))
    invoice.line_items[0].quantity = 0
    receipt = await invoices.SubmitInvoices(iter([invoice]))
    assert receipt.rejections[0].reason == "line_items[0].quantity is 0; it must be at least 1"


async def test_an_empty_submission_gets_an_empty_receipt(
    invoices: tax_grpc.InvoiceRegistryStub,
) -> None:
    receipt = await invoices.SubmitInvoices(iter([]))
    assert receipt.receipt_id
    assert (receipt.accepted_count, receipt.rejected_count) == (0, 0)
    assert (receipt.accepted_total_rials, receipt.accepted_vat_rials) == (0, 0)
    assert not receipt.rejections
