"""What two protocols' adapters share of one wire format: V2 tensors (v2_tensors), TF Serving's signature
(tfserving). Adapters import these, never each other."""
