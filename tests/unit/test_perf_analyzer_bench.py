"""bench.guards.perf_analyzer_bench reads perf_analyzer's -f CSV (its real output, 2.60, against this server's
gRPC) and writes the input data perf_analyzer sends."""
import base64
import json
import struct

import pytest

from bench.guards.perf_analyzer_bench import input_data, parse_csv

CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,78.7635,13,1259,6,2093,9230,6,4,12354,13348,14801,19530
2,88.4213,11,3544,5,2695,16293,6,4,21355,27463,30988,47035
"""


def test_parse_csv_reads_each_concurrency_in_milliseconds():
    assert parse_csv(CSV) == [{"concurrency": 1, "rps": 78.7635, "p50_ms": 12.354, "p99_ms": 19.53},
                              {"concurrency": 2, "rps": 88.4213, "p50_ms": 21.355, "p99_ms": 47.035}]


def test_parse_csv_without_a_measurement_says_so():
    with pytest.raises(ValueError, match="no measurement"):
        parse_csv(CSV.splitlines()[0] + "\n")


def test_input_data_is_one_length_prefixed_element(tmp_path):
    with open(input_data(b"\xff\xd8jpeg", str(tmp_path))) as f:
        data = json.load(f)
    (element,) = data["data"]
    assert base64.b64decode(element["images"]["b64"]) == struct.pack("<I", 6) + b"\xff\xd8jpeg"
