"""WSGI entry point for gunicorn: ``kms.wsgi:app``. Loaded in each worker (no preload),
so the PKCS#11 module is initialised after fork; the checkpoint timer runs per worker."""

from kms import config
from kms.app import create_app, start_checkpoint_timer

settings = config.from_env()
app = create_app(settings)
start_checkpoint_timer(app.extensions["kms"], settings.audit_checkpoint_seconds)
