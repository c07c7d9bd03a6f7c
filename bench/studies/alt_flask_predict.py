"""Study: the Flask + model.predict alternative serve_bench's part d compares with; not the service.

What a typical user writes: Flask, a Keras model, and `model.predict` per request.

A comparison point for bench/guards/serve_bench.py, not part of the service. It builds
the same Keras classifier that retrain exports (retrain.backbones + retrain.train,
random weights seeded as `--weights none` seeds them, so the cost per image is the
same), decodes uploads with the same classify_contract.preprocessing.decode_image, and calls
keras.Model.predict on each request, as tutorials do. Serve it like

    MODEL_DIR=model PYTHONPATH=$PWD gunicorn -w 2 --chdir bench/studies alt_flask_predict:app

from the repo root (bench/studies has no gunicorn.conf.py, so gunicorn's own defaults apply).

MODEL_DIR is read for labels.txt and model.json (architecture) only.
"""
import json
import os

import numpy as np
from flask import Flask, jsonify, request

from classify_contract.preprocessing import decode_image
from retrain import backbones, train

MODEL_DIR = os.environ.get("MODEL_DIR", "model")
with open(os.path.join(MODEL_DIR, "labels.txt"), encoding="utf-8") as f:
    LABELS = [line.strip() for line in f if line.strip()]
with open(os.path.join(MODEL_DIR, "model.json"), encoding="utf-8") as f:
    ARCH = backbones.ARCHITECTURES[json.load(f).get("architecture", "inception_v3")]

backbone = backbones.build_backbone(ARCH, "none")  # seeds Keras with 0 first
model = train.build_classifier(backbone, train.build_head(backbone.output_shape[-1], len(LABELS)))

app = Flask(__name__)


@app.get("/readyz")
def readyz():
    return jsonify(status="ready")


@app.post("/")
def classify():
    image = decode_image(request.files["data"].read(), (ARCH.size, ARCH.size))
    probabilities = model.predict(np.expand_dims(image, 0))[0]
    order = np.argsort(-probabilities)[:5]
    return jsonify([[LABELS[i], float(probabilities[i])] for i in order])
