""":class:`~sinks.payloads.PayloadStore` on an S3-compatible object store (AWS S3, MinIO, Ceph, moto's server).

Selected by ``CTXFLOW_PAYLOAD_STORE=s3://bucket/prefix`` (:func:`streams.runtime.payloads.open_payload_store`).
Objects are stored under ``<prefix>/<ref>``, the ref being the content address
``<tenant>/sha256/<2 hex>/<64 hex>`` (so a bucket policy on ``<prefix>/<tenant>/`` can isolate a tenant). The
same guarantees as the local store: a write is idempotent (the same key always holds the same bytes, and S3's
single-object PUT is atomic: a reader sees the whole object or none), a read is checked against the key's digest,
keys that are not content addresses are refused before any request.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ctxflow.sinks.payloads import CorruptPayload, check_ref


class S3PayloadStore:
    """Payloads in ``bucket`` under ``prefix`` through a boto3 S3 client (see the module docstring)."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @classmethod
    def connect(
        cls,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> S3PayloadStore:
        """A store on a new boto3 client; credentials not given come from boto3's usual chain (environment,
        profile, instance role)."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region, aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            # Path-style addressing: what MinIO and other S3-compatible servers on a plain host:port expect.
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
        )
        return cls(client, bucket, prefix)

    def _key(self, ref: str) -> tuple[str, str]:
        digest = check_ref(ref)
        return (f"{self.prefix}/{ref}" if self.prefix else ref), digest

    def put(self, ref: str, content: bytes) -> None:
        """Store ``content`` under ``ref`` (idempotent: the same key always holds the same bytes)."""
        key, digest = self._key(ref)
        if hashlib.sha256(content).hexdigest() != digest:
            raise CorruptPayload(f"{ref}: content does not hash to its key")
        self.client.put_object(Bucket=self.bucket, Key=key, Body=content)

    def get(self, ref: str) -> bytes:
        """The stored bytes, verified against the key; ``KeyError`` when absent."""
        key, digest = self._key(ref)
        try:
            data: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise KeyError(ref) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptPayload(f"{ref}: stored bytes do not hash to their key")
        return data

    def delete(self, ref: str) -> None:
        """Remove the payload if present (deleting an absent key is harmless in S3)."""
        key, _ = self._key(ref)
        self.client.delete_object(Bucket=self.bucket, Key=key)
