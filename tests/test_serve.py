"""Endpoints on real Ray Serve (a free port, the session's cluster) and real MLflow, over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import ended, free_port, last_json
from deepyard import tracking
from deepyard.serve.client import auth_headers

pytestmark = pytest.mark.slow

PORT_SETTINGS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")

TINY = """
kind: train
name: serve_tiny
data: {name: digits, max_train_samples: 300}
model: {name: mlp, params: {hidden_sizes: [16]}}
train: {epochs: 1, batch_size: 32}
register: {model_name: serve-mlp}
"""


@pytest.fixture(scope="module")
def endpoint(ray_cluster, tmp_path_factory):
    """Two registered versions of a tiny digits model; version 1 is @champion and deployed."""
    from ray import serve
    from typer.testing import CliRunner

    from deepyard.cli import app
    from deepyard.runners import deploy
    from deepyard.serve.options import EndpointOptions

    spec = tmp_path_factory.mktemp("serve") / "tiny.yaml"
    spec.write_text(TINY)
    runner = CliRunner()
    for lr in ("0.01", "0.001"):
        result = runner.invoke(app, ["run", str(spec), "--json", "--set", f"optim.lr={lr}"])
        assert result.exit_code == 0, result.stderr
    tracking.set_alias("serve-mlp", "champion", "1")
    port = free_port()
    options = EndpointOptions(model="serve-mlp", follow_alias_s=0.3, max_instances=16, max_body_bytes=64 * 1024,
                              num_cpus=0.5, body_timeout_s=3)
    (info,) = deploy.start([options], host="127.0.0.1", port=port)
    yield {"url": info["url"], "options": options, "port": port}
    serve.shutdown()


def post(url: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{url}/predict", content=content, timeout=30,
                      headers={"Content-Type": "application/json", **(headers or {})})


def test_predictions_over_http_equal_the_models_own(endpoint):
    module, metadata = tracking.load_model("serve-mlp", "1")
    example = tracking.input_example("serve-mlp", "1")
    import torch

    with torch.inference_mode():
        offline = module(torch.as_tensor(example)).numpy()
    answer = post(endpoint["url"], {"instances": example.tolist()})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "serve-mlp" and body["version"] == "1"
    served = np.array([[p["probabilities"][name] for name in metadata["class_names"]] for p in body["predictions"]])
    np.testing.assert_allclose(served, offline, rtol=1e-5, atol=1e-6)
    assert [p["label"] for p in body["predictions"]] == [metadata["class_names"][i] for i in offline.argmax(1)]
    flat = post(endpoint["url"], {"instances": [example[0].reshape(-1).tolist()], "top_k": 2}).json()
    assert flat["predictions"][0]["label"] == body["predictions"][0]["label"]
    assert len(flat["predictions"][0]["top_k"]) == 2


def png(width: int, height: int, mode: str = "L") -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height), color=128).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_png_instances_for_image_models(endpoint):
    import torch

    answer = post(endpoint["url"], {"instances": [png(8, 8)]})
    assert answer.status_code == 200, answer.text
    # grey 128 of 255 is 8.03 in the digits' own 0-16 pixel units
    module, metadata = tracking.load_model("serve-mlp", answer.json()["version"])
    assert metadata["pixel_max"] == 16.0
    with torch.inference_mode():
        expected_probabilities = module(torch.full((1, 1, 8, 8), 128 * 16 / 255)).numpy()[0]
    served = [answer.json()["predictions"][0]["probabilities"][str(i)] for i in range(10)]
    np.testing.assert_allclose(served, expected_probabilities, rtol=1e-5, atol=1e-6)
    wrong = post(endpoint["url"], {"instances": [png(28, 28)]})
    assert wrong.status_code == 400 and "PNG is 28x28 pixels; this model takes 8x8" in wrong.json()["error"]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 400, "body is not valid JSON"),
    ({"inputs": [[0] * 64]}, 400, 'expected a JSON object {"instances": [...]}'),
    ({"instances": []}, 400, '"instances" is empty'),
    ({"instances": [[0] * 63]}, 400, "instances[0]: shape [63] (63 numbers); each instance: 1x8x8 numbers"),
    ({"instances": [["a"] * 64]}, 400, "instances[0]: not an array of numbers"),
    ({"instances": [[0] * 64, [0] * 10]}, 400, "instances[1]: shape [10]"),
    ('{"instances": [[' + ",".join(["NaN"] * 64) + "]]}", 400, "instances[0]: NaN or infinity"),
    ('{"instances": [[' + ",".join(["Infinity"] * 64) + "]]}", 400, "instances[0]: NaN or infinity"),
    ({"instances": ["not-base64-png!"]}, 400, "instances[0]: a string that is not a base64-encoded PNG image"),
    ({"instances": [base64.b64encode(b"GIF89a....").decode()]}, 400, "not a base64-encoded PNG"),
    ({"instances": [[0] * 64] * 17}, 413, "17 instances is over this endpoint's limit of 16"),
    ({"instances": [[0] * 64], "top_k": 0}, 400, "top_k must be a positive integer"),
    ({"instances": "everything"}, 400, '"instances" must be a list'),
    ({"instances": [[0] * 63 + [True]]}, 400, "instances[0]: true/false where numbers are expected"),
    # what the JSON parser cannot take were 500s
    (b"[" * 20_000 + b"]" * 20_000, 400, "body is nested too deeply"),
    (b'{"instances": [[' + b"9" * 5000 + b"]]}", 400, "body is not valid JSON (Exceeds the limit (4300 digits)"),
    (b'{"instances": ' + b"[" * 200 + b"0" + b"]" * 200 + b"}", 400, "instances[0]: not an array of numbers"),
    (b"\xff\xfe{}", 400, "body is not valid JSON"),
    ('{"instances": [[1' + "0" * 400 + "," + ",".join(["0"] * 63) + "]]}", 400,
     "instances[0]: not an array of numbers"),  # (an integer past float64's range was a 500)
])
def test_bad_input_gets_a_4xx_and_the_endpoint_keeps_answering(endpoint, body, status, message):
    answer = post(endpoint["url"], body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert post(endpoint["url"], {"instances": [[0] * 64]}).status_code == 200


def test_oversized_body_is_refused(endpoint):
    answer = post(endpoint["url"], {"instances": [[0.123456789] * 64] * 200})
    assert answer.status_code == 413 and "over the limit of 65536" in answer.json()["error"]


def stalled_client(port: int, path: str) -> socket.socket:
    """A client that sends its headers and the start of its body, then nothing more (a slowloris)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 1000\r\n\r\n{{\"instances\": [[".encode())
    return sock


def read_reply(sock: socket.socket) -> str:
    """One HTTP response: its headers, then content-length bytes (the proxy may keep the connection)."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(4096)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.split(b":", 1) for line in head.lower().split(b"\r\n")[1:])
    length = int(headers[b"content-length"])
    while len(body) < length and (chunk := sock.recv(4096)):
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_clients_that_never_finish_their_body_cannot_stall_the_endpoint(endpoint):
    """More stalled bodies than the replica has request slots (max_ongoing_requests): each is cut off
    with a 408, and the healthy clients among them are answered."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlparse

    path = urlparse(endpoint["url"]).path + "/predict"
    stalled = [stalled_client(endpoint["port"], path) for _ in range(endpoint["options"].max_ongoing_requests + 20)]
    try:
        time.sleep(1)  # they reach the replica and wait there for the rest of their bodies
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(endpoint["url"], {"instances": [[0] * 64]}), range(16)))
        assert [answer.status_code for answer in answers] == [200] * 16
        replies = [read_reply(sock) for sock in stalled[:3] + stalled[-3:]]
        assert all(reply.startswith("HTTP/1.1 408") and "did not arrive within" in reply for reply in replies), replies
        # the last ones came while max_waiting_bodies were waiting already: they had the short grace
        assert all("waiting on many slow clients" in reply for reply in replies[-3:]), replies[-3:]
    finally:
        for sock in stalled:
            sock.close()
    assert post(endpoint["url"], {"instances": [[0] * 64]}).status_code == 200


def test_haproxy_stats_and_metrics_listen_only_where_the_endpoint_does(endpoint):
    """The endpoint is on 127.0.0.1: so are HAProxy's stats page and Prometheus metrics (Ray binds them
    on every interface; deepyard's wrapper, serve/haproxy.py, moves them)."""
    import os

    import ray

    address = ray.util.get_node_ip_address()
    if address.startswith("127."):
        pytest.skip("this machine has no address but loopback to try")
    for port in (int(os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", 8404)),
                 int(os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT", 9101))):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=5).close()


def test_haproxy_keeps_its_files_in_a_folder_of_the_homes_own(endpoint):
    """Config, admin socket, server state and the per-request metrics socket: under the folder
    cluster.serve_env gives this DEEPYARD_HOME, none in a /tmp folder shared by every user."""
    import os
    import stat

    import ray

    from deepyard.cluster import serve_env

    env = serve_env()
    folder = Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
    node = ray.get_runtime_context().get_node_id()
    for key in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH",
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE"):
        assert Path(env[key]).parent == folder, key
        assert os.environ[key] == env[key], key  # what this session's cluster started with
    metrics_socket = folder / node / "metrics.sock"
    assert stat.S_ISSOCK(metrics_socket.stat().st_mode)  # bound by Serve's HAProxy manager
    assert stat.S_ISSOCK((folder / node / "admin.sock").stat().st_mode)


def test_metadata_health_and_openapi(endpoint):
    metadata = httpx.get(f"{endpoint['url']}/", timeout=10).json()
    assert metadata["task"] == "classification" and metadata["input_shape"] == [1, 8, 8]
    assert metadata["alias"] == "champion" and "test_accuracy" in metadata["metrics"]
    assert httpx.get(f"{endpoint['url']}/healthz", timeout=10).json()["status"] == "ok"
    schema = httpx.get(f"{endpoint['url']}/openapi.json", timeout=10).json()
    predict = next(p for path, p in schema["paths"].items() if path.endswith("/predict"))
    assert "instances" in predict["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]


def test_the_open_inference_protocol_through_tritons_own_client(endpoint):
    """KServe v2 as Triton's HTTP client speaks it, unchanged: binary tensors by default, JSON when asked."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(f"127.0.0.1:{endpoint['port']}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("serve-mlp") and client.is_model_ready("serve-mlp", "1")
    assert not client.is_model_ready("serve-mlp", "7") and not client.is_model_ready("no-such-model")
    metadata = client.get_model_metadata("serve-mlp")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert {o["name"] for o in metadata["outputs"]} == {"probabilities", "label"}

    module, logged = tracking.load_model("serve-mlp", "1")
    example = tracking.input_example("serve-mlp", "1").astype(np.float32)
    import torch

    with torch.inference_mode():
        offline = module(torch.as_tensor(example)).numpy()
    for binary in (True, False):
        tensor = triton.InferInput("input", list(example.shape), "FP32")
        tensor.set_data_from_numpy(example, binary_data=binary)
        asked = None if binary else [triton.InferRequestedOutput(name, binary_data=False)
                                     for name in ("probabilities", "label")]
        result = client.infer("serve-mlp", [tensor], outputs=asked, model_version="1", request_id="r-1")
        np.testing.assert_allclose(result.as_numpy("probabilities"), offline, rtol=1e-5, atol=1e-6)
        labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
        assert labels == [logged["class_names"][i] for i in offline.argmax(1)]
        response = result.get_response()
        assert response["model_name"] == "serve-mlp" and response["model_version"] == "1" and response["id"] == "r-1"

    wrong = triton.InferInput("input", [1, 63], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 63), np.float32))
    with pytest.raises(InferenceServerException, match=r"input shape \[1, 63\]: this model takes 'input': FP32"):
        client.infer("serve-mlp", [wrong])
    with pytest.raises(InferenceServerException, match="version '7' is not served here"):
        client.infer("serve-mlp", [tensor], model_version="7")


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v2/models/serve-mlp/infer", b"{not json", 400, "body is not valid JSON"),
    ("/v2/models/serve-mlp/infer", {"inputs": []}, 400, "0 inputs; this model takes one, 'input': FP32 [-1, 1, 8, 8]"),
    ("/v2/models/serve-mlp/infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                                                "data": [0] * 64}]}, 400, "holds 128 elements, the data has 64"),
    ("/v2/models/serve-mlp/infer", {"inputs": [{"name": "input", "datatype": "FP8", "shape": [1, 64],
                                                "data": [0] * 64}]}, 400, "input datatype 'FP8'"),
    ("/v2/models/serve-mlp/infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                "data": ["a"] * 64}]}, 400, "not all numbers"),
    ("/v2/models/serve-mlp/infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                "data": [0] * 64}], "outputs": [{"name": "logits"}]},
     400, "no output 'logits'; this model's outputs: probabilities, label"),
    ("/v2/models/nope/infer", {"inputs": []}, 404, "no model 'nope' is deployed here"),
    ("/v2/models/serve-mlp/infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [10**2200, 10**2200],
                                                "data": [1]}]}, 400, "input shape [1000"),  # (was a 500)
    ("/v2/models/serve-mlp/infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2**20, 2**20],
                                                "data": [1]}]}, 413, "holds more than 268435456 elements"),
    ("/v1/models/serve-mlp:predict", {"instances": [[0] * 63]}, 400, "instances[0]: shape [63]"),
    ("/v1/models/serve-mlp:predict", b"[" * 20_000, 400, "nested too deeply"),
])
def test_protocol_paths_answer_bad_input_with_a_4xx(endpoint, path, body, status, message):
    base = f"http://127.0.0.1:{endpoint['port']}"
    content = body if isinstance(body, bytes) else json.dumps(body)
    answer = httpx.post(base + path, content=content, timeout=30)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


@pytest.mark.parametrize(("schema_at", "path"), [
    ("/models/serve-mlp", "/predict"),
    ("", "/v2/models/{name}/infer"),
    ("", "/v2/models/{name}/versions/{version}/infer"),
    ("", "/v1/models/{name}:predict"),
])
def test_bodies_generated_from_the_openapi_schema_never_get_a_5xx(endpoint, schema_at, path):
    """A property-based fuzzer (schemathesis, from each route's own OpenAPI schema): no generated
    body, header or path parameter is a server error, and the endpoint keeps answering."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    base = f"http://127.0.0.1:{endpoint['port']}{schema_at}"
    operation = schemathesis.openapi.from_url(f"{base}/openapi.json")[path]["POST"]
    served = []

    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def fuzz(case):
        if "name" in (case.path_parameters or {}) and len(served) % 2 == 0:
            case.path_parameters = {**case.path_parameters, "name": "serve-mlp"}  # half of them reach the model
        response = case.call(base_url=base, timeout=30)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
        served.append(response.status_code)

    fuzz()
    assert len(served) >= 50 and post(endpoint["url"], {"instances": [[0] * 64]}).status_code == 200


def test_near_valid_bodies_never_get_a_5xx(endpoint):
    """Schema-driven bodies rarely get past the first check; these have the right shape and hostile
    values (integers past a float's range were a 500), for /predict and for v2 infer."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    finite = st.one_of(st.floats(-1e6, 1e6), st.integers(-1000, 1000))
    number = st.one_of(finite, st.floats(), st.integers(10**308, 10**500))  # (past float64's range too)
    value = st.one_of(number, st.booleans(), st.none(), st.text(max_size=3))
    instance = st.one_of(st.lists(finite, min_size=64, max_size=64), st.lists(number, min_size=64, max_size=64),
                         st.lists(value, min_size=63, max_size=65),
                         st.lists(st.lists(finite, min_size=8, max_size=8), min_size=8, max_size=8), st.text())
    predict_body = st.fixed_dictionaries({"instances": st.lists(instance, min_size=1, max_size=3)}, optional={
        "top_k": st.one_of(st.integers(-2, 10**30), st.text(max_size=3), st.floats(), st.booleans())})
    tensor = st.fixed_dictionaries({
        "name": st.sampled_from(["input", "x"]),
        "datatype": st.sampled_from(["FP32", "FP16", "INT64", "UINT8", "BOOL", "BYTES"]),
        "shape": st.one_of(st.just([1, 64]), st.just([1, 1, 8, 8]), st.lists(st.integers(-1, 70), max_size=4)),
        "data": st.one_of(st.lists(finite, min_size=64, max_size=64), st.lists(number, min_size=64, max_size=64),
                          st.lists(value, min_size=60, max_size=130))})
    infer_body = st.fixed_dictionaries({"inputs": st.lists(tensor, min_size=1, max_size=2)}, optional={
        "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["label", "probabilities", "x"])})),
        "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "top_k"]), value)})
    base = f"http://127.0.0.1:{endpoint['port']}"
    answered = []

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(predict_body.map(lambda b: (f"{endpoint['url']}/predict", b)),
                          infer_body.map(lambda b: (f"{base}/v2/models/serve-mlp/infer", b))))
    def fuzz(body):
        url, payload = body
        response = httpx.post(url, content=json.dumps(payload), timeout=30)
        assert response.status_code < 500, (url, json.dumps(payload)[:300], response.text[:300])
        answered.append(response.status_code)

    fuzz()
    assert 200 in answered and post(endpoint["url"], {"instances": [[0] * 64]}).status_code == 200


def test_the_gateway_hands_protocol_calls_to_the_model(endpoint):
    """Without HAProxy in front (Serve's own proxy, a RayService), the standard paths reach the
    gateway, which hands each call to the model's deployment: that hand-over, through its handle."""
    import ray

    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "data": [0.0] * 64}]}).encode()

    @ray.remote(num_cpus=0)
    def through_the_gateway(calls):
        import asyncio

        from ray import serve

        from deepyard.serve import gateway

        async def answers():  # (in an event loop, as in a replica)
            protocols = serve.get_app_handle(gateway.APP_NAME)
            return [await protocols.hand_over.remote(*call) for call in calls]

        return [(response.status_code, json.loads(response.body)) for response in asyncio.run(answers())]

    token = f"Bearer {TOKEN}"  # (needed only once test_bearer_token_and_dynamic_batching has run)
    inferred, other_version, bad, metadata, missing, explained = ray.get(through_the_gateway.remote([
        ("serve-mlp", "v2_infer", body, None, None, token), ("serve-mlp", "v2_infer", body, None, "7", token),
        ("serve-mlp", "v1_predict", b'{"instances": [[1, 2]]}', token), ("serve-mlp", "v2_metadata", None, token),
        ("nope", "v2_metadata", None, token),
        ("serve-mlp", "v1_explain", b'{"instances": [[' + b", ".join([b"3"] * 64) + b']], "steps": 8}', token)]))
    assert inferred[0] == 200 and {o["name"] for o in inferred[1]["outputs"]} == {"probabilities", "label"}
    assert other_version[0] == 404 and "version '7' is not served here" in other_version[1]["error"]
    assert bad[0] == 400 and "instances[0]: shape [2]" in bad[1]["error"]
    assert metadata == (200, {**metadata[1], "name": "serve-mlp"})
    assert missing[0] == 404 and "no model 'nope' is deployed here" in missing[1]["error"]
    assert explained[0] == 200 and np.asarray(explained[1]["explanations"][0]["attributions"]).shape == (1, 8, 8)


def test_a_binary_header_length_that_is_not_a_small_number_is_a_400(endpoint):
    base = f"http://127.0.0.1:{endpoint['port']}"
    for length in ("9" * 5000, "-1", "12x"):  # (5,000 digits: int() refused it, a 500)
        answer = httpx.post(f"{base}/v2/models/serve-mlp/infer", content=b'{"inputs": []}', timeout=30,
                            headers={"Inference-Header-Content-Length": length})
        assert answer.status_code == 400 and "Inference-Header-Content-Length" in answer.json()["error"], answer.text


def test_kserve_v1_and_v2_json_paths_answer_as_predict_does(endpoint):
    base = f"http://127.0.0.1:{endpoint['port']}"
    instances = {"instances": [[0] * 64, [3] * 64]}
    predicted = post(endpoint["url"], instances).json()
    v1 = httpx.post(f"{base}/v1/models/serve-mlp:predict", json=instances, timeout=30).json()
    assert v1["predictions"] == predicted["predictions"] and v1["version"] == predicted["version"]
    assert httpx.get(f"{base}/v1/models/serve-mlp", timeout=10).json() == {"name": "serve-mlp", "ready": True}
    v2 = httpx.post(f"{base}/v2/models/serve-mlp/infer", timeout=30, json={
        "inputs": [{"name": "input", "datatype": "INT64", "shape": [2, 1, 8, 8], "data": instances["instances"]}]})
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert outputs["label"]["data"] == [p["label"] for p in predicted["predictions"]]
    assert outputs["probabilities"]["shape"] == [2, 10]
    assert httpx.get(f"{base}/v2", timeout=10).json()["extensions"] == ["binary_tensor_data"]


def test_cli_predict_and_endpoints(endpoint, cli, tmp_path):
    url = f"http://127.0.0.1:{endpoint['port']}"
    request = tmp_path / "digit.json"
    request.write_text(json.dumps([[0] * 64]))
    answer = json.loads(cli("predict", "serve-mlp", "--input", str(request), "--url", url).stdout)
    assert answer["version"] == "1" and len(answer["predictions"]) == 1
    rows = {row["name"]: row for row in json.loads(cli("endpoints", "--json").stdout)}
    assert rows["serve-mlp"]["route"] == "/models/serve-mlp"
    assert rows["deepyard-protocols"]["route"] == "/"  # the v1 and v2 paths of every model
    request.write_text("[[1, 2, 3]]")
    refused = cli("predict", "serve-mlp", "--input", str(request), "--url", url, expect=2)
    assert "serve-mlp: HTTP 400: instances[0]: shape [3]" in refused.stderr


def test_each_versions_requests_errors_and_latency_are_counted(endpoint, cli):
    """Ray metrics from the replicas, scraped from the nodes by `deepyard endpoints`: they move with traffic."""
    def counted() -> dict:
        rows = {row["name"]: row for row in json.loads(cli("endpoints", "--json").stdout)}
        return rows["serve-mlp"]["traffic"].get("1", {"requests": 0, "client_errors": 0})

    before = counted()
    base = f"http://127.0.0.1:{endpoint['port']}"
    for _ in range(5):
        assert post(endpoint["url"], {"instances": [[0] * 64]}).status_code == 200
    assert post(endpoint["url"], {"instances": [[0] * 3]}).status_code == 400
    assert httpx.post(f"{base}/v2/models/serve-mlp/infer", timeout=30, json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}).status_code == 200
    deadline = time.monotonic() + 60  # (Ray exports metrics every few seconds)
    while (now := counted())["requests"] < before["requests"] + 7 and time.monotonic() < deadline:
        time.sleep(2)
    assert now["requests"] >= before["requests"] + 7, (before, now)
    assert now["client_errors"] >= before["client_errors"] + 1 and now["mean_ms"] > 0
    assert "v1:" in cli("endpoints").stdout


def test_hot_swap_under_load_drops_no_request(endpoint, cli):
    failures, versions, stop = [], [], threading.Event()

    def hammer():
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                response = client.post(f"{endpoint['url']}/predict", json={"instances": [[0] * 64]})
                (versions if response.status_code == 200 else failures).append(
                    response.json().get("version") if response.status_code == 200 else response.text)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    cli("models", "promote", "serve-mlp", "2", "--alias", "champion")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "2" not in versions[-5:]:
        time.sleep(0.2)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures
    assert versions[0] == "1" and versions[-1] == "2"
    switched = versions.index("2")
    assert set(versions[switched + 20:]) <= {"2"}  # once swapped, every replica answers with the new version


TOKEN = "tok-7f3a9c-never-in-a-log"


def test_bearer_token_and_dynamic_batching(endpoint, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from deepyard.runners import deploy

    monkeypatch.setenv("DEEPYARD_API_TOKEN", TOKEN)
    # redeployed with the token, and batches of at most 4 requests: a request of 5 goes on its own
    batched = endpoint["options"].model_copy(update={"max_batch_size": 4})
    deploy.start([batched], host="127.0.0.1", port=endpoint["port"])
    assert post(endpoint["url"], {"instances": [[0] * 64]}).status_code == 401
    wrong = post(endpoint["url"], {"instances": [[0] * 64]}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive
        answer = post(endpoint["url"], {"instances": [[0] * 64]}, headers={"Authorization": f"{scheme} {TOKEN}"})
        assert answer.status_code == 200, (scheme, answer.text)
    assert post(endpoint["url"], {"instances": [[0] * 64]},
                headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert httpx.get(f"{endpoint['url']}/healthz", timeout=10).status_code == 200  # probes need no token
    # The KServe paths too: their token is the model's own, not what the gateway was deployed with
    # (deployed before the token existed); %2F is not rewritten by HAProxy and goes through the gateway.
    base, auth = f"http://127.0.0.1:{endpoint['port']}", {"Authorization": f"Bearer {TOKEN}"}
    v2_body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}
    for path in ("/v2/models/serve-mlp/infer", "/v2%2Fmodels/serve-mlp/infer"):
        assert httpx.post(base + path, json=v2_body, timeout=30).status_code in (401, 404), path
    assert httpx.post(f"{base}/v2/models/serve-mlp/infer", json=v2_body, headers=auth, timeout=30).status_code == 200
    assert httpx.post(f"{base}/v1/models/serve-mlp:predict", json={"instances": [[0] * 64]},
                      timeout=30).status_code == 401
    assert httpx.get(f"{base}/v2/models/serve-mlp", timeout=30).status_code == 401
    # Replicas get a salted digest, never the token: passed as is, Ray wrote it to runtime_env_agent.log.
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [path.name for path in logs.rglob("*") if path.is_file() and TOKEN.encode() in path.read_bytes()]
    assert not leaked, leaked

    # Concurrent requests of different sizes share batches; each gets exactly its own answers.
    example = tracking.input_example("serve-mlp", "2")
    module, _ = tracking.load_model("serve-mlp", "2")
    import torch

    with torch.inference_mode():
        offline = module(torch.as_tensor(example)).numpy()
    requests = [example[i:i + size] for i in range(len(example)) for size in (1, 2, 5) if i + size <= len(example)]

    def ask(batch):
        answer = post(endpoint["url"], {"instances": batch.tolist()}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200, answer.text
        return answer.json()["predictions"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, requests * 4))
    names = [str(i) for i in range(10)]
    for batch, predictions in zip(requests * 4, answers):
        start = next(i for i in range(len(example)) if np.array_equal(example[i], batch[0]))
        served = np.array([[p["probabilities"][n] for n in names] for p in predictions])
        np.testing.assert_allclose(served, offline[start:start + len(batch)], rtol=1e-5, atol=1e-6)


def test_a_lone_request_skips_the_batch_queue():
    """Dynamic batching (on by default) batches only requests in flight together: a lone request
    runs at once, so batching adds no latency at concurrency 1. (The model and Serve's batcher are
    stand-ins here: what is tested is which path each request takes; Serve's batching itself runs
    in the tests above and below.)"""
    import asyncio

    from deepyard.serve.app import Loaded, ModelEndpoint
    from deepyard.serve.options import EndpointOptions

    paths: list[str] = []

    class Codec:
        batchable = True

        def decode(self, body, metadata, max_instances):
            return np.asarray(body["instances"], dtype=np.float32)

        def run(self, module, decoded, metadata):
            paths.append("at once")
            return decoded

    async def batcher(request):
        paths.append("batched")
        await asyncio.sleep(0.01)
        return request[1]

    replica = object.__new__(ModelEndpoint.func_or_class)
    replica.options = EndpointOptions(model="m")
    replica.current = Loaded(None, "1", {}, {}, Codec())
    replica.canary, replica._batching = None, 0
    replica._predict_batched = batcher
    body = {"instances": [[0.0] * 4]}

    async def requests() -> None:
        await replica._run(body)  # alone
        paths.append("|")
        await asyncio.gather(*(replica._run(body) for _ in range(3)))  # three that came in together
        paths.append("|")
        await replica._run({"instances": [[0.0] * 4] * (replica.options.max_batch_size + 1)})  # too big to batch
        paths.append("|")
        await asyncio.gather(replica._run(body), replica._run({"instances": [[0.0] * 4] * 2}))

    assert replica.options.max_batch_size > 2
    asyncio.run(requests())
    assert paths == ["at once", "|", "batched", "batched", "batched", "|", "at once", "|", "batched", "batched"]
    assert replica._batching == 0


def test_a_batch_runs_each_request_on_the_version_that_decoded_it():
    """The alias can move while requests wait for their batch: each still gets its own version's
    outputs (its vocabulary or schema decoded it), in one forward pass per version."""
    import asyncio

    from deepyard.serve.app import Loaded, ModelEndpoint

    class Codec:
        def run(self, module, batch, metadata):
            module.append(len(batch))
            return batch * metadata["scale"]

    calls_1, calls_2 = [], []
    one, two = Loaded(calls_1, "1", {"scale": 1.0}, {}, Codec()), Loaded(calls_2, "2", {"scale": 2.0}, {}, Codec())
    replica = object.__new__(ModelEndpoint.func_or_class)
    requests = [(one, np.full((1, 2), 1.0)), (two, np.full((2, 2), 2.0)), (one, np.full((3, 2), 3.0))]
    outputs = asyncio.run(replica._predict_many(requests))
    for (loaded, decoded), output in zip(requests, outputs):
        np.testing.assert_array_equal(output, decoded * loaded.metadata["scale"])
    assert calls_1 == [4] and calls_2 == [2]  # one pass per version


def test_prediction_routes_go_straight_to_their_handlers():
    """PredictFirst sends POST /predict, /v1:predict and /v2/infer (under the app's prefix) to the
    replica's handlers and every other request to the FastAPI app, as before; with no replica yet,
    everything goes to the app."""
    import asyncio

    from fastapi.responses import Response

    from deepyard.serve.app import PredictFirst

    seen: list[str] = []

    class Replica:
        async def _predict_route(self, request, route):
            seen.append(f"{route} {request.url.path}")
            return Response(b"{}", 200)

        async def _infer_here(self, request, version):
            seen.append(f"v2 {request.url.path}")
            return Response(b"{}", 200)

        async def predict(self, request):
            return await self._predict_route(request, "predict")

        async def v1_predict_here(self, request):
            return await self._predict_route(request, "v1")

        async def v2_infer_here(self, request):
            return await self._infer_here(request, None)

    async def fastapi_app(scope, receive, send):
        seen.append(f"app {scope.get('method')} {scope['path']}")

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    def call(method: str, path: str, root: str = "/models/m") -> None:
        scope = {"type": "http", "method": method, "path": path, "root_path": root, "headers": [],
                 "query_string": b""}
        asyncio.run(PredictFirst(fastapi_app)(scope, receive, send))

    PredictFirst.replica = None
    call("POST", "/models/m/predict")
    PredictFirst.replica = Replica()
    try:
        call("POST", "/models/m/predict")
        call("POST", "/models/m/v1:predict")
        call("POST", "/models/m/v2/infer")
        call("POST", "/predict", root="")
        call("GET", "/models/m/predict")
        call("POST", "/models/m/explain")
        call("POST", "/models/m/predict/")
        call("POST", "/models/m/v2/versions/1/infer")
    finally:
        PredictFirst.replica = None
    assert seen == ["app POST /models/m/predict", "predict /models/m/predict", "v1 /models/m/v1:predict",
                    "v2 /models/m/v2/infer", "predict /predict", "app GET /models/m/predict",
                    "app POST /models/m/explain", "app POST /models/m/predict/",
                    "app POST /models/m/v2/versions/1/infer"]


@pytest.mark.long  # ~20 s of load through a canary (make test keeps the hot swap under load)
def test_canary_split_rollback_and_promotion_under_load(endpoint, cli, tmp_path):
    """A canary gets its share, one that fails is rolled back by the replicas on their own (and the
    rollback recorded on its version), a healthy one is promoted; the stable version never fails."""
    from deepyard.serve import rollout

    stable = tracking.model_version("serve-mlp", alias="champion")["version"]
    healthy = next(v for v in ("1", "2") if v != stable)
    spec = tmp_path / "diverged.yaml"  # a run that diverged: its weights are NaN, its answers are not JSON
    spec.write_text(TINY)
    diverged = last_json(cli("run", str(spec), "--json", "--set", "optim.lr=1e30"))["model_version"]
    assert "no canary" in cli("rollout", "serve-mlp", "--traffic", "20", expect=2).stderr

    answers, stop = [], threading.Event()

    def hammer():  # (with the token of test_bearer_token_and_dynamic_batching's redeploy, if it ran)
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            while not stop.is_set():
                response = client.post(f"{endpoint['url']}/predict", json={"instances": [[0] * 64]})
                answers.append((response.headers.get("x-deepyard-version"), response.status_code))

    def after(mark: int, seconds: float) -> list:
        time.sleep(seconds)
        return answers[mark:]

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        rollout.start("serve-mlp", healthy, 30)
        time.sleep(2)  # (replicas poll the registry every 0.3 s here)
        split = after(len(answers), 4)
        share = sum(version == healthy for version, _ in split) / len(split)
        assert 0.15 < share < 0.45, (share, len(split))

        rollout.start("serve-mlp", diverged, 50)
        deadline = time.monotonic() + 30
        while rollout.state("serve-mlp")[0] is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert rollout.state("serve-mlp") == (None, 0.0), "the failing canary was not rolled back"
        record = tracking.client().get_model_version("serve-mlp", diverged).tags[rollout.RECORD_TAG]
        assert "rolled back automatically: server errors" in record
        settled = after(len(answers) + 50, 2)
        assert settled and all(status == 200 and version == stable for version, status in settled)

        rollout.start("serve-mlp", healthy, 10)  # (beside @champion, what a promotion moves)
        time.sleep(1)
        assert f"promoted serve-mlp version {healthy} to @champion" in cli("rollout", "serve-mlp", "--promote").stderr
        time.sleep(2)
        promoted = after(len(answers), 2)
        assert promoted and all(status == 200 and version == healthy for version, status in promoted)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        tracking.set_alias("serve-mlp", "champion", stable)
    failed = [(version, status) for version, status in answers if status != 200]
    assert failed and all(version == diverged for version, _ in failed), failed[:5]  # only the diverged canary's


def test_a_promotion_moves_the_alias_the_canary_was_started_beside(cli, tmp_path):
    """An endpoint that follows @staging: --promote moved @champion instead, which was a rollback in effect."""
    from deepyard.serve import rollout

    registry = tracking.client()
    registry.create_registered_model("canary-beside-staging")
    for _ in range(2):
        registry.create_model_version("canary-beside-staging", source=str(tmp_path))
    registry.set_registered_model_alias("canary-beside-staging", "staging", "1")
    rollout.start("canary-beside-staging", "2", 20, alias="staging")
    assert "no canary" not in cli("rollout", "canary-beside-staging", "--traffic", "40").stderr
    assert rollout.state("canary-beside-staging") == ("2", 40.0)
    assert "to @staging" in cli("rollout", "canary-beside-staging", "--promote").stderr
    assert registry.get_registered_model("canary-beside-staging").aliases == {"staging": 2}
    assert rollout.state("canary-beside-staging") == (None, 0.0)
    assert "promoted to @staging" in registry.get_model_version("canary-beside-staging", "2").tags[rollout.RECORD_TAG]
    assert "give one of --traffic" in cli("rollout", "canary-beside-staging", "--promote", "--rollback",
                                          expect=2).stderr


@pytest.mark.parametrize("end", ["rollback", "promote"])
def test_whoever_sees_a_canary_end_finds_its_version_says_why(end, monkeypatch, tmp_path):
    """A canary's end and its record are two writes to the registry: the record comes first, so a
    reader who finds no canary (a replica, a test, a user's script) reads why, never `canary at N%`."""
    from mlflow import MlflowClient

    from deepyard.serve import rollout

    registry = tracking.client()
    name = f"canary-record-{end}"
    registry.create_registered_model(name)
    for _ in range(2):
        registry.create_model_version(name, source=str(tmp_path))
    registry.set_registered_model_alias(name, "champion", "1")
    rollout.start(name, "2", 30)
    seen_at_end = []
    delete_alias = MlflowClient.delete_registered_model_alias

    def spy(self, model, alias):  # the real registry call, and what a reader found just before it
        seen_at_end.append(self.get_model_version(model, "2").tags[rollout.RECORD_TAG])
        return delete_alias(self, model, alias)

    monkeypatch.setattr(MlflowClient, "delete_registered_model_alias", spy)
    rollout.rollback(name, "rolled back automatically: test") if end == "rollback" else rollout.promote(name)
    assert rollout.state(name) == (None, 0.0)
    assert len(seen_at_end) == 1 and "canary at" not in seen_at_end[0], seen_at_end


def test_a_canary_end_that_fails_says_so_on_its_version(monkeypatch, tmp_path):
    """The record comes first: if the end then fails, the record must not claim a rollback that is
    not in effect (the canary still gets its share)."""
    from mlflow import MlflowClient

    from deepyard.serve import rollout

    registry = tracking.client()
    registry.create_registered_model("canary-end-fails")
    for _ in range(2):
        registry.create_model_version("canary-end-fails", source=str(tmp_path))
    registry.set_registered_model_alias("canary-end-fails", "champion", "1")
    rollout.start("canary-end-fails", "2", 30)

    def refuse(self, model, alias):
        raise ConnectionError("the registry went away")

    monkeypatch.setattr(MlflowClient, "delete_registered_model_alias", refuse)
    with pytest.raises(ConnectionError):
        rollout.rollback("canary-end-fails", "rolled back automatically: test")
    record = registry.get_model_version("canary-end-fails", "2").tags[rollout.RECORD_TAG]
    assert "rolled back automatically: test: not done, the canary is still on (ConnectionError" in record
    assert rollout.state("canary-end-fails") == ("2", 30.0)

def test_undeploy(endpoint, cli):
    cli("undeploy", "serve-mlp")
    assert json.loads(cli("endpoints", "--json").stdout) == []
    assert "not deployed: serve-mlp" in cli("undeploy", "serve-mlp", expect=2).stderr


def test_deploy_refuses_unknown_models_before_ray_starts(cli):
    result = cli("deploy", "no-such-model", expect=2)
    assert "registered model" in result.stderr and "no-such-model" in result.stderr


@pytest.mark.long  # ~30 s: a process with a local cluster of its own
def test_deploy_job_serves_in_the_foreground_until_ctrl_c(endpoint, write_spec):
    """`kind: deploy` through the real CLI, on its own local cluster: ready line, answers, Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    spec = write_spec(f"kind: deploy\nname: fg\nmodels:\n  - model: serve-mlp@champion\n    num_cpus: 0.5\n"
                      f"http: {{port: {port}}}\n", "deploy.yaml")
    # Beside the session's deployment, on ports the job's own serve_env picks (Ray's fixed ones are taken).
    env = {name: value for name, value in os.environ.items() if name not in PORT_SETTINGS}
    process = subprocess.Popen([sys.executable, "-m", "deepyard.cli", "run", spec, "--json"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # printed once every endpoint answers
        assert line, f"the deploy job exited ({process.wait()}): {process.stderr.read()[-3000:]}"
        ready = json.loads(line)
        (info,) = ready["endpoints"]
        assert info["url"] == f"http://127.0.0.1:{port}/models/serve-mlp"
        answer = post(info["url"], {"instances": [[0] * 64]}, headers=auth_headers())
        assert answer.status_code == 200 and answer.json()["model"] == "serve-mlp"
    finally:
        process.send_signal(signal.SIGINT)
        stderr = ended(process, timeout=60)
    # as every command stops
    assert process.returncode == 130 and "stopped: the endpoints are down" in stderr, stderr[-2000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/models/serve-mlp/healthz", timeout=2)


def test_a_haproxy_folder_others_may_write_in_is_refused(monkeypatch):
    """Serve starts the wrapper written into the HAProxy folder as HAProxy: a folder whose name
    another user could guess and make first, or write in, is bad input, not a place to run from."""
    import os
    import shutil
    import tempfile

    from deepyard.cluster import serve_env
    from deepyard.errors import BadInput

    base = tempfile.mkdtemp(prefix="d", dir="/tmp")  # (short: HAProxy's sockets go two folders down)
    try:
        monkeypatch.setenv("DEEPYARD_HOME", os.path.join(base, "home"))
        monkeypatch.setattr(tempfile, "tempdir", base)
        env = serve_env()  # made here, private: fine
        folder = Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
        assert str(folder.parent) == base and (folder.stat().st_mode & 0o777) == 0o700
        os.chmod(folder, 0o777)
        with pytest.raises(BadInput, match="TMPDIR"):
            serve_env()
        os.chmod(folder, 0o700)
        assert serve_env()["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]
    finally:
        shutil.rmtree(base)


def test_a_temp_folder_too_long_for_haproxys_sockets_gives_way_to_tmp(tmp_path, monkeypatch):
    """HAProxy's admin socket is two folders down from ours (one is the node's 56-character id) and
    a socket's path ends at 107 characters: a long TMPDIR kept HAProxy from starting at all."""
    import tempfile

    from deepyard.cluster import HAPROXY_FOLDER_MAX, serve_env

    long_base = tmp_path / ("t" * 40)
    long_base.mkdir()
    monkeypatch.setenv("DEEPYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(long_base))
    folder = Path(serve_env()["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    assert folder.parent == Path("/tmp") and len(str(folder)) <= HAPROXY_FOLDER_MAX
    assert len(str(folder / ("n" * 56) / "admin.sock")) + 11 <= 107


def test_serving_ports_are_free_ones_unless_the_operator_chose(monkeypatch):
    """HAProxy's stats and metrics and Serve's fallback proxy: Ray's fixed 8404, 9101 and 8500 let a
    second deployment on the machine fail; serve_env picks free ports below the kernel's range for
    outgoing connections, and keeps ones set."""
    from deepyard.cluster import PICKED_PORTS, serve_env

    for name in PORT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    ports = [int(serve_env()[name]) for name in PORT_SETTINGS]
    assert len(set(ports)) == 3 and all(PICKED_PORTS[0] <= port < PICKED_PORTS[1] for port in ports)
    for port in ports:  # free: bindable on every interface, as HAProxy may bind there
        with socket.socket() as probe:
            probe.bind(("", port))
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    env = serve_env()
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in env and "RAY_SERVE_HAPROXY_METRICS_PORT" in env
