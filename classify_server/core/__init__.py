"""The inference core: what happens to an image, whichever protocol brought it.

    inference     Inference: choose model and version, enforce the limits, decode with the shared
                  preprocessing, run an engine, rank, time; one typed error code (InferenceError)
    registry      the models served (one, or MODEL_CONFIG_FILE's list)
    versions      one model's versions: version policy, labels, hot reload
    model_config  TF Serving's model_config_list file
    ranking       the best labels of a row of scores
    statistics    counts and times of each model version's requests (Prometheus counters, summed over workers)

It reaches models only through classify_server.engines; the adapters reach it only through Inference.
"""
