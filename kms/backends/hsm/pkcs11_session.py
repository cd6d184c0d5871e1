"""Opening a PKCS#11 session: resetting the module in this process and logging in."""

from __future__ import annotations

import contextlib
from typing import Any

from pkcs11 import exceptions as p11e


def reset(lib: Any) -> None:
    """finalize (ignoring 'not initialised') then initialize: the only reset that works
    after a fork with reset_on_fork, unlike lib.reinitialize()."""
    with contextlib.suppress(p11e.PKCS11Error):
        lib.finalize()
    lib.initialize()


def login(token: Any, pin: str) -> Any:
    """A read-write session (the audit anchor is a token object the server updates)."""
    try:
        return token.open(rw=True, user_pin=pin)
    except p11e.UserAlreadyLoggedIn:
        # Another session of this process is logged in; login state is per process.
        return token.open(rw=True)
