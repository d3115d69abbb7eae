"""Guards: PII patterns with their checksums, block lists, actions, chaining."""

from __future__ import annotations

import pytest

from llmprod.errors import GuardBlockedError, InvalidRequestError
from llmprod.ops.guards import (
    BlockListGuard,
    Guard,
    GuardResult,
    PIIGuard,
    apply_guards,
    iban_is_valid,
    luhn_is_valid,
)

VALID_CARDS = [
    "4111 1111 1111 1111",  # Visa test number, grouped by spaces
    "5500-0000-0000-0004",  # Mastercard test number, grouped by dashes
    "378282246310005",  # Amex test number (15 digits), ungrouped
    "6011111111111117",  # Discover test number
]
VALID_IBANS = [
    "GB82 WEST 1234 5698 7654 32",
    "DE89370400440532013000",
    "FR14 2004 1010 0505 0001 3M02 606",
    "NL91ABNA0417164300",
]
PHONES = [
    "+44 20 7946 0958",
    "+1 (555) 123-4567",
    "+33612345678",
    "(555) 123-4567",
    "555-123-4567",
    "555.123.4567",
    "020 7946 0958",
    "06 12 34 56 78",
    "030-12345678",
]
NOT_PHONES = [
    "In 1999 and 2024 the count was 12345.",
    "Released 2024-01-15, version 1.2.3.4.",
    "Call extension 4471.",
    "Pi is 3.14159265358979.",
    "Dates: 12/25/2024 and 01.02.2024.",
    "The invoice total was 1,000,000 dollars.",
    "Order 5551234567 shipped.",  # a bare run of digits: an id, not a phone
    "Host 192.168.100.200 answered.",
]


def kinds(text: str, **kw: object) -> dict[str, int]:
    result = PIIGuard(**kw).check(text, "prompt")  # type: ignore[arg-type]
    return result.flags.get("counts", {})


# ---------------------------------------------------------------------- PII
def test_email_found_and_redacted() -> None:
    g = PIIGuard(action="redact")
    r = g.check("Write to jane.doe+news@mail.example.co.uk, not to bob@x.", "prompt")
    assert r.text == "Write to [EMAIL], not to bob@x."
    assert r.flags == {"action": "redact", "counts": {"email": 1}}
    assert not r.blocked


@pytest.mark.parametrize("phone", PHONES)
def test_phone_formats_are_found(phone: str) -> None:
    assert kinds(f"Call me at {phone} tomorrow.") == {"phone": 1}
    redacted = PIIGuard(action="redact").check(f"Call me at {phone}.", "prompt").text
    assert redacted == "Call me at [PHONE]."


@pytest.mark.parametrize("text", NOT_PHONES)
def test_years_dates_and_short_numbers_are_not_phones(text: str) -> None:
    assert kinds(text) == {}


@pytest.mark.parametrize("card", VALID_CARDS)
def test_luhn_valid_cards_are_found(card: str) -> None:
    assert kinds(f"My card is {card}, expiring soon.") == {"card": 1}
    assert luhn_is_valid(card.replace(" ", "").replace("-", ""))


@pytest.mark.parametrize(
    "number",
    [
        "4111 1111 1111 1112",  # last digit changed: Luhn fails
        "5500-0000-0000-0005",
        "0000 0000 0000 0000",  # passes Luhn but is no number anyone holds
        "4111 1111 1111 1111 1111 1111",  # 24 digits: too long to be a card
    ],
)
def test_luhn_invalid_or_implausible_cards_are_ignored(number: str) -> None:
    assert "card" not in kinds(f"Reference {number}.")


@pytest.mark.parametrize("iban", VALID_IBANS)
def test_mod97_valid_ibans_are_found(iban: str) -> None:
    assert kinds(f"Pay to {iban} please.") == {"iban": 1}
    assert iban_is_valid(iban)
    r = PIIGuard(action="redact").check(f"Pay to {iban} please.", "prompt")
    assert r.text == "Pay to [IBAN] please."


@pytest.mark.parametrize(
    "iban",
    [
        "GB82 WEST 1234 5698 7654 33",  # one digit changed: mod 97 != 1
        "DE89370400440532013001",
        "GB82WEST12",  # too short
    ],
)
def test_mod97_invalid_ibans_are_ignored(iban: str) -> None:
    assert "iban" not in kinds(f"Pay to {iban} please.")
    assert not iban_is_valid(iban)


def test_iban_followed_by_a_capitalised_word() -> None:
    g = PIIGuard(action="redact")
    text = "IBAN DE89 3704 0044 0532 0130 00 THANKS"
    assert g.check(text, "output").text == "IBAN [IBAN] THANKS"


def test_every_kind_in_one_text_redacted_in_place() -> None:
    text = (
        "Mail a.b@example.org, call +49 30 1234567, card 4111-1111-1111-1111, "
        "IBAN GB82WEST12345698765432. Founded 1999."
    )
    r = PIIGuard(action="redact").check(text, "output")
    assert r.text == (
        "Mail [EMAIL], call [PHONE], card [CARD], IBAN [IBAN]. Founded 1999."
    )
    assert r.flags["counts"] == {"email": 1, "phone": 1, "card": 1, "iban": 1}


def test_kinds_limit_what_is_looked_for() -> None:
    assert kinds("a@b.io and 4111 1111 1111 1111", kinds=("card",)) == {"card": 1}
    with pytest.raises(ValueError, match="kinds"):
        PIIGuard(kinds=("ssn",))


def test_flag_keeps_the_text() -> None:
    text = "reach me at a@b.io"
    r = PIIGuard(action="flag").check(text, "prompt")
    assert r.text == text and r.flags["counts"] == {"email": 1} and not r.blocked


def test_where_restricts_a_guard() -> None:
    g = PIIGuard(action="redact", where=("output",))
    assert g.check("a@b.io", "prompt") == GuardResult("a@b.io")
    assert g.check("a@b.io", "output").text == "[EMAIL]"
    with pytest.raises(ValueError, match="where"):
        g.check("x", "input")


def test_bad_action_raises() -> None:
    with pytest.raises(ValueError, match="action"):
        PIIGuard(action="drop")


# ---------------------------------------------------------------------- block list
def test_block_list_matches_whole_words_only() -> None:
    g = BlockListGuard(["secret", "top secret", "c++"], action="redact")
    r = g.check("Top Secret: the secretary knows C++ and secrets.", "prompt")
    assert r.text == "[BLOCKED]: the secretary knows [BLOCKED] and secrets."
    assert r.flags == {"action": "redact", "counts": {"block_list": 2}}


def test_block_list_case_sensitive() -> None:
    g = BlockListGuard(["Acme"], action="flag", case_sensitive=True)
    assert g.check("acme corp", "prompt").flags == {}
    assert g.check("Acme corp", "prompt").flags["counts"] == {"block_list": 1}


def test_block_list_needs_words() -> None:
    with pytest.raises(ValueError, match="words"):
        BlockListGuard([])
    with pytest.raises(ValueError, match="words"):
        BlockListGuard(["ok", " "])


# ---------------------------------------------------------------------- chains
def test_block_raises_without_the_matched_text() -> None:
    card = "4111 1111 1111 1111"
    with pytest.raises(GuardBlockedError) as info:
        apply_guards([PIIGuard(action="block")], f"charge {card} now", "prompt")
    err = info.value
    assert isinstance(err, InvalidRequestError) and isinstance(err, ValueError)
    assert err.guard == "pii" and err.field == "prompt"
    assert err.findings == {"action": "block", "counts": {"card": 1}}
    assert card not in str(err) and "4111" not in str(err) and "card x1" in str(err)


def test_block_list_block_on_output_names_output() -> None:
    with pytest.raises(GuardBlockedError) as info:
        apply_guards([BlockListGuard(["forbidden"])], "a Forbidden word", "output")
    assert info.value.field == "output" and "forbidden" not in str(info.value).lower()


def test_chain_passes_redacted_text_on_and_collects_flags() -> None:
    guards: list[Guard] = [
        PIIGuard(action="redact"),
        BlockListGuard(["password"], action="redact"),
    ]
    r = apply_guards(guards, "password for a@b.io", "prompt")
    assert r.text == "[BLOCKED] for [EMAIL]"
    assert r.flags == {
        "pii": {"action": "redact", "counts": {"email": 1}},
        "block_list": {"action": "redact", "counts": {"block_list": 1}},
    }
    assert apply_guards(guards, "nothing here", "prompt") == GuardResult("nothing here")
    assert apply_guards([], "x", "output") == GuardResult("x")


def test_repeated_names_do_not_overwrite_flags() -> None:
    guards = [
        BlockListGuard(["a"], action="flag"),
        BlockListGuard(["b"], action="flag"),
    ]
    flags = apply_guards(guards, "a b", "prompt").flags
    assert set(flags) == {"block_list", "block_list#2"}


class _Shouting:
    """A third-party guard: only the protocol, no base class."""

    name = "shouting"

    def check(self, text: str, where: str) -> GuardResult:
        loud = text.isupper()
        return GuardResult(text, {"loud": True} if loud else {}, blocked=loud)


def test_any_object_with_the_protocol_is_a_guard() -> None:
    guard = _Shouting()
    assert isinstance(guard, Guard)
    assert apply_guards([guard], "calm", "prompt").flags == {}
    with pytest.raises(GuardBlockedError, match="shouting") as info:
        apply_guards([guard], "LOUD", "prompt")
    assert info.value.findings == {"loud": True}
