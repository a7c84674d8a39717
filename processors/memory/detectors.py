"""Secret and personal-data detection for memory candidates, through maintained libraries only.

* Secrets: every plugin detect-secrets ships with its default settings (AWS, GitHub, private keys, keyword
  assignments such as ``password = ...``, JWTs, Slack, Stripe, OpenAI...), run line by line on in-memory text
  through each plugin's ``analyze_string`` (the plugins' own API: no files, no verification calls over the
  network), then detect-secrets' heuristic filters drop what is an id, a UUID, a template or a sequence.
  High-entropy plugins run in their normal (non-eager) mode, which looks at quoted strings only: free text full
  of ids and numbers is not a secret, a quoted random string is treated as one (a false positive costs a
  rejected memory; a false negative persists a credential).
* Personal data: presidio-analyzer's *pattern* recognizers (email, phone, credit card, IBAN, US SSN) behind its
  ``NoOpNlpEngine``, so no spaCy model is loaded or downloaded. The email recognizer's domain check uses
  tldextract with its bundled suffix-list snapshot: the default extractor would fetch the list over the network
  on first use, which a pure processor must not do.

Both detectors are built once (recognizers compiled, plugins initialised) and reused for every candidate; a
finding never carries the matched text, so a report or verdict built from it cannot leak the secret.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers
import tldextract
from detect_secrets.filters import heuristic
from detect_secrets.settings import default_settings, get_plugins
from phonenumbers import phonenumbermatcher
from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
from presidio_analyzer.nlp_engine import NoOpNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    PhoneRecognizer,
    UsSsnRecognizer,
)

PII_ENTITIES: tuple[str, ...] = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN")
"""The personal-data kinds flagged. Dates, URLs, UUIDs and IP addresses are left out on purpose: they are
ordinary in agent memories (a deadline, a doc link, a run id, a host) and flagging them would make every such
memory need a retention rule."""

PII_SCORE_THRESHOLD = 0.3
"""Presidio scores a phone number without context words at 0.4 and weaker pattern guesses below 0.3."""


@dataclass(frozen=True, slots=True)
class SecretFinding:
    """A secret found: the plugin's secret type and the 1-based line (never the value itself)."""

    kind: str
    line: int


@dataclass(frozen=True, slots=True)
class PiiFinding:
    """Personal data found: presidio's entity type, its character span and confidence."""

    kind: str
    start: int
    end: int
    score: float


@dataclass(frozen=True, slots=True)
class ContentScan:
    """What the detectors found in one text."""

    secrets: tuple[SecretFinding, ...] = ()
    pii: tuple[PiiFinding, ...] = ()

    @property
    def pii_kinds(self) -> tuple[str, ...]:
        """The distinct kinds of personal data, sorted (what a record and a verdict carry)."""
        return tuple(sorted({f.kind for f in self.pii}))

    @property
    def secret_kinds(self) -> tuple[str, ...]:
        """The distinct secret types, sorted."""
        return tuple(sorted({f.kind for f in self.secrets}))


class SecretDetector:
    """detect-secrets' default plugins over in-memory text; guarantees no network call and no file access."""

    def __init__(self) -> None:
        # ``default_settings`` enables every shipped plugin with its default configuration; the plugin objects
        # keep their configuration after the context exits, so the process-wide settings are left untouched.
        with default_settings():
            self._plugins = tuple(get_plugins())

    @property
    def plugin_names(self) -> tuple[str, ...]:
        """Names of the plugins run (for the docs and the speed report)."""
        return tuple(type(p).__name__ for p in self._plugins)

    def scan(self, text: str) -> tuple[SecretFinding, ...]:
        """Every secret in ``text``, by line; empty when there is none."""
        found: list[SecretFinding] = []
        for number, line in enumerate(text.splitlines(), start=1):
            for plugin in self._plugins:
                for value in plugin.analyze_string(line):
                    if not _filtered_out(value, line, plugin):
                        found.append(SecretFinding(plugin.secret_type, number))
        return tuple(found)


def _filtered_out(value: str, line: str, plugin: object) -> bool:
    # The heuristic filters detect-secrets applies by default to a scan: what merely looks random.
    return (
        heuristic.is_sequential_string(value)
        or heuristic.is_potential_uuid(value)
        or heuristic.is_likely_id_string(value, line, plugin)  # type: ignore[arg-type]
        or heuristic.is_templated_secret(value)
        or heuristic.is_prefixed_with_dollar_sign(value)
        or heuristic.is_not_alphanumeric_string(value)
        or heuristic.is_indirect_reference(line)
    )


class _OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's email recognizer with tldextract on its bundled suffix-list snapshot (no network)."""

    _extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    def validate_result(self, pattern_text: str) -> bool:
        """A match is an email when its domain has a known public suffix (as presidio's own check)."""
        return self._extract(pattern_text).fqdn != ""


class PiiDetector:
    """presidio-analyzer's pattern recognizers without an NLP model; guarantees no model load or download.

    The phone recognizer (libphonenumber's matcher, once per region) is most of presidio's cost. It is skipped
    for a text in which libphonenumber's own candidate pattern finds no digit run as long as the shortest valid
    number of any configured region: the matcher would parse and reject every such candidate, so the result is
    the same and the gate stays above its speed goal.
    """

    def __init__(
        self,
        entities: Iterable[str] = PII_ENTITIES,
        threshold: float = PII_SCORE_THRESHOLD,
        phone_regions: Iterable[str] | None = None,
    ) -> None:
        self.entities = list(entities)
        self._without_phone = [e for e in self.entities if e != "PHONE_NUMBER"]
        phone = PhoneRecognizer(supported_regions=tuple(phone_regions)) if phone_regions else PhoneRecognizer()
        self._min_phone_digits = min(
            min(phonenumbers.PhoneMetadata.metadata_for_region(region).general_desc.possible_length)
            for region in phone.supported_regions
        )
        # The matcher's candidate pattern is module-private in libphonenumber: without it, always run the matcher.
        self._phone_candidates = getattr(phonenumbermatcher, "_PATTERN", None)
        registry = RecognizerRegistry(supported_languages=["en"])
        for recognizer in (
            _OfflineEmailRecognizer(),
            phone,
            CreditCardRecognizer(),
            IbanRecognizer(),
            UsSsnRecognizer(),
        ):
            registry.add_recognizer(recognizer)
        self._engine = AnalyzerEngine(
            nlp_engine=NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}]),
            registry=registry,
            supported_languages=["en"],
            default_score_threshold=threshold,
        )

    def scan(self, text: str) -> tuple[PiiFinding, ...]:
        """Every personal-data span in ``text``, in order of position."""
        entities = self.entities if self._may_hold_phone(text) else self._without_phone
        results = self._engine.analyze(text=text, language="en", entities=entities)
        return tuple(
            sorted((PiiFinding(r.entity_type, r.start, r.end, r.score) for r in results), key=lambda f: f.start)
        )


    def _may_hold_phone(self, text: str) -> bool:
        if self._phone_candidates is None:
            return True
        return any(
            sum(ch.isdigit() for ch in match.group()) >= self._min_phone_digits
            for match in self._phone_candidates.finditer(text)
        )


class ContentDetectors:
    """Both detectors, built once per process and shared by every gate call."""

    def __init__(self, secrets: SecretDetector | None = None, pii: PiiDetector | None = None) -> None:
        self.secrets = secrets or SecretDetector()
        self.pii = pii or PiiDetector()

    def scan(self, text: str) -> ContentScan:
        """Secrets and personal data in ``text``. PII is not looked for once a secret is found: the
        candidate is rejected either way, and the secret must not reach another library's logs."""
        secrets = self.secrets.scan(text)
        if secrets:
            return ContentScan(secrets=secrets)
        return ContentScan(pii=self.pii.scan(text))
