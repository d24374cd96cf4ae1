"""Validation of Iranian identifiers: national ids (code melli), postal codes, mobile numbers."""

_DIGITS = frozenset("0123456789")

# Long enough to show what was sent, short enough that an error message stays far below the
# size limit of gRPC trailing metadata, where a status message travels.
_QUOTE_LIMIT = 24


def national_id_problem(value: str) -> str | None:
    """Why `value` is not a valid national id, or None when it is one."""
    problem = _digits_problem("national id", value, length=10)
    if problem is not None:
        return problem
    if len(set(value)) == 1:
        return f"national id {value} is not valid: all its digits are identical"
    expected = national_id_check_digit(value[:9])
    if int(value[9]) != expected:
        return f"national id {value} fails its check digit: expected {expected}, got {value[9]}"
    return None


def national_id_check_digit(first9: str) -> int:
    """The check digit (10th digit) of the national id that starts with these nine digits."""
    problem = _digits_problem("the first nine digits of a national id", first9, length=9)
    if problem is not None:
        raise ValueError(problem)
    remainder = sum(int(digit) * (10 - position) for position, digit in enumerate(first9)) % 11
    return remainder if remainder < 2 else 11 - remainder


def make_national_id(first9: str) -> str:
    """The valid national id that starts with these nine digits; ValueError if there is none."""
    national_id = first9 + str(national_id_check_digit(first9))
    problem = national_id_problem(national_id)
    if problem is not None:
        raise ValueError(f"no valid national id starts with {first9}: {problem}")
    return national_id


def postal_code_problem(value: str) -> str | None:
    """Why `value` is not a valid postal code, or None when it is one."""
    problem = _digits_problem("postal code", value, length=10)
    if problem is not None:
        return problem
    if value[0] == "0":
        return f"postal code {value} is not valid: postal codes do not start with 0"
    return None


def normalize_mobile(value: str) -> str:
    """An Iranian mobile number in its 11-digit form (09121234567); ValueError if it is not one.

    Accepts 09121234567, 9121234567, 989121234567, 00989121234567 and +989121234567.
    """
    digits = value.removeprefix("+")
    if not digits or not _DIGITS.issuperset(digits):
        raise ValueError(
            f"mobile number {_quote(value)} must be ASCII digits 0-9, with an optional leading +"
        )
    if value.startswith("+"):
        if not digits.startswith("98"):
            raise ValueError(
                f"mobile number {_quote(value)} is not Iranian: the country code must be +98"
            )
        national = digits[2:]
    elif len(digits) == 14 and digits.startswith("0098"):
        national = digits[4:]
    elif len(digits) == 12 and digits.startswith("98"):
        national = digits[2:]
    elif len(digits) == 11 and digits.startswith("0"):
        national = digits[1:]
    else:
        national = digits
    if len(national) != 10 or not national.startswith("9"):
        raise ValueError(
            f"mobile number {_quote(value)} is not an Iranian mobile number: expected 11 digits"
            " starting with 09, such as 09121234567"
        )
    return "0" + national


def _digits_problem(what: str, value: str, *, length: int) -> str | None:
    # Checked against ASCII explicitly: str.isdigit() and int() also accept Persian and
    # Arabic-Indic digits, which would then compare unequal to the ASCII ids on record.
    if not value:
        return f"{what} is empty: expected {length} digits"
    stray = next((character for character in value if character not in _DIGITS), None)
    if stray is not None:
        return f"{what} {_quote(value)} must contain only ASCII digits 0-9, found {stray!r}"
    if len(value) != length:
        return f"{what} {_quote(value)} must be {length} digits, got {len(value)}"
    return None


def _quote(value: str) -> str:
    if len(value) <= _QUOTE_LIMIT:
        return repr(value)
    return f"{value[:_QUOTE_LIMIT]!r}... ({len(value)} characters)"
