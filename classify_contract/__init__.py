"""The contract between training and serving, imported by both `retrain` and `classify_server` and by
nothing else of either: the model-folder format (model_folder), the one image preprocessing
(preprocessing), how a model.tflite is run (tflite_runtime), atomic writes (atomic), and TensorFlow's
quiet start-up (tf_noise). It imports no TensorFlow: the server's tflite workers never load it.
"""
