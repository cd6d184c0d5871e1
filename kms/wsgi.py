"""WSGI entry point for gunicorn: ``kms.wsgi:app``. Loaded in each worker (no preload),
so the PKCS#11 module is initialised after fork."""

from kms.app import create_app

app = create_app()
