"""gunicorn's settings for `gunicorn classify_server:app` started in this folder (gunicorn reads
./gunicorn.conf.py). They live in the package, so that they apply from any folder too:

    gunicorn -c python:classify_server.http_server.gunicorn_config classify_server:app
"""
from classify_server.http_server.gunicorn_config import *  # noqa: F401,F403
