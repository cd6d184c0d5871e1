"""WSGI entry point for gunicorn: ``kms.wsgi:app``. Loaded in each worker (no preload),
so the PKCS#11 module is initialised after fork; the background loops run per worker."""

from kms import config
from kms.app import create_app, start_background

settings = config.from_env()
app = create_app(settings)
start_background(app.extensions["kms"], settings)
