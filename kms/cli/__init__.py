"""The ``kms`` command.

Local commands (``init``, ``migrate``, ``serve``) work on a data directory. Administration
commands (``principals``, ``keys``, ``grants``, ``audit``) talk to a running server
through the SDK with an admin or auditor token, so they are authenticated and audited
like any other caller. Every failure prints one clear line to stderr and exits non-zero.

main.py gathers the commands: local.py (``init``, ``migrate``, ``serve``, ``rotate-due``),
admin.py (``principals``, ``keys``, ``grants``), audit.py, escrow.py, backup.py (``backup``,
``restore``) and the rewrap/ package; common.py holds what they share (error handling,
output, the server and data directory options).
"""

from kms.cli.main import main

__all__ = ["main"]
