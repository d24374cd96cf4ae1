"""The cities the demo agencies cover, shared so that births, ids and addresses agree."""

from dataclasses import dataclass


@dataclass(frozen=True)
class City:
    """A city, with the codes its registry and post offices hand out."""

    province: str
    name: str
    # Every postal code in the city starts with these five digits.
    postal_prefix: str
    # Every national id issued in the city starts with these three digits (the issuing office).
    national_id_prefix: str
    latitude: float
    longitude: float
    districts: int
    # How many addresses the demo post directory holds for the city.
    addresses: int


# Coordinates are real city centres; prefixes and counts are illustrative, not official codes.
CITIES: tuple[City, ...] = (
    City("Tehran", "Tehran", "13156", "001", 35.6892, 51.3890, 22, 3000),
    City("Tehran", "Shahriar", "33516", "044", 35.6597, 51.0592, 3, 300),
    City("Isfahan", "Isfahan", "81746", "128", 32.6539, 51.6660, 15, 1200),
    City("Isfahan", "Kashan", "87159", "619", 33.9850, 51.4100, 4, 400),
    City("Fars", "Shiraz", "71936", "228", 29.5918, 52.5837, 11, 1000),
    City("East Azerbaijan", "Tabriz", "51368", "136", 38.0800, 46.2919, 10, 900),
    City("Razavi Khorasan", "Mashhad", "91775", "092", 36.2605, 59.6168, 13, 1500),
    City("Gilan", "Rasht", "41447", "265", 37.2808, 49.5832, 5, 500),
    City("Khuzestan", "Ahvaz", "61357", "175", 31.3183, 48.6706, 8, 600),
)
