"""Secret and personal-data detection through the real detect-secrets and presidio-analyzer (no mocks)."""

from __future__ import annotations

import socket
import sys

import pytest
from ctxflow.processors.memory.detectors import ContentDetectors, PiiDetector, SecretDetector
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=12), st.sampled_from([" ", ", ", " - "]))
def test_phone_search_by_window_finds_what_presidio_finds_on_the_whole_text(pieces: list[str], sep: str) -> None:
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    text = sep.join(pieces)
    whole = {(r.start, r.end) for r in PhoneRecognizer().analyze(text, ["PHONE_NUMBER"]) if r.score >= 0.3}
    ours = {(f.start, f.end) for f in _PII.scan(text) if f.kind == "PHONE_NUMBER"}
    assert ours == whole, text


_PII = PiiDetector()
