"""WSGI entry point for gunicorn: ``kms.wsgi:app``. Loaded in each worker (no preload),
so the PKCS#11 module is initialised after fork; the background loops run per worker.

Once the app is built, its objects (modules, the Flask app, SQLAlchemy metadata, about
120,000 in all) are frozen out of the garbage collector: a full collection no longer
walks them. A full collection of them took about 60 ms on the development VM, often
enough after batch traffic to set the p99 latency of single requests."""

import gc

from kms import config
from kms.app import create_app, start_background

settings = config.from_env()
app = create_app(settings)
start_background(app.extensions["kms"], settings)
gc.collect()
gc.freeze()
