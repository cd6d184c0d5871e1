"""The alias table's write for keys that already exist (the AWS KMS face's CreateAlias)."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlalchemy import insert
from sqlalchemy.engine import Connection

from kms.backends.storage import schema as t
from kms.errors import Conflict


class AliasTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection

    def set_alias(self, key_id: str, alias: str) -> None:
        """Give the key ``alias``. Conflict if the alias names a key already or the key
        has an alias (the table holds one alias per key)."""
        try:
            self._c.execute(insert(t.aliases).values(alias=alias, key_id=key_id))
        except sa_exc.IntegrityError as e:
            raise Conflict(f"alias {alias!r} is already in use, or the key has one") from e
