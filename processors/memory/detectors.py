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

import functools
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import phonenumbers
import tldextract
from detect_secrets.filters import heuristic
from detect_secrets.settings import default_settings, get_plugins
from phonenumbers import phonenumbermatcher, phonenumberutil
from presidio_analyzer import EntityRecognizer, RecognizerResult
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

    Phone numbers are found as presidio's ``PhoneRecognizer`` finds them (libphonenumber's matcher once per
    region, same regions, leniency and score, same duplicate removal), with two exact shortcuts that spare
    libphonenumber's parse, most of presidio's cost: see :class:`_PhoneSearch`. A property test checks the
    findings equal presidio's own recognizer's on generated digit-heavy text.
    """

    def __init__(
        self,
        entities: Iterable[str] = PII_ENTITIES,
        threshold: float = PII_SCORE_THRESHOLD,
        phone_regions: Iterable[str] | None = None,
    ) -> None:
        self.entities = [e for e in entities if e != "PHONE_NUMBER"]
        self.threshold = threshold
        presidio_phone = (
            PhoneRecognizer(supported_regions=tuple(phone_regions)) if phone_regions else PhoneRecognizer()
        )
        self._phones = _PhoneSearch(presidio_phone) if "PHONE_NUMBER" in entities else None
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
        if self._phones is not None:
            results += self._phones.analyze(text)
        results = EntityRecognizer.remove_duplicates([r for r in results if r.score >= self.threshold])
        return tuple(
            sorted((PiiFinding(r.entity_type, r.start, r.end, r.score) for r in results), key=lambda f: f.start)
        )


class _PhoneSearch:
    """Presidio's phone recognizer, minus the libphonenumber parses that provably cannot yield a number.

    Presidio runs ``PhoneNumberMatcher(text, region)`` for each region and keeps every match; each matcher walks
    the text's digit runs and, for each run and the pieces it splits it into, calls ``_parse_and_verify``, whose
    ``parse`` + ``is_valid_number`` is where the time goes. A valid number's national significant number (NSN)
    has a length its country's metadata lists as possible, and every NSN digit comes from a character of the
    candidate (a digit, or a letter read as a vanity digit), except the digits a national-prefix transform rule
    writes in. So a candidate with fewer letters and digits than :func:`_fewest_characters` allows for the
    region is rejected before the parse. ``_parse_and_verify`` has no side effect and its caller does the same
    bookkeeping (retry budget, search position) whatever the cause of a rejection, so the matcher walks the text
    exactly as libphonenumber's does and yields the same matches.

    On top of that, a region is not searched at all when no stretch of the text that a candidate could lie in
    (:data:`_STRETCHES`) holds enough letters and digits for it: its matcher would reject every candidate.
    """

    def __init__(self, presidio: PhoneRecognizer) -> None:
        self._entity = presidio.supported_entities[0]
        self._score = presidio.SCORE
        self._leniency = presidio.leniency
        # The bounds hold for a matcher that validates; a merely "possible" number obeys other lengths.
        prunable = presidio.leniency >= phonenumbermatcher.Leniency.VALID
        self._bounds = {
            region: _fewest_characters(region) if prunable else (0, 0) for region in presidio.supported_regions
        }

    def analyze(self, text: str) -> list[RecognizerResult]:
        """Presidio's ``PhoneRecognizer.analyze(text, ["PHONE_NUMBER"])`` results (entity, span and score)."""
        if _STRETCHES is None:
            longest = _characters(text)
        else:
            longest = max((_characters(m.group()) for m in _STRETCHES.finditer(text)), default=0)
        results = []
        for region, bounds in self._bounds.items():
            if longest < min(bounds):
                continue
            matcher = _PrunedPhoneMatcher(text, region, self._leniency, bounds)
            results += [RecognizerResult(self._entity, m.start, m.end, self._score) for m in matcher]
        return EntityRecognizer.remove_duplicates(results)


class _PrunedPhoneMatcher(phonenumbermatcher.PhoneNumberMatcher):
    """libphonenumber's matcher that rejects, without parsing, a candidate too short to be a valid number."""

    def __init__(self, text: str, region: str, leniency: int, bounds: tuple[int, int]) -> None:
        super().__init__(text, region, leniency=leniency)
        self._with_plus, self._without_plus = bounds

    def _parse_and_verify(self, candidate: str, offset: int) -> phonenumbers.PhoneNumberMatch | None:
        has_plus = "+" in candidate or "\uff0b" in candidate
        if _characters(candidate) < (self._with_plus if has_plus else self._without_plus):
            return None
        return super()._parse_and_verify(candidate, offset)


def _stretches() -> re.Pattern[str] | None:
    """Stretches of text that hold every candidate libphonenumber's matcher can try (None if unsure).

    The matcher's candidates are pieces of matches of its module-private ``_PATTERN``, searched from wherever the
    matcher resumes, so the pattern's own non-overlapping matches do not bound them. The pattern is a number part
    (brackets, plus signs, punctuation and digits, at least one) then an optional extension (``ext. 12``,
    ``x12``, ``;ext=12``): a match lies in a maximal run of number characters holding a digit, followed by a run
    of number or extension characters, the latter over-approximated by every character the extension's source
    spells out besides its escapes (``\\d``, ``\\t``), digits and whitespace. All are
    compared with the pattern's flags, so case variants count too. The structure is checked against
    libphonenumber's own building blocks; if it changed, the whole text is counted instead.
    """
    matcher, util = phonenumbermatcher, phonenumberutil
    try:
        number = (
            f"(?:{matcher._LEAD_CLASS}{matcher._PUNCTUATION}){matcher._LEAD_LIMIT}{matcher._DIGIT_SEQUENCE}"
            f"(?:{matcher._PUNCTUATION}{matcher._DIGIT_SEQUENCE}){matcher._BLOCK_LIMIT}"
        )
        extension = util._EXTN_PATTERNS_FOR_MATCHING
        pattern = matcher._PATTERN
        number_chars = f"{util._VALID_PUNCTUATION}{matcher._LEAD_CLASS_CHARS}\\d"  # a leading "-" is no range
    except AttributeError:
        return None
    # Only \\d and \\t escape a letter in the extension, and its classes hold no range, so the characters it
    # spells out (plus digits and whitespace) are all it can match.
    classes = re.findall(r"\[((?:\\.|[^\]\\])*)\]", extension)
    if (
        pattern.pattern != f"{number}(?:{extension})?"
        or set(re.findall(r"\\[A-Za-z]", extension)) - {r"\d", r"\t"}
        or any("-" in body.strip("-") for body in classes)
    ):
        return None
    extension_chars = "".join(re.escape(ch) for ch in sorted(set(re.sub(r"\\[A-Za-z]", "", extension))))
    # The number part holds a digit, so a run of number characters without one starts no candidate.
    number_run = f"[{number_chars}]*\\d[{number_chars}]*"
    return re.compile(f"{number_run}[{number_chars}{extension_chars}\\s]*", pattern.flags)


_STRETCHES = _stretches()


def _characters(candidate: str) -> int:
    # Digits of any script, and letters (parse reads a candidate with three letters as a vanity number): an
    # upper bound on the digits parse can take from the candidate. The extension's digits are counted too, which
    # only makes the bound looser.
    return sum(ch.isalnum() for ch in candidate)


@functools.cache  # libphonenumber's metadata does not change in a process; every gate built shares the bounds
def _fewest_characters(region: str) -> tuple[int, int]:
    """The fewest letters and digits a candidate needs to be a valid number when parsed for ``region``:
    ``(with a plus sign, without one)``.

    ``phonenumberutil.parse`` gets the country code one of three ways, and the NSN it keeps must then be valid
    for a region sharing that code (``is_valid_number`` checks its length against the general description's
    possible lengths, never empty in the metadata):

    * none in the candidate: the region's own, all the digits are national prefix + NSN;
    * the region's code written without a plus: code digits + NSN;
    * after a plus sign or the region's international (IDD) prefix: any country's code digits + NSN.

    The national prefix is stripped with the region's metadata (no code, or its own code) or the code's main
    region's (any other code); a transform rule may write digits in there (Argentina's ``9\\1``), so those
    are subtracted. Without a plus sign, only the IDD prefix leads to another country, and its shortest match
    counts too. A retry after a plus with an unknown code falls back to the first two ways.
    """
    own = phonenumbers.country_code_for_region(region)
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if metadata is None:  # a region libphonenumber does not know: no bound claimed
        return 0, 0
    national = min(
        _shortest_nsn(own) - _written_in(metadata),
        len(str(own)) + _shortest_nsn(own) - _written_in(metadata) - _written_in(_main_metadata(own)),
    )
    abroad = min(
        len(str(code)) + _shortest_nsn(code) - _written_in(_main_metadata(code))
        for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE
    )
    idd = _shortest_match(metadata.international_prefix) if metadata.international_prefix else 0
    return min(national, abroad), min(national, idd + abroad)


def _shortest_nsn(code: int) -> int:
    return min(
        min(phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(code, r).general_desc.possible_length)
        for r in phonenumbers.COUNTRY_CODE_TO_REGION_CODE[code]
    )


def _main_metadata(code: int) -> Any:
    main = phonenumbers.region_code_for_country_code(code)
    return phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(code, main)


def _written_in(metadata: Any) -> int:
    # Digits a national-prefix transform rule adds: its literal characters. A rule repeating a group could add
    # more than the literals; none does in the metadata, and such a rule disables the bound rather than guess.
    rule = metadata.national_prefix_transform_rule if metadata is not None else None
    if not rule:
        return 0
    if len(re.findall(r"\\\d", rule)) > 1:
        return _NO_BOUND
    return len(re.sub(r"\\\d", "", rule))


_NO_BOUND = 1_000


def _shortest_match(pattern: str) -> int:
    """Length of the shortest digit string the (digits-only) IDD pattern fully matches, by enumeration."""
    compiled = re.compile(pattern)
    for length in range(4):
        if any(compiled.fullmatch(digits) for digits in _digit_strings(length)):
            return length
    return 4


def _digit_strings(length: int) -> Iterable[str]:
    return ("".join(p) for p in itertools.product("0123456789", repeat=length))


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
