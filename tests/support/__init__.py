"""What the tests share, by what it is (the fixtures are in the conftest.py files):

- images: generated shape images and their folders, hand-made PNGs, encoding a PIL image;
- models: model folders written by hand (colour, sleepy, third-party graphs) and the real data of ../shared;
- processes: every real process the tests start (`Process`: gunicorn's `Server`, `GrpcServer`, a Tansu
  `Broker`, the Kafka `Stream` consumer) and retrain run as users run it;
- clients: ways to ask the service (HTTP `post`/`classify`, the in-process Flask app, gRPC requests, a Kafka
  topic's `Collector`) and comparing answers.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
