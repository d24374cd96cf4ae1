"""A small synthetic population that the demo registry, operators and tax office all share.

A person drawn from here is on record at the NOCR, owns their mobile line at the CRA and is a
registered taxpayer, so one demo identity passes every agency's checks.
"""

import enum
import random
from dataclasses import dataclass

from tabadol.demo_agencies.geography import CITIES
from tabadol.demo_agencies.solar_hijri import SolarDate, month_length
from tabadol.identifiers import make_national_id

SIZE = 400
_SEED = "tabadol-demo-population"
_DECEASED_SHARE = 0.06
_THIS_YEAR = 1404

_FEMALE_NAMES = (
    "Zahra", "Fatemeh", "Maryam", "Sara", "Narges", "Leila", "Mahsa", "Nazanin",
    "Shirin", "Parisa", "Niloufar", "Elham", "Roya", "Mina", "Somayeh", "Azadeh",
)  # fmt: skip
_MALE_NAMES = (
    "Mohammad", "Ali", "Hossein", "Reza", "Mehdi", "Amir", "Hamid", "Saeed",
    "Majid", "Omid", "Behnam", "Dariush", "Kourosh", "Arash", "Babak", "Javad",
)  # fmt: skip
_LAST_NAMES = (
    "Ahmadi", "Hosseini", "Mohammadi", "Rezaei", "Moradi", "Karimi", "Jafari", "Rahimi",
    "Hashemi", "Kazemi", "Ebrahimi", "Sadeghi", "Ghasemi", "Tehrani", "Esfahani", "Shirazi",
    "Tabrizi", "Najafi", "Mousavi", "Safavi", "Bagheri", "Nikpour", "Farahani", "Zand",
)  # fmt: skip
_MOBILE_PREFIXES = ("0912", "0919", "0935", "0936", "0901", "0910", "0990", "0921")


class Gender(enum.Enum):
    FEMALE = "female"
    MALE = "male"


@dataclass(frozen=True)
class Person:
    """One person's record, as the registry holds it, with the mobile line they own."""

    national_id: str
    first_name: str
    last_name: str
    father_name: str
    gender: Gender
    birth_date: SolarDate
    birth_place: str
    issue_place: str
    mobile: str
    death_date: SolarDate | None = None

    @property
    def alive(self) -> bool:
        return self.death_date is None


def find_person(national_id: str) -> Person | None:
    """The person with this national id, if any."""
    return _BY_NATIONAL_ID.get(national_id)


def find_mobile_owner(mobile: str) -> Person | None:
    """The owner of a mobile line given in its 11-digit form (09121234567), if any."""
    return _BY_MOBILE.get(mobile)


def sample_person(rng: random.Random | None = None) -> Person:
    """A living person from the population, for demo traffic that should pass every check."""
    return (rng if rng is not None else random.Random()).choice(_LIVING)


def _generate(rng: random.Random, size: int) -> tuple[Person, ...]:
    people: list[Person] = []
    national_ids: set[str] = set()
    mobiles: set[str] = set()
    while len(people) < size:
        issue_city = rng.choice(CITIES)
        national_id = make_national_id(
            issue_city.national_id_prefix + f"{rng.randrange(10**6):06d}"
        )
        mobile = rng.choice(_MOBILE_PREFIXES) + f"{rng.randrange(10**7):07d}"
        if national_id in national_ids or mobile in mobiles:
            continue
        gender = rng.choice(list(Gender))
        birth_date = _random_date(rng, first_year=1320, last_year=1385)
        death_date = None
        if rng.random() < _DECEASED_SHARE:
            death_date = _random_date(rng, first_year=birth_date.year + 1, last_year=_THIS_YEAR)
        # Most people are registered where they were born.
        birth_place = issue_city.name if rng.random() < 0.8 else rng.choice(CITIES).name
        people.append(
            Person(
                national_id=national_id,
                first_name=rng.choice(_FEMALE_NAMES if gender is Gender.FEMALE else _MALE_NAMES),
                last_name=rng.choice(_LAST_NAMES),
                father_name=rng.choice(_MALE_NAMES),
                gender=gender,
                birth_date=birth_date,
                birth_place=birth_place,
                issue_place=issue_city.name,
                mobile=mobile,
                death_date=death_date,
            )
        )
        national_ids.add(national_id)
        mobiles.add(mobile)
    return tuple(people)


def _random_date(rng: random.Random, *, first_year: int, last_year: int) -> SolarDate:
    month = rng.randint(1, 12)
    # Esfand 30 exists only in leap years, so stay on days every year has.
    last_day = 29 if month == 12 else month_length(month)
    return SolarDate(rng.randint(first_year, last_year), month, rng.randint(1, last_day))


PEOPLE: tuple[Person, ...] = _generate(random.Random(_SEED), SIZE)
_BY_NATIONAL_ID = {person.national_id: person for person in PEOPLE}
_BY_MOBILE = {person.mobile: person for person in PEOPLE}
_LIVING = tuple(person for person in PEOPLE if person.alive)
