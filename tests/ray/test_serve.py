"""The Serve endpoint on 127.0.0.1 with the tiny model: parity, limits and 4xx, batching, 503, auth, replica loss."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jbert_ray.cli.ray_runtime import is_alive, process_tree
from jbert_ray.serve import ServeArgs, build_app, free_port

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]

TEXTS = [
    "東京は日本の[MASK]です。",
    "今日は[MASK]が降っているので、[MASK]を持って出かけた。",
    "[MASK]を食べた。",
]
SMALL_REPLICA = {"num_cpus": 0.25, "min_replicas": 1, "max_replicas": 1, "health_check_period_s": 1}


@pytest.fixture(scope="module")
def serve_url(ray_cluster, tiny_model_dir):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ServeArgs(
        model_dir=str(tiny_model_dir),
        max_batch_size=16,
        batch_wait_timeout_s=0.05,
        max_tokens=128,
        max_request_tokens=1024,
        **{**SMALL_REPLICA, "num_cpus": 0.5},
    )
    serve.run(build_app(args), name="jbert-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def extra_app(serve_url, tiny_model_dir):
    """Deploy a second, differently configured app under /extra; each deploy replaces the previous one in place
    (a delete after every test cost ~3 s of replica shutdown each), and the module deletes it at the end."""
    from ray import serve

    def deploy(**overrides):
        args = ServeArgs(**{"model_dir": str(tiny_model_dir), **SMALL_REPLICA, **overrides})
        serve.run(build_app(args), name="jbert-extra", route_prefix="/extra")
        return f"{serve_url}/extra"

    yield deploy
    serve.delete("jbert-extra")


def post(url: str, body, headers: dict | None = None) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    headers = {"Content-Type": "application/json", **(headers or {})}
    return requests.post(url, data=data.encode(), headers=headers, timeout=60)


def test_config_yaml_is_a_valid_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "config.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "jbert_ray.serve:build_app" and config.http_options.host == "127.0.0.1"
    assert ServeArgs(**app.args).max_queued_requests > 0  # every arg is a ServeArgs field


def test_build_app_needs_a_model_dir(monkeypatch, tmp_path):
    from jbert_ray.errors import UserError

    monkeypatch.delenv("JBERT_MODEL_DIR", raising=False)
    with pytest.raises(UserError, match="no model directory"):
        build_app({})
    with pytest.raises(UserError, match="no config.json"):
        build_app({"model_dir": str(tmp_path)})


def test_healthz_and_info(serve_url, tiny_model_dir):
    assert requests.get(f"{serve_url}/healthz", timeout=10).json() == {"status": "ok"}
    info = requests.get(f"{serve_url}/info", timeout=10).json()
    assert info["model_dir"] == str(tiny_model_dir.resolve()) and info["max_length"] == 512
    assert info["vocab_size"] > 1000 and info["batching"]["max_batch_size"] == 16


def test_fill_mask_matches_the_transformers_pipeline(serve_url, tiny_model_dir):
    from transformers import pipeline

    response = post(f"{serve_url}/fill-mask", {"texts": TEXTS, "top_k": 5})
    assert response.status_code == 200, response.text
    fill_mask = pipeline("fill-mask", model=str(tiny_model_dir), device="cpu")
    for text, per_mask in zip(TEXTS, response.json()["predictions"]):
        reference = fill_mask(text, top_k=5)
        reference = [reference] if isinstance(reference[0], dict) else reference
        assert len(per_mask) == len(reference) == text.count("[MASK]")
        for ours, theirs in zip(per_mask, reference):
            assert ours[0]["token_id"] == theirs[0]["token"]
            assert [c["score"] for c in ours] == pytest.approx([c["score"] for c in theirs], abs=1e-5)


def test_score_equals_a_naive_one_forward_per_position_reference(serve_url, tiny_model_dir, sample_texts):
    from transformers import AutoTokenizer, BertForMaskedLM

    texts = [t for t in sample_texts[:50] if 10 <= len(t) <= 40][:4]
    response = post(f"{serve_url}/score", {"texts": texts})
    assert response.status_code == 200, response.text
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = BertForMaskedLM.from_pretrained(tiny_model_dir).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # batch-1 forwards: extra OpenMP threads only spin (10x slower on a busy machine)
    try:
        for text, result in zip(texts, response.json()["scores"]):
            ids = tokenizer(text)["input_ids"]
            reference = []
            for j in range(1, len(ids) - 1):
                masked = ids[:j] + [tokenizer.mask_token_id] + ids[j + 1 :]
                with torch.no_grad():
                    logits = model(torch.tensor([masked])).logits[0, j]
                reference.append(torch.log_softmax(logits, -1)[ids[j]].item())
            assert result["token_pll"] == pytest.approx(reference, abs=1e-4)
            assert result["pll"] == pytest.approx(sum(reference), abs=1e-3)
    finally:
        torch.set_num_threads(threads)


def test_json_body_is_read_whatever_the_content_type(serve_url):
    body = json.dumps({"text": "東京は日本の[MASK]です。"}, ensure_ascii=False).encode()
    response = requests.post(f"{serve_url}/fill-mask", data=body, timeout=60)  # as `curl -d` sends it
    assert response.status_code == 200, response.text


TOO_MANY_MASKS = "".join(["猫[MASK]"] * 9)
BAD_REQUESTS = [
    ("fill-mask", '{"text": "東京', 400, "malformed JSON"),
    ("fill-mask", "", 400, "the request body is empty"),
    ("fill-mask", "[1, 2]", 422, "must be a JSON object, not list"),
    ("fill-mask", "{}", 422, "exactly one of"),
    ("fill-mask", {"text": "a[MASK]", "texts": ["b[MASK]"]}, 422, "exactly one of"),
    ("fill-mask", {"text": "   "}, 422, "text 0 is empty"),
    ("fill-mask", {"texts": []}, 422, '"texts" is empty'),
    ("fill-mask", {"text": 5}, 422, "text: Input should be a valid string"),
    ("fill-mask", {"texts": ["猫[MASK]", None]}, 422, "texts.1: Input should be a valid string"),
    ("fill-mask", {"text": "東京は日本の首都です。"}, 422, "text 0 has no [MASK]"),
    ("fill-mask", {"text": TOO_MANY_MASKS}, 422, "9 [MASK]s; the limit is 8"),
    ("fill-mask", {"text": "あ" * 2001 + "[MASK]"}, 413, "characters; the limit is 2000"),
    ("fill-mask", {"text": "東京は日本の首都です。" * 30 + "[MASK]"}, 413, "tokens; the limit is 128"),
    ("fill-mask", {"text": "[MASK]", "top_k": 0}, 422, "top_k must be between 1 and 50"),
    ("fill-mask", {"text": "[MASK]", "top_k": 51}, 422, "top_k must be between 1 and 50"),
    ("fill-mask", {"text": "[MASK]", "top_k": "5"}, 422, "top_k: Input should be a valid integer"),
    ("fill-mask", {"texts": ["猫[MASK]"] * 33}, 413, "33 texts in one request; the limit is 32"),
    ("fill-mask", {"text": "[MASK]", "topk": 3}, 422, "topk: Extra inputs are not permitted"),
    ("score", {"texts": ["東京"], "method": "bogus"}, 422, "method: Input should be"),
    ("score", {"texts": [""]}, 422, "text 0 is empty"),
    ("score", {"texts": "東京"}, 422, "texts: Input should be a valid list"),
    ("score", '{"texts": ["東京", "\\ud800です"]}', 422, "text 1: invalid Unicode"),  # valid JSON, not UTF-8
    ("fill-mask", '{"text": "[MASK]\\udc00"}', 422, "text 0: invalid Unicode"),
    ("score", {"texts": ["東京は日本の首都です。" * 10] * 20}, 413, "over 1,024 tokens in all"),
    # hostile bodies: Python's json raises RecursionError, and ValueError past the int-string limit
    ("fill-mask", "[" * 50_000 + "]" * 50_000, 400, "nested too deeply"),
    ("score", '{"texts": ' + "[" * 50_000 + "]" * 50_000 + "}", 400, "nested too deeply"),
    ("fill-mask", '{"text": "[MASK]", "top_k": ' + "9" * 5_000 + "}", 400, "a number with thousands of digits"),
    ("fill-mask", {"text": "東京は[MASK]です。", "targets": ["\u2603\u2603"]}, 422, "is not in the vocabulary"),
    ("fill-mask", {"text": "東京は[MASK]です。", "targets": []}, 422, "targets must be a non-empty list"),
    ("fill-mask", {"text": "東京は[MASK]です。", "targets": ["猫"] * 101}, 413, "101 targets"),
    # the Hugging Face Inference API's body
    ("fill-mask", {"inputs": "東京は日本の首都です。"}, 422, "text 0 has no [MASK]"),
    ("fill-mask", {"inputs": "[MASK]", "parameters": {"top_k": 51}}, 422, "top_k must be between 1 and 50"),
    ("fill-mask", {"inputs": "[MASK]", "parameters": {"topk": 3}}, 422, "parameters.topk: Extra inputs"),
    ("fill-mask", {"inputs": ["猫[MASK]"] * 33}, 413, "33 texts in one request"),
    ("fill-mask", {"inputs": 5}, 422, "inputs.str: Input should be a valid string"),
]


def test_a_body_over_the_byte_limit_is_refused_with_413_and_the_service_still_answers(serve_url):
    huge = json.dumps({"texts": ["猫[MASK]"], "padding": "x" * (2 << 20)})  # 2 MiB, over the 1 MiB default
    response = post(f"{serve_url}/fill-mask", huge)
    assert response.status_code == 413 and "the limit is 1,048,576" in response.json()["error"]
    assert post(f"{serve_url}/fill-mask", {"text": "猫[MASK]"}).status_code == 200


@pytest.mark.parametrize("route, body, status, message", BAD_REQUESTS)
def test_bad_input_gets_its_4xx_with_a_message(serve_url, route, body, status, message):
    response = post(f"{serve_url}/{route}", body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize("headers, status, message", [
    ({"Content-Type": "text/plain"}, 415, "a text/plain body is refused"),
    ({"Content-Type": "multipart/form-data; boundary=x"}, 415, "multipart/form-data body is refused"),
    ({"Origin": "https://evil.example"}, 403, "cross-site request from https://evil.example"),
])  # fmt: skip
def test_what_a_web_page_can_send_cross_site_is_refused_without_a_token(serve_url, headers, status, message):
    body = json.dumps({"text": "東京は日本の[MASK]です。"}, ensure_ascii=False).encode()
    for route in ("fill-mask", "score"):
        response = requests.post(f"{serve_url}/{route}", data=body, headers=headers, timeout=60)
        assert response.status_code == status and message in response.json()["error"], response.text
    same_site = {"Origin": serve_url, "Content-Type": "application/json"}  # the served /docs page itself
    assert requests.post(f"{serve_url}/fill-mask", data=body, headers=same_site, timeout=60).status_code == 200


def test_hugging_face_clients_get_the_fill_mask_pipelines_answer(serve_url, tiny_model_dir):
    from huggingface_hub import InferenceClient
    from transformers import pipeline

    from jbert_ray.tokenizer import JapaneseTokenizer

    reference = pipeline("fill-mask", model=str(tiny_model_dir), device="cpu")
    client = InferenceClient(model=f"{serve_url}/fill-mask")
    text = "東京は日本の[MASK]です。"
    answer = client.fill_mask(text, top_k=4)
    expected = reference(text, top_k=4)
    assert [a.token for a in answer] == [e["token"] for e in expected]
    assert [a.score for a in answer] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    assert all(a.sequence == text.replace("[MASK]", a.token_str) for a in answer)
    vocab = JapaneseTokenizer.from_pretrained(tiny_model_dir).vocab
    targets = [a.token_str for a in client.fill_mask(text, top_k=12) if vocab[a.token] == a.token_str][-2:]
    assert len(targets) == 2  # whole-word pieces ("##" ones are looked up as ours, not as the pipeline does)
    with_targets = client.fill_mask(text, targets=targets)
    assert [a.token for a in with_targets] == [e["token"] for e in reference(text, targets=targets)]
    # several texts and several [MASK]s: lists of lists, as the pipeline answers
    two = post(f"{serve_url}/fill-mask", {"inputs": [text, TEXTS[1]], "parameters": {"top_k": 2}}).json()
    assert [len(two[0]), len(two[1]), len(two[1][0])] == [2, 2, 2]
    assert [c["token"] for c in two[1][1]] == [e["token"] for e in reference(TEXTS[1], top_k=2)[1]]
    assert two[1][0][0]["sequence"].endswith("を持って出かけた。") and "[MASK]" in two[1][0][0]["sequence"]
    ours = post(f"{serve_url}/fill-mask", {"text": text, "targets": targets}).json()["predictions"][0][0]
    assert [c["token_id"] for c in ours] == [a.token for a in with_targets]


def test_concurrent_requests_are_batched(serve_url):
    def one(i: int) -> requests.Response:
        return post(f"{serve_url}/fill-mask", {"text": f"{i}番目の[MASK]です。", "top_k": 3})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(48)))
    assert all(r.status_code == 200 for r in responses)
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1
    assert requests.get(f"{serve_url}/info", timeout=10).json()["stats"]["fill_mask"]["max_batch_size"] > 1


def test_overload_gets_503(extra_app, sample_texts):
    url = extra_app(max_ongoing_requests=1, max_queued_requests=1, max_batch_size=1)
    slow = {"texts": [t for t in sample_texts if 60 <= len(t) <= 200][:32]}  # ~4k masked copies a request

    with ThreadPoolExecutor(12) as pool:
        statuses = [r.status_code for r in pool.map(lambda _: post(f"{url}/score", slow), range(12))]
    assert 503 in statuses and 200 in statuses, statuses
    assert set(statuses) <= {200, 503}, statuses  # overload is shed, never an error


def test_a_modernbert_model_answers_as_the_inference_core_does(extra_app, tiny_modernbert_dir, sample_texts):
    from jbert_ray.inference import MaskedLM

    url = extra_app(model_dir=str(tiny_modernbert_dir))
    direct = MaskedLM.from_pretrained(tiny_modernbert_dir, device="cpu")
    served = post(f"{url}/fill-mask", {"texts": TEXTS, "top_k": 3})
    assert served.status_code == 200
    for per_mask, expected in zip(served.json()["predictions"], direct.fill_mask(TEXTS, top_k=3)):
        assert [[c["token"] for c in m] for m in per_mask] == [[c["token"] for c in m] for m in expected]
    scored = post(f"{url}/score", {"texts": sample_texts[:2]})
    assert scored.status_code == 200
    for got, expected in zip(scored.json()["scores"], direct.score(sample_texts[:2])):
        assert got["pll"] == pytest.approx(expected["pll"], abs=1e-3)


def test_a_model_on_s3_is_fetched_by_the_replica_and_answers(extra_app, s3_bucket, tiny_model_dir, tmp_path,
                                                              monkeypatch):  # fmt: skip
    from jbert_ray.inference import MaskedLM
    from jbert_ray.storage import Store

    monkeypatch.setenv("JBERT_CACHE_DIR", str(tmp_path / "cache"))  # the driver's check; replicas use theirs
    uri = s3_bucket("models/tiny")
    Store(uri).upload(tiny_model_dir)
    url = extra_app(model_dir=uri)
    served = post(f"{url}/fill-mask", {"texts": TEXTS, "top_k": 3})
    assert served.status_code == 200, served.text
    direct = MaskedLM.from_pretrained(tiny_model_dir, device="cpu").fill_mask(TEXTS, top_k=3)
    for per_mask, expected in zip(served.json()["predictions"], direct):
        assert [[c["token"] for c in m] for m in per_mask] == [[c["token"] for c in m] for m in expected]
    assert "?endpoint_override=" in uri  # how the test server is reached; /info shows no query string
    assert requests.get(f"{url}/info", timeout=10).json()["model_dir"] == uri.partition("?")[0]


@pytest.mark.parametrize("location, shown", [
    ("s3://AKIAKEY:s3cret@bucket/models/m?endpoint_override=h:9000&scheme=http", "s3://bucket/models/m"),
    ("hdfs://user@namenode:8020/m", "hdfs://namenode:8020/m"),
    ("/abs/path/model", "/abs/path/model"),
])  # fmt: skip
def test_info_shows_model_locations_without_credentials(location, shown):
    from jbert_ray.serve import redacted

    assert redacted(location) == shown


def test_a_killed_replica_is_replaced_and_the_service_answers_again(serve_url):
    info = requests.get(f"{serve_url}/info", timeout=10).json()
    old = info["replica"]
    os.kill(info["pid"], signal.SIGKILL)  # the replica's process, as the OOM killer or a lost node would
    deadline, new = time.monotonic() + 90, None
    while time.monotonic() < deadline:
        try:
            info = requests.get(f"{serve_url}/info", timeout=5)
            if info.status_code == 200 and info.json()["replica"] != old:
                new = info.json()["replica"]
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    assert new is not None, "no new replica answered within 90 s"
    response = post(f"{serve_url}/fill-mask", {"text": "東京は日本の[MASK]です。"})
    assert response.status_code == 200 and len(response.json()["predictions"][0][0]) == 5


def test_bf16_replica_answers_close_to_float32(serve_url, extra_app, sample_texts):
    url = extra_app(dtype="bfloat16")
    assert requests.get(f"{url}/info", timeout=10).json()["dtype"] == "bfloat16"
    texts = [t for t in sample_texts if 20 <= len(t) <= 60][:3]
    bf16, fp32 = (post(f"{u}/score", {"texts": texts}) for u in (url, serve_url))
    assert bf16.status_code == fp32.status_code == 200, bf16.text
    for low, full in zip(bf16.json()["scores"], fp32.json()["scores"]):
        assert low["tokens"] == full["tokens"] and low["pll"] != full["pll"]  # it really ran in bf16
        assert low["pll"] == pytest.approx(full["pll"], rel=0.05)
    filled = post(f"{url}/fill-mask", {"texts": TEXTS, "top_k": 3})
    assert filled.status_code == 200 and [len(p) for p in filled.json()["predictions"]] == [1, 2, 1]


@pytest.mark.parametrize("method", ["pll-word-l2r", "pll-strided"])
def test_each_pll_method_over_http_equals_the_inference_core(serve_url, tiny_model_dir, sample_texts, method):
    from jbert_ray.inference import MaskedLM
    from jbert_ray.tokenizer import JapaneseTokenizer

    tokenizer = JapaneseTokenizer.from_pretrained(tiny_model_dir)
    # Texts with a word of several pieces: there the two methods mask differently.
    texts = [t for t in sample_texts if 20 <= len(t) <= 60 and not all(tokenizer.encode(t).word_start)][:3]
    response = post(f"{serve_url}/score", {"texts": texts, "method": method})
    assert response.status_code == 200, response.text
    direct = MaskedLM.from_pretrained(tiny_model_dir, device="cpu").score(texts, method)
    plain = post(f"{serve_url}/score", {"texts": texts}).json()["scores"]
    for got, expected, token_by_token in zip(response.json()["scores"], direct, plain):
        assert got["token_pll"] == pytest.approx(expected["token_pll"], abs=1e-4)
        assert got["pll"] != pytest.approx(token_by_token["pll"], abs=1e-3)  # the method reached the model


def test_serve_and_the_offline_scorer_give_a_text_the_same_record(serve_url, tiny_model_dir, tmp_path):
    import pyarrow.parquet as pq

    from jbert_ray.cli import main

    texts = ["東京は日本の首都です。", "ＡＢＣの\x00テスト　です", "  絵文字😀も入る文章。  ", "セルに[MASK]を入力します。"]
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": str(i)}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "scores"
    assert main(["score", "--input", str(corpus), "--model", str(tiny_model_dir), "--out", str(out),
                 "--id-field", "id", "--no-progress"]) == 0  # fmt: skip
    offline = sorted(pq.read_table(sorted((out / "parts").glob("*.parquet"))).to_pylist(), key=lambda r: r["id"])
    online = post(f"{serve_url}/score", {"texts": texts})
    assert online.status_code == 200, online.text
    for row, record in zip(offline, online.json()["scores"]):
        assert row["error"] == "" and row["n_tokens"] == record["n_tokens"]
        for field in ("pll", "pll_per_token", "unk_rate"):
            assert record[field] == pytest.approx(row[field], abs=1e-4), field
        assert record["token_pll"] == pytest.approx(row["token_pll"], abs=1e-4)
    assert online.json()["scores"][2]["unk_rate"] > 0  # the emoji is not in the vocabulary


def test_openapi_shows_the_request_bodies_with_the_deployments_limits(extra_app):
    url = extra_app(max_texts=4, max_text_chars=300, max_top_k=7)
    schema = requests.get(f"{url}/openapi.json", timeout=10).json()
    fill_mask = schema["paths"]["/fill-mask"]["post"]
    ours, hf = fill_mask["requestBody"]["content"]["application/json"]["schema"]["anyOf"]
    texts = ours["properties"]["texts"]["anyOf"][0]
    assert texts["maxItems"] == 4 and texts["items"]["maxLength"] == 300
    assert ours["properties"]["top_k"]["maximum"] == 7 and ours["additionalProperties"] is False
    assert hf["properties"]["inputs"]["anyOf"][1]["maxItems"] == 4
    assert hf["properties"]["parameters"]["properties"]["top_k"]["maximum"] == 7
    assert {"200", "400", "401", "413", "422", "503"} <= set(fill_mask["responses"])
    assert "method" in schema["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]  # fmt: skip
    docs = requests.get(f"{url}/docs", timeout=10)
    assert docs.status_code == 200 and "/extra/openapi.json" in docs.text


def hostile_variants_get_400(ctx, response, case) -> None:
    """Our check: the case's JSON body nested past Python's recursion limit, or with an integer of 5,000 digits
    added, gets a 400 with a JSON error (these were 500s)."""
    if case.method.upper() != "POST" or not isinstance(case.body, dict):
        return
    body = json.dumps(case.body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    url = response.request.url
    for variant in (b"[" * 20_000 + body + b"]" * 20_000, body[:-1] + (b", " if case.body else b"")
                    + b'"top_k": ' + b"9" * 5_000 + b"}"):  # fmt: skip
        answer = requests.post(url, data=variant, headers={"Content-Type": "application/json"}, timeout=60)
        assert answer.status_code == 400 and "malformed JSON" in answer.json()["error"], answer.text[:300]


SCHEMA_CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    hostile_variants_get_400,
]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(serve_url):
    """The standard OpenAPI fuzzer on every operation of the served schema (its pytest plugin needs pytest < 9)."""
    operations = [result.ok() for result in schemathesis.openapi.from_url(f"{serve_url}/openapi.json")
                  .get_all_operations()]  # fmt: skip
    assert {operation.path for operation in operations} == {"/healthz", "/info", "/fill-mask", "/score"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(checks=SCHEMA_CHECKS, timeout=60)

        fuzz()


ANY_TEXT = st.text(st.characters() | st.characters(categories=["Cs"]))  # with lone surrogates
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["text", "texts", "top_k",
                                                                                  "method", "x"]), inner),
    max_leaves=12,
)  # fmt: skip
RAW_BODIES = (
    st.builds(lambda v, ascii_only: json.dumps(v, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"),
              JSON_VALUES, st.booleans())
    | st.binary(max_size=300)
    | st.fixed_dictionaries({"texts": st.lists(st.text(max_size=80).map(lambda t: t + "[MASK]"), max_size=3)}).map(
        lambda v: json.dumps(v).encode())
    | st.builds(lambda inner, depth: b"[" * depth + inner + b"]" * depth,  # past Python's recursion limit
                st.sampled_from([b"", b'{"text": "[MASK]"}', b"1"]), st.integers(900, 60_000))
    | st.builds(lambda key, digits: b'{"%s": %s}' % (key, digits),  # past the int-string limit
                st.sampled_from([b"top_k", b"text", b"inputs"]), st.integers(4_301, 6_000).map(lambda n: b"7" * n))
)  # fmt: skip


@given(route=st.sampled_from(["fill-mask", "score"]), body=RAW_BODIES,
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", None]))
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
def test_arbitrary_bodies_never_get_a_server_error(serve_url, route, body, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(f"{serve_url}/{route}", data=body, headers=headers, timeout=60)
    allowed = (415,) if content_type == "text/plain" else (200, 400, 413, 422)  # no token: text/plain is refused
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    assert response.status_code == 200 or "error" in response.json()


def test_a_truncated_body_does_not_break_the_service(serve_url):
    host, port = serve_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /fill-mask HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n" + '{"text": "東京は[MA'.encode())  # fmt: skip
    response = post(f"{serve_url}/fill-mask", {"text": "東京は日本の[MASK]です。"})
    assert response.status_code == 200 and requests.get(f"{serve_url}/healthz", timeout=10).status_code == 200


def start_jbert_serve(model_dir: Path, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`jbert serve` as a user runs it (its own local Ray), once /healthz answers."""
    port = free_port()
    command = [sys.executable, "-m", "jbert_ray.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--num-cpus", "2", *flags]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **(env or {})})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return server, url
        except requests.RequestException:
            time.sleep(1)
    kill_tree(server)
    raise AssertionError(server.communicate()[0][-3000:])


def kill_tree(server: subprocess.Popen) -> None:
    """SIGKILL a failed test's server and its whole tree: Ray's HAProxy would outlive it, holding its ports."""
    for pid in [*process_tree(server.pid), server.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address in /proc/net hex, port) of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.add((address, int(port, 16)))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net writes them
HAPROXY_PORTS = {8404, 9101}  # Ray's HAProxy stats page and Prometheus metrics


def serving_sockets(server: subprocess.Popen, url: str) -> set[tuple[str, int]]:
    """The service's port and the replicas' own HTTP ports, as listened on by the server's process tree."""
    port = int(url.rsplit(":", 1)[1])
    return {(a, p) for a, p in listening(process_tree(server.pid)) if p == port or 30000 <= p <= 31000}


def stop_and_check_nothing_is_left(server: subprocess.Popen, url: str, signum: int, in_flight: dict,
                                   headers: dict | None = None) -> str:  # fmt: skip
    """Send `signum` while the /score request `in_flight` runs: it must be answered (drained), and the server must
    exit 0 with no process of its tree alive and its port closed."""
    tree = process_tree(server.pid)
    assert tree, "jbert serve started no Ray"
    with ThreadPoolExecutor(1) as pool:
        request = pool.submit(post, f"{url}/score", in_flight, headers)
        time.sleep(0.5)
        server.send_signal(signum)
        output, _ = server.communicate(timeout=90)
        assert request.result().status_code == 200
    assert server.returncode == 0, output[-2000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(is_alive(pid) for pid in tree):
        time.sleep(0.2)
    survivors = [Path(f"/proc/{pid}/cmdline").read_bytes()[:100] for pid in tree if is_alive(pid)]
    assert not survivors, survivors
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)
    assert "Traceback" not in output and "jbert serve: stopped" in output, output[-2000:]
    return output


def test_a_body_that_stops_arriving_gets_408_on_time(extra_app):
    url = extra_app(body_timeout_s=1)
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        start = time.monotonic()
        connection.sendall(b"POST /extra/fill-mask HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n" + '{"text": "東京は[MA'.encode())  # fmt: skip
        answer = b""
        while not answer.endswith(b"}") and (chunk := connection.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer, answer[:300]
    assert time.monotonic() - start < 10


def test_jbert_serve_command_answers_sheds_overload_and_stops_on_ctrl_c(tiny_model_dir, sample_texts):
    limits = ["--max-ongoing-requests", "1", "--max-queued-requests", "1", "--max-batch-size", "1"]
    server, url = start_jbert_serve(tiny_model_dir, *limits, env={"JBERT_API_TOKEN": ""})
    try:
        response = post(f"{url}/fill-mask", {"text": "東京は日本の[MASK]です。", "top_k": 3})
        assert response.status_code == 200 and len(response.json()["predictions"][0][0]) == 3, response.text
        assert requests.get(f"{url}/info", timeout=10).json()["ingress"] == "serve-proxy"  # HAProxy is opt-in
        slow = {"texts": [t for t in sample_texts if 60 <= len(t) <= 140][:32]}  # ~3k masked copies a request
        with ThreadPoolExecutor(12) as pool:
            statuses = [r.status_code for r in pool.map(lambda _: post(f"{url}/score", slow), range(12))]
        assert 503 in statuses and 200 in statuses, statuses
        assert set(statuses) <= {200, 503}, statuses
        # The service and the replicas' own HTTP servers (high-throughput mode: 30000-31000) bind loopback, and
        # nothing listens on HAProxy's ports, which bind every interface.
        sockets = serving_sockets(server, url)
        assert any(30000 <= port <= 31000 for _, port in sockets), sockets
        assert {address for address, _ in sockets} <= LOOPBACK, sockets
        assert not {port for _, port in listening(process_tree(server.pid))} & HAPROXY_PORTS
        stop_and_check_nothing_is_left(server, url, signal.SIGINT, slow)  # Ctrl-C drains too
    finally:
        if server.poll() is None:
            kill_tree(server)


def test_jbert_serve_checks_its_token_and_drains_on_sigterm(tiny_model_dir, sample_texts):
    """The token from the environment only; compared as bytes (a non-ASCII header was a 500); SIGTERM (what
    Kubernetes, systemd and `timeout` send) finishes the request in flight, then stops everything."""
    token = "s3cret-トークン"
    server, url = start_jbert_serve(tiny_model_dir, "--haproxy", env={"JBERT_API_TOKEN": token})
    bearer = {"Authorization": b"Bearer " + token.encode()}  # UTF-8 on the wire
    body = {"text": "東京は[MASK]です。"}
    try:
        for headers in ({}, {"Authorization": "Bearer éé"}, {"Authorization": b"Bearer \xff\xfe"},
                        {"Authorization": "Basic czNjcmV0"}, {"Authorization": b"Bearer " + token[:-1].encode()}):  # fmt: skip
            wrong = post(f"{url}/fill-mask", body, headers=headers)
            assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"], (headers, wrong.text)
        for route in ("info", "openapi.json", "docs"):
            assert requests.get(f"{url}/{route}", timeout=10).status_code == 401, route
            assert requests.get(f"{url}/{route}", headers=bearer, timeout=10).status_code == 200, route
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        assert token not in requests.get(f"{url}/info", headers=bearer, timeout=10).text
        plain = requests.post(f"{url}/fill-mask", data=json.dumps(body), timeout=60,
                              headers={**bearer, "Content-Type": "text/plain"})  # fmt: skip
        assert plain.status_code == 200, plain.text  # with a token a browser cannot forge the request
        assert requests.get(f"{url}/info", headers=bearer, timeout=10).json()["ingress"] == "haproxy"
        assert {address for address, _ in serving_sockets(server, url)} <= LOOPBACK
        slow = {"texts": [t for t in sample_texts if 60 <= len(t) <= 140][:32]}
        stop_and_check_nothing_is_left(server, url, signal.SIGTERM, slow, bearer)
    finally:
        if server.poll() is None:
            kill_tree(server)
