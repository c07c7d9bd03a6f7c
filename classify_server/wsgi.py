"""`gunicorn classify_server:app`: the app each worker builds after the fork, and what a worker does when
it cannot load its models (the exit policy)."""
import os
import sys
import time

from classify_contract import tf_noise
from classify_server import settings
from classify_server.engines import ModelLoadError
from classify_server.http_api import create_app


def load_app():
    """The WSGI app; when the models cannot be loaded, one clear line, and either this worker alone exits
    (others already serve) or gunicorn stops (none does)."""
    if settings.current().engine.kind == "tf":  # a tflite worker never imports TensorFlow
        tf_noise.import_tensorflow_quietly()
    try:
        return create_app()
    except ModelLoadError as exc:
        flag = os.environ.get("CLASSIFY_MODEL_LOADED_FLAG")
        if flag and os.path.exists(flag):
            # Other workers serve the model they loaded before its files broke: only this
            # replacement gives up, and gunicorn retries it (slowly: TensorFlow imports are heavy).
            print(f"classify_server: {exc}; this worker exits, the others keep serving", file=sys.stderr, flush=True)
            time.sleep(10)
            raise SystemExit(1) from None
        # gunicorn prints this one line and stops, instead of restarting workers forever.
        from gunicorn.errors import AppImportError
        raise AppImportError(f"classify_server: {exc}") from None
