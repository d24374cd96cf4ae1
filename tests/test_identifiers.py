"""Specification of Iranian identifier validation: national ids, postal codes, mobile numbers."""

import re

import pytest

from tabadol.identifiers import (
    make_national_id,
    national_id_check_digit,
    national_id_problem,
    normalize_mobile,
    postal_code_problem,
)

# Check digits computed by hand; they cover the three branches of the rule: a remainder of 0 or 1
# is the check digit itself, and any other remainder r gives 11 - r.
VALID_NATIONAL_IDS = [
    ("0012345679", 2),  # remainder 2 -> 9
    ("2282709446", 5),  # remainder 5 -> 6
    ("0921234562", 9),  # remainder 9 -> 2
    ("0000000019", 2),
    ("0000000108", 3),
    ("9876543210", 0),  # remainder 0 -> 0
    ("1234567891", 1),  # remainder 1 -> 1
    ("1000000001", 10),  # remainder 10 -> 1
]


@pytest.mark.parametrize(("national_id", "remainder"), VALID_NATIONAL_IDS)
def test_valid_national_ids_have_no_problem(national_id: str, remainder: int) -> None:
    assert national_id_problem(national_id) is None


@pytest.mark.parametrize(("national_id", "remainder"), VALID_NATIONAL_IDS)
def test_check_digit_is_the_last_digit_of_a_valid_id(national_id: str, remainder: int) -> None:
    assert national_id_check_digit(national_id[:9]) == int(national_id[9])
    assert make_national_id(national_id[:9]) == national_id


def test_a_wrong_check_digit_is_named_with_the_expected_and_given_digits() -> None:
    assert national_id_problem("0012345678") == (
        "national id 0012345678 fails its check digit: expected 9, got 8"
    )


@pytest.mark.parametrize("national_id", [f"228270944{digit}" for digit in "012345789"])
def test_every_other_last_digit_fails_the_check(national_id: str) -> None:
    problem = national_id_problem(national_id)
    assert problem is not None
    assert "check digit" in problem


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "national id is empty: expected 10 digits"),
        ("001234567", "national id '001234567' must be 10 digits, got 9"),
        ("00123456790", "national id '00123456790' must be 10 digits, got 11"),
        ("00123a5679", "national id '00123a5679' must contain only ASCII digits 0-9, found 'a'"),
        (" 0012345679", "national id ' 0012345679' must contain only ASCII digits 0-9, found ' '"),
        ("001-234567", "national id '001-234567' must contain only ASCII digits 0-9, found '-'"),
    ],
)
def test_malformed_national_ids_are_explained(value: str, reason: str) -> None:
    assert national_id_problem(value) == reason


def test_persian_digits_are_refused_rather_than_read_as_numbers() -> None:
    # "۰۰۱۲۳۴۵۶۷۹" is 0012345679 in Persian digits, which int() would happily accept.
    problem = national_id_problem("۰۰۱۲۳۴۵۶۷۹")
    assert problem is not None
    assert "ASCII digits" in problem


@pytest.mark.parametrize("digit", "0123456789")
def test_ids_of_one_repeated_digit_are_refused_even_when_the_check_digit_fits(digit: str) -> None:
    # 1111111111 and 2222222222, for instance, satisfy the check-digit arithmetic.
    assert national_id_problem(digit * 10) == (
        f"national id {digit * 10} is not valid: all its digits are identical"
    )


def test_a_very_long_value_is_shortened_in_the_explanation() -> None:
    problem = national_id_problem("9" * 10_000)
    assert problem is not None
    assert len(problem) < 120
    assert "(10000 characters)" in problem


@pytest.mark.parametrize("first9", ["", "12345678", "1234567890", "12345678x"])
def test_check_digit_needs_exactly_nine_digits(first9: str) -> None:
    with pytest.raises(ValueError, match="first nine digits"):
        national_id_check_digit(first9)


def test_make_national_id_refuses_digits_that_only_make_an_identical_digit_id() -> None:
    with pytest.raises(ValueError, match="no valid national id starts with 000000000"):
        make_national_id("000000000")


@pytest.mark.parametrize("postal_code", ["1315693564", "8174673111", "9999999999"])
def test_ten_digit_postal_codes_not_starting_with_zero_are_valid(postal_code: str) -> None:
    assert postal_code_problem(postal_code) is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "postal code is empty: expected 10 digits"),
        ("131569356", "postal code '131569356' must be 10 digits, got 9"),
        ("13156935641", "postal code '13156935641' must be 10 digits, got 11"),
        ("13156-9356", "postal code '13156-9356' must contain only ASCII digits 0-9, found '-'"),
        ("0315693564", "postal code 0315693564 is not valid: postal codes do not start with 0"),
    ],
)
def test_malformed_postal_codes_are_explained(value: str, reason: str) -> None:
    assert postal_code_problem(value) == reason


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("09121234567", "09121234567"),
        ("9121234567", "09121234567"),
        ("989121234567", "09121234567"),
        ("+989121234567", "09121234567"),
        ("00989121234567", "09121234567"),
        ("09981234567", "09981234567"),
        # A 10-digit number starting 98 is a national number, not a country code.
        ("9981234567", "09981234567"),
        ("989981234567", "09981234567"),
    ],
)
def test_mobile_numbers_are_normalized_to_eleven_digits(value: str, normalized: str) -> None:
    assert normalize_mobile(value) == normalized


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "must be ASCII digits"),
        ("+", "must be ASCII digits"),
        ("0912 123 4567", "must be ASCII digits"),
        ("0912-123-4567", "must be ASCII digits"),
        ("++989121234567", "must be ASCII digits"),
        ("+19121234567", "the country code must be +98"),
        ("02188776655", "expected 11 digits starting with 09"),
        ("0912123456", "expected 11 digits starting with 09"),
        ("091212345678", "expected 11 digits starting with 09"),
        ("+9809121234567", "expected 11 digits starting with 09"),
        ("8121234567", "expected 11 digits starting with 09"),
    ],
)
def test_malformed_mobile_numbers_are_explained(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        normalize_mobile(value)
