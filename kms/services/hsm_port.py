"""The HSM port the services need (kms/backends/hsm/pkcs11_hsm.py implements it)."""

from __future__ import annotations

from typing import Protocol

from kms.services.model import KekRef, WrappedKek


class Hsm(Protocol):
    """A PKCS#11 token holding the root key and the audit signing key.

    Every method raises kms.errors.HsmUnavailable when the HSM cannot be used.
    """

    def forget(self, key_id: str) -> None:
        """Destroy this process's cached HSM objects of the key's KEK versions."""
        ...

    def new_wrapped_kek(self) -> WrappedKek:
        """Generate an AES-256 KEK inside the HSM; return it wrapped under the root key."""

    def encrypt(self, kek: KekRef, iv: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-256-GCM encrypt inside the HSM; returns (IV, ciphertext || 16-byte tag). The
        IV is ``iv`` unless the HSM generates its own (an HSM profile with ``gcm_iv =
        hsm``), in which case it is the one the HSM used: store the returned IV."""

    def decrypt(self, kek: KekRef, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM decrypt; raises kms.errors.IntegrityFailure if authentication fails."""

    def random(self, n: int) -> bytes:
        """``n`` bytes from the HSM's random generator."""

    def check(self) -> None:
        """Return only if a logged-in session can use the root key right now."""

    def audit_public_key_pem(self) -> bytes:
        """PEM SubjectPublicKeyInfo of the audit signing key."""

    def mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under the HSM's integrity key (seals database rows)."""

    def cache_stats(self) -> dict[str, int]:
        """Counters of the per-process KEK cache (for logs and benchmarks)."""

    def sign_digest(self, digest: bytes) -> bytes:
        """DER ECDSA P-256 signature of a SHA-256 ``digest`` by the audit signing key."""

    def anchor_values(self, label: str, cached: bool = False) -> list[bytes]:
        """The values of the token data objects ``label``, searched for in the token
        (``cached``: the objects the last search found, read again)."""

    def anchor_labels(self, prefix: str) -> list[str]:
        """Labels of the token's data objects that start with ``prefix``."""

    def add_anchor(self, label: str, value: bytes) -> None:
        """Store a new token data object ``label`` = ``value`` (others of the label stay)."""

    def drop_anchor(self, label: str, value: bytes) -> None:
        """Destroy the token data objects ``label`` whose value is ``value``."""
