"""The two ways the Kafka consumer runs the model: in this process (Embedded, the inference core)
or through a running server's TensorFlow Serving REST API (Remote, no TensorFlow here).

Both answer a batch of encoded images with (model version, [top-k answer or InferenceError, one per
image]); a model server that is down or failing raises RemoteUnavailable, a model that is not available
(yet: waiting for its first version) Unavailable, and the batch is retried.
"""
import base64
import http.client
import json
import logging
import re
import urllib.parse

from classify_server.codecs import json_body
from classify_server.core import inference
from classify_server.core.inference import InferenceError
from classify_server.core.ranking import top_k
from classify_server.settings import Settings

log = logging.getLogger("classify_server.stream")


class Unavailable(RuntimeError):
    """The model cannot answer now: retry the batch later (its messages wait, none is a dead letter)."""


class RemoteUnavailable(Unavailable):
    """The model server did not answer usefully (down, 5xx, garbled): retry the batch later."""


# Codes a server answers about the images of a request, not about itself: each image is judged alone.
PER_IMAGE = {inference.EMPTY_IMAGE, inference.REQUEST_TOO_LARGE, inference.INVALID_IMAGE, inference.IMAGE_TOO_LARGE,
             inference.INVALID_INPUT, inference.TOO_MANY_IMAGES}


class Embedded:
    """The model in this process, behind the HTTP server's inference core."""

    def __init__(self, service: Settings, model: str | None = None):
        from classify_server.core.inference import Inference
        from classify_server.core.registry import load_models
        self.core = Inference(load_models(service.model, service.engine), service.limits)
        self.name = self.core.manager(model).name  # an unknown model stops here

    def describe(self):
        manager = self.core.models.get(self.name)
        latest = manager.latest
        version = f"version {latest.version}" if latest else "(waiting for its first version)"
        return f"embedded model {self.name!r} {version} from {manager.spec.base_path}"

    def resolve(self):
        """Raise InferenceError unless the model is still configured (a MODEL_CONFIG_FILE reload may remove
        it); one waiting for its first version passes, and classify() waits for it."""
        try:
            self.core.resolve(self.name)
        except InferenceError as exc:
            if not self._waiting(exc):
                raise

    def _waiting(self, exc: InferenceError) -> bool:
        """Whether `exc` says the model is still configured but has no version to serve yet: none found yet, or
        one loading (wait for it, as TF Serving does). Versions that were found and all failed to load are no
        wait: the messages are dead-lettered with the error, until a new version loads."""
        manager = self.core.models.get(self.name)
        return exc.code in (inference.MODEL_NOT_FOUND, inference.NOT_READY) and manager is not None and \
            not manager.failed

    def classify(self, images):
        """(model version, [top-k [[label, score], ...] or InferenceError, one per image])."""
        try:
            version, labels, results = self.core.classify_each(images, self.name)
        except InferenceError as exc:
            if self._waiting(exc):  # no version yet: the messages wait for one, as with a server that is down
                raise Unavailable(exc.message) from None
            return None, [exc] * len(images)  # the model went between resolve() and here: each image says so
        return version, [r if isinstance(r, InferenceError) else top_k(labels, r, self.core.limits.top_k)
                         for r in results]

    def close(self):
        pass


class Remote:
    """A running classify_server's TensorFlow Serving REST API (metadata.labels names the scores).

    Labels and version come from GET .../metadata; :predict is asked of that version explicitly,
    so a hot reload on the server (404 for the old version) makes us re-read the metadata and
    never mislabels an answer.
    """

    def __init__(self, url: str, default_model: str, top_k: int, batch_size: int, model: str | None = None,
                 timeout: float = 60):
        """`model` is asked for, else the one in `url` (.../v1/models/NAME), else `default_model` (MODEL_NAME);
        answers carry `top_k` labels (TOP_K)."""
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SystemExit(f"classify_server.stream: --remote must be an http(s) URL, got {url!r}")
        match = re.match(r"^(.*?)/v1/models/([^/:]+)", parts.path)
        self.prefix = (match.group(1) if match else parts.path).rstrip("/")
        self.name = model or (urllib.parse.unquote(match.group(2)) if match else default_model)
        self.url = f"{parts.scheme}://{parts.netloc}{self.prefix}/v1/models/{self.name}"
        self.https, self.host, self.port = parts.scheme == "https", parts.hostname, parts.port
        self.timeout, self.batch_size, self.top_k = timeout, batch_size, top_k
        self.connection = None
        self.labels = self.version = None

    def describe(self):
        return f"remote model {self.name!r} version {self.version} at {self.url}"

    def resolve(self):
        """Nothing: the server finds the model; one it does not answer for is retried as a server down."""

    def _request(self, method, path, body=None):
        """(status, parsed JSON body) over one kept-alive connection; RemoteUnavailable if none."""
        where = f"{method} {self.url}{path}"
        path = f"{self.prefix}/v1/models/{urllib.parse.quote(self.name, safe='')}{path}"
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            if self.connection is None:
                kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                self.connection = kind(self.host, self.port, timeout=self.timeout)
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                raw = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.connection.close()
                self.connection = None
                if attempt == 2:
                    raise RemoteUnavailable(f"{where}: {type(exc).__name__}: {exc}") from None
        try:
            answer = json_body.loads(raw, "the answer")  # the network's bytes: no nesting without end here either
        except InferenceError:
            answer = None
        if not isinstance(answer, dict):
            answer = {"error": raw[:200].decode(errors="replace")}
        return response.status, answer

    def refresh(self):
        status, answer = self._request("GET", "/metadata")
        if status != 200:
            raise RemoteUnavailable(f"GET {self.url}/metadata answered {status}: {answer.get('error', answer)}")
        try:
            self.labels = list(answer["metadata"]["labels"])
            self.version = int(answer["model_spec"]["version"])
        except (KeyError, TypeError, ValueError):
            raise RemoteUnavailable(f"GET {self.url}/metadata: no metadata.labels or model_spec.version "
                                    "in the answer") from None

    def _predict(self, images):
        body = json.dumps({"instances": [{"b64": base64.b64encode(data).decode("ascii")} for data in images]})
        return self._request("POST", f"/versions/{self.version}:predict", body)

    def classify(self, images):
        import numpy as np
        if self.version is None:
            self.refresh()
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            status, answer = self._predict(chunk)
            if answer.get("code") == inference.VERSION_NOT_SERVED:  # the server moved to another version: learn it
                old = self.version
                self.refresh()
                log.info("remote model version %s -> %s", old, self.version)
                if start and self.version != old:  # one version answers a whole batch: start it again
                    return self.classify(images)
                status, answer = self._predict(chunk)
            if status == 200:
                answers = self._rows(answer.get("predictions"), len(chunk))
            elif answer.get("code") in PER_IMAGE and len(chunk) > 1:  # which image? ask for each alone
                if answer["code"] == inference.TOO_MANY_IMAGES:
                    log.warning("%s; lower --batch-size to the server's MAX_PARTS", answer.get("error"))
                answers = [self.classify_one(data) for data in chunk]
            elif answer.get("code") in PER_IMAGE:
                answers = [self._rejection(answer)]
            else:
                raise RemoteUnavailable(f"POST {self.url}/versions/{self.version}:predict answered "
                                        f"{status}: {answer.get('error', answer)}")
            for row in answers:
                results.append(row if isinstance(row, InferenceError)
                               else top_k(self.labels, np.asarray(row, dtype=np.float32), self.top_k))
        return self.version, results

    def classify_one(self, data):
        status, answer = self._predict([data])
        if status == 200:
            return self._rows(answer.get("predictions"), 1)[0]
        if answer.get("code") in PER_IMAGE:
            return self._rejection(answer)
        raise RemoteUnavailable(f"POST {self.url}/versions/{self.version}:predict answered "
                                f"{status}: {answer.get('error', answer)}")

    def _rows(self, rows, count):
        if not (isinstance(rows, list) and len(rows) == count
                and all(isinstance(r, list) and len(r) == len(self.labels) for r in rows)):
            raise RemoteUnavailable(f"{self.url}: :predict answered no {count} x {len(self.labels)} predictions")
        return rows

    @staticmethod
    def _rejection(answer):
        """The server's error for a request of one image, as the embedded core words it (no "image 1")."""
        message = re.sub(r"^image 1(: | is )", lambda m: "" if m.group(1) == ": " else "the image is ",
                         str(answer.get("error", answer)))
        return InferenceError(answer["code"], message)

    def close(self):
        if self.connection is not None:
            self.connection.close()
