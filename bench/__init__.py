"""Benchmarks, run from the repo root as modules: `.venv/bin/python -m bench.guards.serve_bench --help`.

    bench/_common.py        helpers shared by every script: tables, child processes, /proc readings
    bench/perf_analyzer_env.sh  PyPI's perf_analyzer made to run here (Debian 13's loader on a Debian 12 host)
    bench/abuse.py          guard: slow clients and a crowd against a running server (tests import it)
    bench/guards/           re-run to catch regressions; each one's figures are in BENCHMARKS.md
        serve_bench.py      the server under wrk against its ceiling and the alternatives
        ab_serve.py         two commits' serving path side by side, alternating
        engine_bench.py     TensorFlow and LiteRT engines, speed and accuracy, in-process
        protocol_bench.py   one image through every protocol (multipart, TF Serving, V2, gRPC)
        perf_analyzer_bench.py  Triton's perf_analyzer on V2 HTTP and gRPC beside wrk's multipart
        stage_bench.py      CPU per stage of one request, in-process
        http_parsers.py     llhttp (the reader's) against h11, per request
        model_memory.py     resident memory per model in a worker
        stream_bench.py     Kafka: the model embedded in the consumer against a model server
        retrain_bench.py    retrain's wall time, bottleneck throughput and accuracy
        soak.py             minutes of steady load: errors, latency, worker memory
    bench/studies/          one-off work that chose a setting, or compared the alternatives
        cv.py               retrain's settings by k-fold cross-validation
        quantization_cv.py  what each quantization costs in accuracy, k-fold
        alt_flask_predict.py  Flask + keras model.predict: serve_bench's part d
        bentoml_service.py  BentoML over the same graph.pb: serve_bench's part e

The history of every run is docs/benchmark-history.md.
"""
