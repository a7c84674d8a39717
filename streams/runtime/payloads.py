"""The deployment's payload store, from its settings: a local directory or an S3-compatible bucket.

``CTXFLOW_PAYLOAD_STORE``: unset (``<home>/payloads``), a path or ``file:///path`` (:class:`LocalPayloadStore`),
or ``s3://bucket/prefix`` (:class:`~sinks.s3_payloads.S3PayloadStore`, with ``CTXFLOW_PAYLOAD_S3_ENDPOINT``,
``CTXFLOW_PAYLOAD_S3_REGION``, ``CTXFLOW_PAYLOAD_S3_ACCESS_KEY_ID``, ``CTXFLOW_PAYLOAD_S3_SECRET_ACCESS_KEY``;
credentials not set come from boto3's usual chain). The worker and ``ctxflow memory rehydrate`` open it here.
"""

from __future__ import annotations

from urllib.parse import urlparse

from ctxflow.sinks.payloads import LocalPayloadStore, PayloadStore
from ctxflow.streams.config import Settings


def open_payload_store(settings: Settings) -> PayloadStore:
    """The payload store ``settings`` name."""
    location = settings.payload_store
    if location is None or not location.startswith("s3://"):
        return LocalPayloadStore(settings.payload_root)
    parsed = urlparse(location)
    if not parsed.netloc:
        raise ValueError(f"CTXFLOW_PAYLOAD_STORE={location!r}: an S3 location is s3://bucket[/prefix]")
    from ctxflow.sinks.s3_payloads import S3PayloadStore  # boto3 only where S3 is used

    return S3PayloadStore.connect(
        parsed.netloc, parsed.path.strip("/"), endpoint_url=settings.payload_s3_endpoint,
        region=settings.payload_s3_region, access_key_id=settings.payload_s3_access_key_id,
        secret_access_key=settings.payload_s3_secret_access_key,
    )
