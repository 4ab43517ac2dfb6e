"""What the server shows of itself: refused calls counted and logged without the token, a metrics endpoint on
loopback that honours the token, each metric family's samples together, errors of bounded size, and a reply
over the message limit refused (and counted) as such."""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.error
import urllib.request

import grpc
import pytest
import torch
from service_support import store_config

from kvcache import RemoteClient, SequenceNotFound
from kvcache.clients.inprocess import InProcessClient
from kvcache.errors import MessageTooLarge
from kvcache.service.log_fields import LogFields
from kvcache.service.metrics import prometheus_text
from kvcache.service.serve_cli import JsonLines
from kvcache.service.server import MAX_ERROR_TEXT, KVCacheServicer, Server, ServerOptions
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire import kvcache_pb2_grpc as pb_grpc
from kvcache.wire.codec import to_wire

pytestmark = pytest.mark.service
TOKEN = "s3cret-token-for-tests"


@contextlib.contextmanager
def running(pages=256, **options):
    server = Server(store_config(device_pages=pages), ServerOptions(port=0, workers=4, grace_seconds=1, **options))
    server.start()
    try:
        yield server
    finally:
        server.drain_and_stop()


def _scrape(server, token=None) -> str:
    port = server.metrics_http.server_address[1]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.read().decode()


def test_refused_calls_are_counted_and_logged_without_the_token_and_metrics_need_it(caplog):
    with running(token=TOKEN, metrics_port=0) as server:
        assert server.metrics_http.server_address[0] == "127.0.0.1"  # loopback unless asked otherwise
        stub = pb_grpc.KVCacheStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        with caplog.at_level(logging.WARNING, logger="kvcache.service.server"):
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as excinfo:
                    stub.Describe(pb.SequenceRef(seq_id="x"), metadata=(("authorization", "Bearer wrong"),),
                                  timeout=10)
                assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
        refused = [json.loads(r.getMessage()) for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == 3 and all(r == {"rpc": "Describe", "code": "UNAUTHENTICATED",
                                               "refused": "missing or wrong bearer token"} for r in refused)
        assert all("wrong" not in r.getMessage().replace("missing or wrong", "") for r in caplog.records)
        with pytest.raises(urllib.error.HTTPError) as http:
            _scrape(server)
        assert http.value.code == 401
        text = _scrape(server, TOKEN)
        assert 'kvcache_rpc_errors_total{rpc="Describe"} 3.0' in text
        assert 'kvcache_rpc_status_total{code="UNAUTHENTICATED",rpc="Describe"} 3.0' in text


def test_each_metric_family_is_one_block_after_its_type_line():
    text = prometheus_text({"pool": {"free": 3, "used": 1}, "methods": {"dense": {"calls": 2, "bytes_read": 9,
                            "seconds": 0.5}, "sparq": {"calls": 1, "bytes_read": 4, "seconds": 0.1}},
                            "rpcs": {"Attend": {"calls": 3, "errors": 0, "seconds": 0.2}},
                            "batching": {"requests": 5}, "bytes_moved": {"device<-host": 7}})
    seen, current = set(), None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            current = line.split()[2]
            assert current not in seen, f"{current} appears twice"
            seen.add(current)
        else:
            assert line.split("{")[0] == current, f"{line!r} is outside its family's block"
    assert 'kvcache_bytes_moved_total{direction="device<-host"} 7.0' in text


def test_call_latency_is_a_histogram_per_rpc_and_attention_method_with_counts_per_status():
    with running(metrics_port=0) as server, RemoteClient(f"127.0.0.1:{server.port}", timeout=10, retries=0,
                                                         data_plane="grpc") as client:
        sid = client.create().seq_id
        client.append(sid, torch.randn((2, 9, 2, 16)), torch.randn((2, 9, 2, 16)))
        for _ in range(3):
            client.attend([sid], 0, torch.randn((1, 4, 16)), "quest", {"top_pages": 1})
        with pytest.raises(SequenceNotFound):
            client.describe("nope")
        text = _scrape(server)
        assert 'kvcache_rpc_duration_seconds_count{method="quest",rpc="AttendStream"} 3.0' in text
        assert 'kvcache_rpc_status_total{code="NOT_FOUND",rpc="Describe"} 1.0' in text
        assert 'kvcache_rpc_status_total{code="OK",rpc="Append"} 1.0' in text


def test_coverage_estimates_and_dense_fallbacks_are_scraped_per_method_and_layer():
    with running(metrics_port=0) as server, RemoteClient(f"127.0.0.1:{server.port}", timeout=10, retries=0) as client:
        sid = client.create().seq_id
        client.append(sid, torch.randn((2, 9, 2, 16)), torch.randn((2, 9, 2, 16)))
        got = client.attend([sid], 1, torch.randn((1, 4, 16)), "quest", {"top_pages": 1, "min_coverage": 1.0})
        assert got.fallback.tolist() == [True]
        estimate = float(got.coverage.min())
        text = _scrape(server)
        assert 'kvcache_attention_coverage_count{layer="1",method="quest"} 1.0' in text
        assert 'kvcache_attention_coverage_bucket{layer="1",le="1.0",method="quest"} 1.0' in text
        assert 'kvcache_attention_fallbacks_total{layer="1",method="quest"} 1.0' in text
        entry = client.stats()["coverage"]["quest"][1]
        assert entry["count"] == 1 and entry["fallbacks"] == 1 and entry["sum"] == pytest.approx(estimate)


def test_an_error_about_a_huge_sequence_id_stays_small():
    with running() as server, RemoteClient(f"127.0.0.1:{server.port}", timeout=10, retries=0) as client:
        with pytest.raises(SequenceNotFound) as excinfo:
            client.describe("f" * 1_000_000)
        assert len(str(excinfo.value)) < MAX_ERROR_TEXT


def test_a_fetch_reply_over_the_message_limit_is_refused_and_counted_as_an_error():
    with (running(pages=1300, max_message_mb=1) as server,
          RemoteClient(f"127.0.0.1:{server.port}", timeout=10, retries=0, max_message_mb=4) as client):
        sid = client.create().seq_id
        n = 5000  # rows of 2 kv heads x 16 float32: 640 kB of keys and as much of values, over 1 MB
        for _ in range(0, n, 1000):
            client.append(sid, torch.randn((2, 1000, 2, 16)), torch.randn((2, 1000, 2, 16)))
        with pytest.raises(MessageTooLarge, match="message limit"):
            client.fetch(sid, 0, "rows", torch.arange(n).expand(2, n))
        assert server.servicer.metrics.snapshot()["Fetch"]["errors"] == 1
        client.fetch(sid, 0, "rows", torch.arange(100).expand(2, 100))  # a smaller one goes through


def test_every_attend_stream_request_is_logged_like_a_unary_call(caplog):
    with running() as server, RemoteClient(f"127.0.0.1:{server.port}", timeout=10, retries=0,
                                           data_plane="grpc") as client:
        sid = client.create().seq_id
        client.append(sid, torch.randn((2, 9, 2, 16)), torch.randn((2, 9, 2, 16)))
        with caplog.at_level(logging.INFO, logger="kvcache.service.server"):
            client.attend([sid], 1, torch.randn((1, 4, 16)), "window", {"window": 3})
            with pytest.raises(Exception):  # noqa: B017 (the class is the protocol's, the log line is the point)
                client.attend([sid], 1, torch.randn((1, 4, 16)), "window", {"window": -3})
        lines = [json.loads(r.getMessage()) for r in caplog.records if '"AttendStream"' in r.getMessage()]
        assert [(x["code"], x["method"], x["layer"], x["batch"]) for x in lines] == [
            ("OK", "window", 1, 1), ("INVALID_ARGUMENT", "window", 1, 1)]


def test_a_stream_answer_is_logged_once_sent_and_an_error_before_it_is_sent(caplog):
    servicer = KVCacheServicer(InProcessClient(store_config()))
    sid = servicer.client.create().seq_id
    servicer.client.append(sid, torch.randn((2, 9, 2, 16)), torch.randn((2, 9, 2, 16)))
    ok = pb.AttendRequest(seq_ids=[sid], layer=0, q=to_wire(torch.randn((1, 4, 16))), method="dense")
    bad = pb.AttendRequest(seq_ids=["nope"], layer=0, q=to_wire(torch.randn((1, 4, 16))), method="dense")
    with caplog.at_level(logging.INFO, logger="kvcache.service.server"):
        response, finish = servicer.answer_streamed(ok, "peer", "AttendStream")
        assert not response.error_code and not caplog.records  # counted already, logged once sent
        assert servicer.metrics.snapshot()["AttendStream"]["calls"] == 1
        finish()
        response, finish = servicer.answer_streamed(bad, "peer", "AttendStream")
        assert response.error_class == "SequenceNotFound" and finish is None
    lines = [json.loads(r.getMessage()) for r in caplog.records]
    assert [(x["rpc"], x["code"], x["layer"], x["batch"]) for x in lines] == [
        ("AttendStream", "OK", 0, 1), ("AttendStream", "NOT_FOUND", 0, 1)]


def test_json_lines_write_log_fields_as_given_and_any_other_message_as_before():
    formatter = JsonLines()

    def line(msg) -> dict:
        record = logging.LogRecord("kvcache.service.server", logging.INFO, __file__, 1, msg, (), None)
        return json.loads(formatter.format(record))

    fields = LogFields(rpc="AttendStream", code="OK", ms=1.5, method='a "quoted" name')
    assert json.loads(str(fields)) == fields  # the message's text, as caplog and other handlers see it
    assert {k: line(fields)[k] for k in fields} == fields
    assert line(json.dumps({"event": "listening", "port": 5}))["port"] == 5
    assert line("plain text")["msg"] == "plain text"
