"""Secret and personal-data detection for memory candidates, through maintained libraries only.

* Secrets: every plugin detect-secrets ships with its default settings (AWS, GitHub, private keys, keyword
  assignments such as ``password = ...``, JWTs, Slack, Stripe, OpenAI...), run line by line on in-memory text
  through each plugin's ``analyze_string`` (the plugins' own API: no files, no verification calls over the
  network), then detect-secrets' heuristic filters drop what is an id, a UUID, a template or a sequence.
  High-entropy plugins run in their normal (non-eager) mode, which looks at quoted strings only: free text full
  of ids and numbers is not a secret, a quoted random string is treated as one (a false positive costs a
  rejected memory; a false negative persists a credential).
* Personal data: presidio-analyzer's *pattern* recognizers (email, phone, credit card, IBAN, US SSN), called
  without any NLP engine, so no spaCy model is loaded or downloaded. The email recognizer's domain check uses
  tldextract with its bundled suffix-list snapshot: the default extractor would fetch the list over the network
  on first use, which a pure processor must not do.

Both detectors are built once (recognizers compiled, plugins initialised) and reused for every candidate; a
finding never carries the matched text, so a report or verdict built from it cannot leak the secret.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import phonenumbers
import tldextract
from detect_secrets.filters import heuristic
from detect_secrets.settings import default_settings, get_plugins
from phonenumbers import phonenumbermatcher
from presidio_analyzer import EntityRecognizer
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

    The recognizers are called directly, with presidio's own score threshold and duplicate removal, rather
    than through ``AnalyzerEngine``: without an NLP model the engine adds nothing (no tokens, so no context
    words) but half the cost.

    Presidio's phone recognizer runs libphonenumber's matcher once per region over the whole text, parsing
    every digit run it finds: most of presidio's cost. So it runs only where a number can be: libphonenumber's
    own candidate pattern finds the digit runs, and a text none of whose runs is as long as the shortest valid
    number of any configured region (libphonenumber metadata) holds no phone number and is not searched; any
    other text is searched whole, so the findings equal presidio's (a property test checks it).
    """

    def __init__(
        self,
        entities: Iterable[str] = PII_ENTITIES,
        threshold: float = PII_SCORE_THRESHOLD,
        phone_regions: Iterable[str] | None = None,
    ) -> None:
        self.entities = [e for e in entities if e != "PHONE_NUMBER"]
        self.threshold = threshold
        self._phone = "PHONE_NUMBER" in entities
        regions = tuple(phone_regions) if phone_regions else PhoneRecognizer().supported_regions
        self._region_min = {
            region: min(phonenumbers.PhoneMetadata.metadata_for_region(region).general_desc.possible_length)
            for region in regions
        }
        self._phone_recognizers: dict[tuple[str, ...], PhoneRecognizer] = {}
        # The matcher's candidate pattern is module-private in libphonenumber: without it, run every region.
        self._phone_candidates = getattr(phonenumbermatcher, "_PATTERN", None)
        recognizers: list[EntityRecognizer] = [
            _OfflineEmailRecognizer(),
            CreditCardRecognizer(),
            IbanRecognizer(),
            UsSsnRecognizer(),
        ]
        self._recognizers = [r for r in recognizers if set(r.supported_entities) & set(self.entities)]

    def scan(self, text: str) -> tuple[PiiFinding, ...]:
        """Every personal-data span in ``text``, in order of position."""
        results: list[Any] = []
        for recognizer in self._recognizers:
            results += recognizer.analyze(text, self.entities, None)
        if self._phone:
            results += self._phones(text)
        results = EntityRecognizer.remove_duplicates([r for r in results if r.score >= self.threshold])
        return tuple(
            sorted((PiiFinding(r.entity_type, r.start, r.end, r.score) for r in results), key=lambda f: f.start)
        )

    def _recognizer(self, regions: tuple[str, ...]) -> PhoneRecognizer:
        found = self._phone_recognizers.get(regions)
        if found is None:
            found = self._phone_recognizers.setdefault(regions, PhoneRecognizer(supported_regions=regions))
        return found

    def _phones(self, text: str) -> list[Any]:
        everywhere = self._recognizer(tuple(self._region_min))
        if self._phone_candidates is None:
            return everywhere.analyze(text, ["PHONE_NUMBER"])
        shortest = min(self._region_min.values())
        # Only a text holding a digit run long enough to be a number in some region is searched, and then whole:
        # searching each run's window alone missed a number the matcher finds after a longer run on the whole
        # text (the property test found one), so the windows bought speed at the price of exactness.
        if any(sum(ch.isdigit() for ch in m.group()) >= shortest for m in self._phone_candidates.finditer(text)):
            return everywhere.analyze(text, ["PHONE_NUMBER"])
        return []


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
