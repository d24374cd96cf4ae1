"""Demo NOCR: the PersonRegistry service over the shared synthetic population."""

from collections.abc import AsyncIterator

import grpc

from tabadol.agencies.nocr.v1 import person_registry_pb2 as pb
from tabadol.agencies.nocr.v1 import person_registry_pb2_grpc as pb_grpc
from tabadol.demo_agencies import population
from tabadol.demo_agencies.population import Gender, Person
from tabadol.demo_agencies.solar_hijri import SolarDate
from tabadol.identifiers import national_id_problem
from tabadol.type.v1 import date_pb2

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PersonRegistry"].full_name


def find_registered(national_id: str, birth_date: SolarDate) -> Person | None:
    """The person with this national id, provided they were born on this date."""
    person = population.find_person(national_id)
    if person is None or person.birth_date != birth_date:
        return None
    return person


def verify(query: pb.VerifyPersonRequest) -> pb.VerifyPersonResult:
    """The result of one VerifyPeople query, echoing its reference."""
    verdict, reason = _verdict(query)
    return pb.VerifyPersonResult(reference=query.reference, verdict=verdict, reason=reason)


def person_message(person: Person) -> pb.Person:
    """The contract's Person record for someone in the population."""
    message = pb.Person(
        national_id=person.national_id,
        first_name=person.first_name,
        last_name=person.last_name,
        father_name=person.father_name,
        birth_date=_date_message(person.birth_date),
        gender=pb.GENDER_FEMALE if person.gender is Gender.FEMALE else pb.GENDER_MALE,
        birth_place=person.birth_place,
        issue_place=person.issue_place,
        life_status=pb.LIFE_STATUS_ALIVE,
    )
    if person.death_date is not None:
        message.life_status = pb.LIFE_STATUS_DECEASED
        message.death_date.CopyFrom(_date_message(person.death_date))
    return message


class PersonRegistry(pb_grpc.PersonRegistryServicer):
    """The NOCR person registry, serving the synthetic population."""

    async def InquirePerson(
        self,
        request: pb.InquirePersonRequest,
        context: grpc.aio.ServicerContext[pb.InquirePersonRequest, pb.Person],
    ) -> pb.Person:
        problem = national_id_problem(request.national_id)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if not request.HasField("birth_date"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "birth_date is required")
        birth_date = _solar_date(request.birth_date)
        person = find_registered(request.national_id, birth_date)
        if person is None:
            # The same answer for an unknown id and a wrong birth date, so ids cannot be probed.
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no person with national id {request.national_id} born on {birth_date}",
            )
        return person_message(person)

    async def VerifyPeople(
        self,
        request_iterator: AsyncIterator[pb.VerifyPersonRequest],
        context: grpc.aio.ServicerContext[pb.VerifyPersonRequest, pb.VerifyPersonResult],
    ) -> AsyncIterator[pb.VerifyPersonResult]:
        async for query in request_iterator:
            yield verify(query)


def add_to_server(server: grpc.aio.Server) -> None:
    """Registers the demo PersonRegistry on a server that has not started yet."""
    # The generated registration function has no type hints.
    pb_grpc.add_PersonRegistryServicer_to_server(PersonRegistry(), server)


def _verdict(query: pb.VerifyPersonRequest) -> tuple[pb.Verdict, str]:
    # The checks run in the precedence order that the contract documents for Verdict.
    problem = national_id_problem(query.national_id)
    if problem is not None:
        return pb.VERDICT_INVALID_NATIONAL_ID, problem
    if not query.HasField("birth_date"):
        return pb.VERDICT_NOT_FOUND, "birth_date is missing, so no record can match"
    birth_date = _solar_date(query.birth_date)
    person = find_registered(query.national_id, birth_date)
    if person is None:
        return (
            pb.VERDICT_NOT_FOUND,
            f"no person with national id {query.national_id} born on {birth_date}",
        )
    # Say which name differs, never what the record holds.
    for field, given, recorded in (
        ("first_name", query.first_name, person.first_name),
        ("last_name", query.last_name, person.last_name),
    ):
        if given and given.strip().casefold() != recorded.casefold():
            return pb.VERDICT_MISMATCH, f"{field} does not match the record"
    if not person.alive:
        return pb.VERDICT_DECEASED, "the person is recorded as deceased"
    return pb.VERDICT_MATCH, "matches the record of a living person"


def _solar_date(message: date_pb2.Date) -> SolarDate:
    return SolarDate(message.year, message.month, message.day)


def _date_message(date: SolarDate) -> date_pb2.Date:
    return date_pb2.Date(year=date.year, month=date.month, day=date.day)
