"""The token objects the server writes while it runs: the audit and state anchors
(kms/services/audit_anchor.py, state_index.py), private, never modifiable, in the form
the HSM profile names (hsm_config/templates.py, ANCHOR_FORMS: a data object's value, or
the CKA_ID of an inert secret key where the module refuses private token data objects)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11e

T = TypeVar("T")


class AnchorObjects:
    """Mixed into Pkcs11Hsm, which provides ``_call`` and ``_anchor_form``."""

    _anchor_form: tuple[ObjectClass, Attribute, dict[Attribute, Any]]

    def _call(self, op: Callable[[Any], T]) -> T:
        raise NotImplementedError

    def anchor_values(self, label: str, cached: bool = False) -> list[bytes]:
        """The values of the token's data objects labelled ``label`` (the audit and state
        anchors, kms/services/audit_anchor.py, state_index.py), searched for in the token
        so that another process's update is seen. With ``cached``, the objects the last
        search found are read again instead (about 40 us where a search costs a
        millisecond): objects created since are not seen, but an object destroyed since
        is, and triggers a search."""

        cls, attribute = self._anchor_form[:2]

        def op(c: Any) -> list[bytes]:
            objects = c.anchors.get(label) if cached else None
            if objects:
                try:
                    return [bytes(o[attribute]) for o in objects]
                except (p11e.ObjectHandleInvalid, p11e.NoSuchKey, KeyError):
                    pass  # destroyed by another process since: search again
            objects = list(c.session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label}))
            c.anchors[label] = objects
            return [bytes(o[attribute]) for o in objects]

        return self._call(op)

    def anchor_labels(self, prefix: str) -> list[str]:
        """Labels of the token's data objects whose label starts with ``prefix``."""

        cls = self._anchor_form[0]

        def op(c: Any) -> list[str]:
            found = c.session.get_objects({Attribute.CLASS: cls})
            labels = (str(o[Attribute.LABEL]) for o in found)
            return sorted(label for label in labels if label.startswith(prefix))

        return self._call(op)

    def add_anchor(self, label: str, value: bytes) -> None:
        """Store a new private token object ``label`` holding ``value`` (in the profile's
        form, templates.ANCHOR_FORMS). Objects of the same label are left alone (remove
        them with drop_anchor once this one exists)."""

        cls, attribute, template = self._anchor_form

        def op(c: Any) -> None:
            c.session.create_object(
                {
                    **template,
                    Attribute.CLASS: cls,
                    Attribute.LABEL: label,
                    attribute: value,
                }
            )

        self._call(op)

    def drop_anchor(self, label: str, value: bytes) -> None:
        """Destroy the data objects ``label`` holding exactly ``value``; none is fine
        (another process got there first)."""

        cls, attribute = self._anchor_form[:2]

        def op(c: Any) -> None:
            found = c.session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label})
            for o in found:
                if bytes(o[attribute]) == value:
                    with contextlib.suppress(p11e.ObjectHandleInvalid):
                        o.destroy()

        self._call(op)
