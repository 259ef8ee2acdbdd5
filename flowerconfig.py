"""Flower's configuration file: Flower reads `flowerconfig.py` from the working directory when
`celery -A config flower` starts (the Procfile, the image and the manifests start it from the
project root). Its options come from `config.flower`; the checks there stop Flower from starting
without authentication outside debug."""

import os

from django.conf import settings

from config.flower import flower_options

globals().update(flower_options(os.environ, debug=settings.DEBUG, var_dir=settings.VAR_DIR))
