"""Secret and personal-data detection through the real detect-secrets and presidio-analyzer (no mocks)."""

from __future__ import annotations

import socket
import sys

import phonenumbers
import pytest
from ctxflow.processors.memory.detectors import (
    PII_SCORE_THRESHOLD,
    ContentDetectors,
    PiiDetector,
    SecretDetector,
    _OfflineEmailRecognizer,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberFormat, PhoneNumberType
from presidio_analyzer import EntityRecognizer
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    IbanRecognizer,
    PhoneRecognizer,
    UsSsnRecognizer,
)

# Test credentials shaped like real ones (right prefix, length and alphabet); none is a live credential.
SECRETS = {
    "aws access key": "Use key AKIAZ3MSJV4WWNKWW5FG for the deploy bucket",
    "github token": "the bot authenticates with 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",
    "private key block": "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7bq\n-----END RSA PRIVATE KEY-----",
    "password assignment": "staging db: password = 'Tr0ub4dor&3-horse'",
    "password in yaml": 'db_password: "s3cr3t-Pa55word-x9"',
}

ORDINARY = [
    "Order 12345 shipped to warehouse 7 on 2026-01-05; run r-42 took 3.5 seconds, ticket JIRA-1234.",
    "Memory 3f2b8c1e-9a4d-4e2b-8f1a-2c3d4e5f6a7b belongs to user u-100 in session s-2026-01.",
    "Content digest 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 matched.",
    "The user prefers dark mode, answers in French, timezone UTC+2, budget $1,200 per month.",
    "Release v2.14.3 fixed bug #4471; 98.6% of 20,000 requests finished under 250 ms.",
    "Prefers the password manager's autofill; never asks for the token count.",
]


@pytest.fixture(scope="module")
def detectors() -> ContentDetectors:
    return ContentDetectors()


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_real_secret_shapes_are_caught(detectors: ContentDetectors, name: str) -> None:
    scan = detectors.scan(SECRETS[name])
    assert scan.secrets, name
    # A finding names the kind and line, never the value: nothing built from it can leak the secret.
    for finding in scan.secrets:
        assert "AKIA" not in repr(finding) and "ghp_" not in repr(finding) and "Tr0ub" not in repr(finding)


def test_each_secret_is_named_by_its_plugin(detectors: ContentDetectors) -> None:
    assert "AWS Access Key" in detectors.scan(SECRETS["aws access key"]).secret_kinds
    assert "GitHub Token" in detectors.scan(SECRETS["github token"]).secret_kinds
    assert "Private Key" in detectors.scan(SECRETS["private key block"]).secret_kinds
    assert "Secret Keyword" in detectors.scan(SECRETS["password assignment"]).secret_kinds


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_with_numbers_and_ids_is_neither_secret_nor_pii(
    detectors: ContentDetectors, text: str
) -> None:
    scan = detectors.scan(text)
    assert scan.secrets == ()
    assert scan.pii == ()


@settings(max_examples=60, deadline=None)
@given(
    order=st.integers(0, 10**9),
    user=st.integers(0, 10**6),
    days=st.integers(0, 400),
    word=st.sampled_from(["JIRA", "ops", "billing", "run", "INC"]),
    amount=st.decimals(min_value=0, max_value=10**6, places=2),
)
def test_templated_business_text_is_never_a_secret(
    detectors: ContentDetectors, order: int, user: int, days: int, word: str, amount: object
) -> None:
    text = f"order {order} for user u-{user} shipped in {days} days, ticket {word}-{order}, total ${amount}"
    assert detectors.scan(text).secrets == ()


def test_email_phone_and_card_are_flagged_as_pii(detectors: ContentDetectors) -> None:
    scan = detectors.scan("Reach Jane at jane.doe@example.com or +1 212-555-0147; card 4111 1111 1111 1111.")
    assert scan.secrets == ()
    assert scan.pii_kinds == ("CREDIT_CARD", "EMAIL_ADDRESS", "PHONE_NUMBER")


def test_iban_and_ssn_are_flagged_as_pii(detectors: ContentDetectors) -> None:
    scan = detectors.scan("Refund to IBAN DE89 3704 0044 0532 0130 00, SSN 536-22-8726.")
    assert {"IBAN_CODE", "US_SSN"} <= set(scan.pii_kinds)


def test_a_secret_short_circuits_pii_detection(detectors: ContentDetectors) -> None:
    scan = detectors.scan("jane.doe@example.com uses 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")
    assert scan.secrets and scan.pii == ()


def test_phone_prefilter_does_not_hide_numbers(detectors: ContentDetectors) -> None:
    # National formats of several default regions, with no context word: the matcher must still run.
    for text in ("ring 020 7946 0958 after lunch", "mobile (212) 555-0147", "Büro 030 901820"):
        assert "PHONE_NUMBER" in detectors.scan(text).pii_kinds, text


def test_detectors_load_no_language_model_and_use_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import spacy

    def refuse_model(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"spaCy model load attempted: {args}")

    def refuse_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(spacy, "load", refuse_model)
    monkeypatch.setattr(socket.socket, "connect", refuse_network)
    monkeypatch.setattr(socket, "create_connection", refuse_network)
    built = ContentDetectors(SecretDetector(), PiiDetector())
    scan = built.scan("Mail ops@example.org about order 7; phone +44 20 7946 0958.")
    assert scan.pii_kinds == ("EMAIL_ADDRESS", "PHONE_NUMBER")
    assert not [name for name in sys.modules if name.startswith(("en_core_web", "spacy_models"))]


PIECES = [
    "call", "Order", "on", "ticket", "r-42", "$1,200", "2026-01-05", "12/01/2026", "98.6%", "(", ")", ";",
    "212-555-0147", "+1 212-555-0147", "(212) 555-0147", "020 7946 0958", "+44 20 7946 0958", "030 901820",
    "+49 30 901820", "01 23 45 67 89", "+33 1 23 45 67 89", "4821", "12345", "98765 43210", "v2.14.3",
]

# Regions whose national-prefix rules write digits into the number (Argentina's 9, San Marino's 0549, Jersey's
# 1534...) or have unusual prefixes, on top of presidio's default eight: the pruning's bounds must hold there too.
ODD_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR", "AR", "SM", "JE", "MG", "AG", "JP", "IT", "AT")


def _real_numbers() -> list[str]:
    """libphonenumber's example numbers of the regions above, as people write them: international, national,
    E.164, RFC 3966 and dialled from abroad (IDD prefixes)."""
    formats = (PhoneNumberFormat.INTERNATIONAL, PhoneNumberFormat.NATIONAL, PhoneNumberFormat.E164,
               PhoneNumberFormat.RFC3966)
    out = []
    for region in ODD_REGIONS:
        for kind in (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE, PhoneNumberType.TOLL_FREE):
            number = phonenumbers.example_number_for_type(region, kind)
            if number is None:
                continue
            out += [phonenumbers.format_number(number, f) for f in formats]
            out += [phonenumbers.format_out_of_country_calling_number(number, r) for r in ("US", "BR", "IL")]
    return out


_DIGITS = "0123456789"
_FULL_WIDTH = {ord(ch): ord(ch) + 0xFEE0 for ch in _DIGITS + "+"}  # the same characters in full width
_SEPARATORS = st.sampled_from([" ", "-", ".", "/", "", " - ", "\u00a0", "\u2013", "  "])


@st.composite
def _phone_like(draw: st.DrawFn) -> str:
    """Digit groups that libphonenumber takes as candidates: separators, a +country code or an IDD, an area
    code in parentheses, an extension; sometimes in full-width characters."""
    body = draw(_SEPARATORS).join(draw(st.lists(st.text(_DIGITS, min_size=1, max_size=5), min_size=1, max_size=5)))
    if draw(st.booleans()):
        body = f"({draw(st.text(_DIGITS, min_size=1, max_size=4))}) {body}"
    lead = draw(st.sampled_from(["", "", "+", "+1 ", "+44 ", "+49 ", "+54 9 ", "+378 ", "00", "011 ", "0", "1 "]))
    text = lead + body + draw(st.sampled_from(["", "", " ext 12", " x123", " #45", ";ext=7"]))
    if draw(st.integers(0, 9)) == 0:
        text = text.translate(_FULL_WIDTH)
    return text


_BUSINESS = st.one_of(
    st.integers(0, 99_999).map(lambda n: f"OPS-{n}"),
    st.integers(0, 10**7).map(lambda n: f"${n:,}"),
    st.integers(0, 10**6).map(lambda n: f"{n / 100:.2f} EUR"),
    st.dates().map(str),
    st.dates().map(lambda d: d.strftime("%d/%m/%Y")),
    st.datetimes().map(lambda t: t.strftime("%Y-%m-%d %H:%M")),
    st.integers(0, 1000).map(lambda n: f"{n / 10}%"),
    st.sampled_from(["call", "Order", "ticket", "r-42", "v2.14.3", "211-227 (2003)", "abc", "tel:", "€", "(", ")",
                     ";", "x", "1-800-FLOWERS", "u-100", "#4471"]),
)

_TEXTS = st.builds(
    lambda pieces, sep: sep.join(pieces),
    st.lists(st.one_of(_phone_like(), st.sampled_from(_real_numbers()), _BUSINESS), min_size=1, max_size=8),
    st.sampled_from([" ", ", ", " - ", "", "\n", "; "]),
)


def _presidio_pii(text: str, regions: tuple[str, ...] | None = None) -> set[tuple[str, int, int, float]]:
    """Presidio's own recognizers as it ships them (the phone one unmodified), with our threshold and
    presidio's duplicate removal: the oracle the detector must equal."""
    phone = PhoneRecognizer(supported_regions=regions) if regions else PhoneRecognizer()
    results = phone.analyze(text, ["PHONE_NUMBER"])
    others = ["EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "US_SSN"]
    for recognizer in (_OFFLINE_EMAIL, CreditCardRecognizer(), IbanRecognizer(), UsSsnRecognizer()):
        results += recognizer.analyze(text, others, None)
    kept = EntityRecognizer.remove_duplicates([r for r in results if r.score >= PII_SCORE_THRESHOLD])
    return {(r.entity_type, r.start, r.end, r.score) for r in kept}


def _ours(detector: PiiDetector, text: str) -> set[tuple[str, int, int, float]]:
    return {(f.kind, f.start, f.end, f.score) for f in detector.scan(text)}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=12), st.sampled_from([" ", ", ", " - "]))
def test_pii_findings_equal_presidios_on_mixed_numbers(pieces: list[str], sep: str) -> None:
    text = sep.join(pieces)
    assert _ours(_PII, text) == _presidio_pii(text), text


@settings(max_examples=300, deadline=None)
@given(_TEXTS)
def test_pii_findings_equal_presidios_on_digit_heavy_text(text: str) -> None:
    assert _ours(_PII, text) == _presidio_pii(text), text


@settings(max_examples=120, deadline=None)
@given(_TEXTS)
def test_phone_findings_equal_presidios_in_regions_with_odd_national_prefixes(text: str) -> None:
    assert _ours(_PII_ODD, text) == _presidio_pii(text, ODD_REGIONS), text


@settings(max_examples=25, deadline=None)
@given(_TEXTS)
def test_phone_findings_equal_presidios_with_every_region_libphonenumber_knows(text: str) -> None:
    # The pruning's bounds come from each region's metadata: all of it is exercised, not only the defaults.
    assert _ours(_PII_ALL, text) == _presidio_pii(text, ALL_REGIONS), text


def test_phone_search_still_finds_real_numbers_of_every_format() -> None:
    # Not an empty agreement: the generated numbers are found, in presidio's regions and the odd ones.
    found = [text for text in _real_numbers() if "PHONE_NUMBER" in {k for k, *_ in _ours(_PII_ODD, text)}]
    assert len(found) > len(_real_numbers()) // 2


_PII = PiiDetector()
_PII_ODD = PiiDetector(phone_regions=ODD_REGIONS)
ALL_REGIONS = tuple(sorted(phonenumbers.SUPPORTED_REGIONS))
_PII_ALL = PiiDetector(phone_regions=ALL_REGIONS)
_OFFLINE_EMAIL = _OfflineEmailRecognizer()
