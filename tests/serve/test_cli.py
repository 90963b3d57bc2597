"""``jaxinfer serve``: argument parsing and a full run (FakeEngine) ended by SIGINT."""

from __future__ import annotations

import os
import signal
import threading

import grpc
import httpx
import pytest

from jaxinfer.cli import build_parser
from serve.cli import engine_max_num_seqs, run
from serve.protos import jaxinfer_pb2 as pb
from serve.protos import jaxinfer_pb2_grpc as pb_grpc
from tests.serve.fake_engine import FakeEngine


def test_parse_serve_options():
    args = build_parser().parse_args(["serve", "--model", "m", "--port", "0", "--grpc-port", "0", "--max-num-seqs",
                                      "8", "--max-num-batched-tokens", "512", "--max-model-len", "1024",
                                      "--max-waiting-requests", "3", "--dtype", "float32"])
    assert (args.command, args.model, args.port, args.grpc_port) == ("serve", "m", 0, 0)
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len) == (8, 512, 1024)
    assert (args.max_waiting_requests, args.dtype, args.host) == (3, "float32", "127.0.0.1")
    assert args.run is run


def test_max_num_seqs_from_engine():
    assert engine_max_num_seqs(FakeEngine(max_num_seqs=5), None) == 5
    assert engine_max_num_seqs(FakeEngine(max_num_seqs=5), 9) == 9
    assert engine_max_num_seqs(object(), None) == 64


@pytest.mark.parametrize("argv", [["serve", "--no-http"], ["serve", "--max-num-seqs", "0"]])
def test_bad_options_exit(argv):
    with pytest.raises(SystemExit):
        run(build_parser().parse_args(argv), engine=FakeEngine())


def test_serve_runs_until_sigint():
    args = build_parser().parse_args(["serve", "--port", "0", "--grpc-port", "0", "--served-model-name", "mine"])
    seen = {}

    def on_ready(addresses):
        def probe():
            try:
                r = httpx.post(addresses.http_url + "/v1/completions", json={"model": "mine", "prompt": "hi",
                                                                             "max_tokens": 3}, timeout=300)
                seen["http"] = r.status_code
                seen["models"] = httpx.get(addresses.http_url + "/v1/models", timeout=300).json()["data"][0]["id"]
                with grpc.insecure_channel(addresses.grpc_target) as ch:
                    seen["grpc"] = pb_grpc.InferenceStub(ch).Health(pb.HealthRequest(), timeout=10).ok
            finally:
                os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=probe).start()

    assert run(args, engine=FakeEngine(), on_ready=on_ready) == 0
    assert seen == {"http": 200, "models": "mine", "grpc": True}
