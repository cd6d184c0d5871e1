"""Dual control in the SDK (docs/dual-control.md): the calls of ``/v1/changes`` and
``/v1/control-policy``, and the approver's offline signature.

Under dual control a gated call (``create_principal`` of a service, requester or admin,
``grant`` of datakey or decrypt, ``issue_token`` or ``rotate_token`` for someone else,
``register_custodian``, ``revoke_custodian``, ``key_action(ref, "schedule-deletion")``,
``set_control_policy`` ...) does nothing yet: the server records a pending change and
answers 202 ``{"change": {...}, "message": ...}``, which the method returns as it is.
``pending_change(answer)`` tells that answer from a done action. Custodians approve the
change (``change_signature`` then ``approve_change``), and its proposer applies it with
``apply_change``, which returns what the original call would have.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms.client.errors import KmsClientError
from kms.formats import change as changefmt
from kms.formats import escrow as escrowfmt


def pending_change(answer: Any) -> dict[str, Any] | None:
    """The pending change if ``answer`` (what a gated SDK call returned) says the call was
    recorded for approval instead of done (HTTP 202); None if it was done."""
    if isinstance(answer, Mapping) and set(answer) == {"change", "message"}:
        change = answer["change"]
        if isinstance(change, Mapping) and change.get("state") == "pending":
            return dict(change)
    return None


def change_signature(
    change: Mapping[str, Any], key: Ed25519PrivateKey, decision: str = "approve"
) -> bytes:
    """A custodian's signature of ``decision`` ("approve" or "reject") over the change's
    digest, recomputed here from the change's fields (kms/formats/change.py). Raises
    KmsClientError ``digest_mismatch`` if the server's ``digest`` differs from it (the
    server shows one change and would record the signature for another), and
    ``bad_response`` if the change lacks a field the digest covers."""
    if decision not in ("approve", "reject"):
        raise KmsClientError("invalid_request", "decision must be approve or reject")
    try:
        digest = changefmt.change_digest(change)
    except changefmt.ChangeFormatError as e:
        raise KmsClientError("bad_response", str(e)) from None
    if not hmac.compare_digest(digest.hex(), str(change.get("digest", ""))):
        raise KmsClientError(
            "digest_mismatch",
            "the server's digest does not match the change's fields: not signing",
        )
    return key.sign(escrowfmt.signed_message(digest, decision))


class ChangeCalls:
    """The dual-control calls of KmsClient (a base class of it)."""

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        raise NotImplementedError  # KmsClient.call

    def list_changes(self, state: str | None = None) -> list[dict[str, Any]]:
        """Changes, newest first (at most 200); only those of ``state`` (pending, applied,
        rejected, cancelled) if given. A pending change past its expiry shows state
        "expired". Admins, auditors and custodians."""
        params = {"state": state} if state is not None else None
        return list(self.call("GET", "/v1/changes", params=params)["changes"])

    def change(self, change_id: str) -> dict[str, Any]:
        """One change: the fields its digest covers (change_id, kind, params, proposer,
        created_at, expires_at), ``digest`` (hex), ``state``, ``required_groups``,
        ``approvals``, ``rejections`` and ``approved`` (the quorum holds)."""
        return dict(self.call("GET", _change(change_id))["change"])

    def approve_change(self, change_id: str, custodian: str, signature: bytes) -> dict[str, Any]:
        """Submit ``custodian``'s approval (the client's token must be that custodian's);
        ``signature`` from change_signature(change, key). Returns the change."""
        return self._decide(change_id, custodian, signature, "approve")

    def reject_change(self, change_id: str, custodian: str, signature: bytes) -> dict[str, Any]:
        """Submit ``custodian``'s rejection (change_signature(change, key, "reject")); a
        member of a group the change needs rejects it for good. Returns the change."""
        return self._decide(change_id, custodian, signature, "reject")

    def apply_change(self, change_id: str) -> dict[str, Any]:
        """Apply an approved change (its proposer only, once): returns what the original
        call returns (for a principal, its token, shown only here)."""
        return dict(self.call("POST", _change(change_id) + "/apply", {}))

    def cancel_change(self, change_id: str) -> dict[str, Any]:
        """Withdraw a pending change (an admin); returns it, state "cancelled"."""
        return dict(self.call("POST", _change(change_id) + "/cancel", {})["change"])

    def control_policy(self) -> dict[str, Any]:
        """The control policy in force: ``{mode, quorum, required_groups, ttl_seconds}``."""
        return dict(self.call("GET", "/v1/control-policy"))

    def set_control_policy(
        self, mode: str, quorum: int, required_groups: Sequence[str], ttl_seconds: int
    ) -> dict[str, Any]:
        """Replace the control policy (an admin): returns the new policy, or under dual
        control the pending change (see pending_change)."""
        body = {
            "mode": mode,
            "quorum": quorum,
            "required_groups": list(required_groups),
            "ttl_seconds": ttl_seconds,
        }
        return dict(self.call("PUT", "/v1/control-policy", body))

    def _decide(
        self, change_id: str, custodian: str, signature: bytes, decision: str
    ) -> dict[str, Any]:
        body = {"custodian": custodian, "signature": base64.b64encode(signature).decode()}
        return dict(self.call("POST", f"{_change(change_id)}/{decision}", body)["change"])


def _change(change_id: str) -> str:
    return "/v1/changes/" + quote(change_id, safe="")
