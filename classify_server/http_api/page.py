"""The browser page: GET / shows a form to pick or drop an image and see its top labels, with the picked
model's version, classes and accuracy, and a link to its training report.

The report (retrain's report.html and its pictures) is served read-only from the served version's own
folder: /models/NAME/versions/V/report.html and /models/NAME/versions/V/report/FILE, nothing else there.
"""
from flask import Blueprint, abort, current_app, send_from_directory

from classify_contract import model_folder
from classify_server.core.inference import Inference


def blueprint(core: Inference) -> Blueprint:
    """This protocol's routes, handed the inference core."""
    bp = Blueprint("page", __name__)

    @bp.get("/")
    def index():
        return current_app.send_static_file("index.html")

    def _model_dir(name, version):
        with core.servable(name, version) as servable:
            return servable.engine.model_dir

    @bp.get(f"/models/<name>/versions/<int:version>/{model_folder.REPORT}")
    def report(name, version):
        return send_from_directory(_model_dir(name, version), model_folder.REPORT, max_age=0)

    @bp.get(f"/models/<name>/versions/<int:version>/{model_folder.REPORT_FILES}/<path:filename>")
    def report_file(name, version, filename):
        if not filename.endswith((".png", ".jpg")):
            abort(404)
        # send_from_directory refuses any path that leaves the folder (.., absolute paths).
        return send_from_directory(f"{_model_dir(name, version)}/{model_folder.REPORT_FILES}", filename)

    return bp
