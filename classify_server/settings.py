"""Configuration from the environment: every setting is an environment variable."""
import os


def _int(name, default):
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise SystemExit(f"error: environment variable {name}={value!r} must be an integer") from None


def from_env():
    return {
        "MODEL_DIR": os.environ.get("MODEL_DIR", "model"),
        "MODEL_NAME": os.environ.get("MODEL_NAME", "model"),
        # Seconds between looks for a new numbered version (0: never).
        "MODEL_POLL_SECONDS": _int("MODEL_POLL_SECONDS", 10),
        "MAX_UPLOAD_BYTES": _int("MAX_UPLOAD_BYTES", 10 * 1024 * 1024),
        "MAX_IMAGE_PIXELS": _int("MAX_IMAGE_PIXELS", 40_000_000),
        "MAX_PARTS": _int("MAX_PARTS", 32),
        "TOP_K": _int("TOP_K", 5),
        # Corrections from users are stored here when set (POST /feedback).
        "FEEDBACK_DIR": os.environ.get("FEEDBACK_DIR", ""),
        "FEEDBACK_PER_MINUTE": _int("FEEDBACK_PER_MINUTE", 30),
        # Proxies (nginx, an ingress) in front whose X-Forwarded-For is trusted for
        # the client's address (rate limits, logs); 0 trusts none.
        "TRUSTED_PROXIES": _int("TRUSTED_PROXIES", 0),
        # TensorFlow threads of this worker's session; gunicorn.conf.py sets them so
        # that workers x threads matches the cores (0 lets TensorFlow decide).
        "TF_INTRA_OP_THREADS": _int("TF_INTRA_OP_THREADS", 0),
        "TF_INTER_OP_THREADS": _int("TF_INTER_OP_THREADS", 0),
        # Dynamic batching of concurrent requests in a worker (0: off). Off by default: on
        # this CPU it won in some benchmark runs and lost in others (BENCHMARKS.md).
        "BATCH_MAX_SIZE": _int("BATCH_MAX_SIZE", 0),
        "BATCH_TIMEOUT_MS": _int("BATCH_TIMEOUT_MS", 5),
    }


def graph_overrides():
    """label_image.py's flags as environment variables, for graphs without a sidecar."""
    names = {"INPUT_LAYER": str, "OUTPUT_LAYER": str, "INPUT_HEIGHT": int, "INPUT_WIDTH": int,
             "INPUT_MEAN": float, "INPUT_STD": float}
    overrides = {}
    for name, kind in names.items():
        value = os.environ.get(name, "").strip()
        if value:
            try:
                overrides[name.lower()] = kind(value)
            except ValueError:
                raise SystemExit(f"error: environment variable {name}={value!r} must be a {kind.__name__}") from None
    return overrides
