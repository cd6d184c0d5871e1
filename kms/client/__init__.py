"""Python SDK: an HTTP client for the KMS API and envelope encryption of bytes and files.

    from kms.client import KmsClient, encrypt_bytes, decrypt_bytes
    client = KmsClient("https://kms.internal:8200", token)
    blob = encrypt_bytes(client, "alias/patients", b"record", context={"tenant": "42"})
    assert decrypt_bytes(client, blob, context={"tenant": "42"}) == b"record"

Every failure is a KmsClientError. Under dual control a gated administrative call
answers a pending change instead of acting: ``pending_change(answer)`` tells
(kms/client/changes.py).
"""

from kms.client.cache import DataKeyCache
from kms.client.changes import change_signature, pending_change
from kms.client.envelope import decrypt_bytes, decrypt_file, encrypt_bytes, encrypt_file
from kms.client.http import DataKey, KmsClient, KmsClientError
from kms.client.rewrap import BulkRewrapper, Census, RewrapItem, RewrapResult
from kms.client.rewrap_files import rewrap_files

__all__ = [
    "BulkRewrapper",
    "Census",
    "DataKey",
    "DataKeyCache",
    "KmsClient",
    "KmsClientError",
    "RewrapItem",
    "RewrapResult",
    "change_signature",
    "decrypt_bytes",
    "decrypt_file",
    "encrypt_bytes",
    "encrypt_file",
    "pending_change",
    "rewrap_files",
]
