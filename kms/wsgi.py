"""WSGI entry point for gunicorn: ``kms.wsgi:app``. Loaded in each worker (no preload),
so the PKCS#11 module is initialised after fork; the background loops run per worker.

Once the app is built, its objects (modules, the Flask app, SQLAlchemy metadata) are
frozen out of the garbage collector, so a full collection walks only what requests made
since: collections of the whole app would otherwise stall single requests (figures:
docs/performance.md)."""

import gc

from kms import config
from kms.app import create_app, start_background

settings = config.from_env()
app = create_app(settings)
start_background(app.extensions["kms"], settings)
gc.collect()
gc.freeze()
