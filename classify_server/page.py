"""The browser page: GET / shows a form to pick or drop an image and see its top labels."""
from flask import Blueprint, current_app

bp = Blueprint("page", __name__)


@bp.get("/")
def index():
    return current_app.send_static_file("index.html")
