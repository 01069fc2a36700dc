"""`jbert score` on a local Ray: every row exactly once, scores equal MaskedLM.score, resume, filtering; model and
output on a local S3 server."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pyarrow.parquet as pq
import pytest

from jbert_ray.cli import main
from jbert_ray.inference import MaskedLM
from jbert_ray.storage import Store
from tests.conftest import REPO, read_sample, wait_for_group_exit

pytestmark = pytest.mark.ray

GOOD = 40
BAD_LINES = [b'{"text": "broken', b'{"text": ""}', b'{"no_text": 1}', b'{"text": 7}', b'{"text": "\\ud800\xe6\x97\xa5"}']
MASKED_TEXT = "セルに[MASK]を入力します。"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("score") / "corpus.jsonl"
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in read_sample(GOOD)]
    lines.append(json.dumps({"text": MASKED_TEXT}, ensure_ascii=False).encode())
    for i, line in enumerate(BAD_LINES):
        lines.insert(7 * (i + 1), line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def expected_ids(corpus) -> list[str]:
    return [f"{corpus}:{n}" for n in range(1, GOOD + len(BAD_LINES) + 2)]  # + the [MASK] line


def read_parts(out) -> dict:
    table = pq.read_table(sorted((out / "parts").glob("part-*.parquet")))
    return {name: table.column(name).to_pylist() for name in table.column_names}


def read_s3_parts(uri: str) -> dict:
    store = Store(uri)
    table = pq.read_table([store.full(p) for p in store.files("parts")], filesystem=store.filesystem)
    return {name: table.column(name).to_pylist() for name in table.column_names}


@pytest.fixture
def s3_model(s3_bucket, tiny_model_dir, tmp_path, monkeypatch) -> str:
    """The tiny model uploaded to a fresh bucket (the driver's cache of it under tmp_path)."""
    monkeypatch.setenv("JBERT_CACHE_DIR", str(tmp_path / "cache"))
    uri = s3_bucket("models/tiny")
    Store(uri).upload(tiny_model_dir)
    return uri


@pytest.fixture(scope="module")
def scored(ray_cluster, corpus, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "out"
    assert main(["score", "--input", str(corpus), "--model", str(tiny_model_dir), "--out", str(out),
                 "--batch-size", "8", "--rows-per-part", "16", "--filter-percentile", "25", "--no-progress"]) == 0
    return out


def test_every_row_exactly_once_with_errors_kept(scored, corpus):
    rows = read_parts(scored)
    assert sorted(rows["id"]) == sorted(expected_ids(corpus)) and len(rows["id"]) == len(set(rows["id"]))
    errors = sorted(e for e in rows["error"] if e)
    assert errors == sorted(["invalid_json", "empty", "missing_field", "not_text", "invalid_unicode"])
    summary = json.loads((scored / "summary.json").read_text())
    assert summary["rows_in"] == GOOD + 1 + len(BAD_LINES) and summary["rows_with_error"] == len(BAD_LINES)
    assert (scored / "pll_per_token.png").stat().st_size > 1000


def test_scores_equal_a_direct_masked_lm_call(scored, tiny_model_dir):
    rows = read_parts(scored)
    scored_rows = [(t, p, n) for t, p, n, e in zip(rows["text"], rows["pll"], rows["n_tokens"], rows["error"])
                   if not e]
    direct = MaskedLM.from_pretrained(tiny_model_dir, device="cpu").score([t for t, _, _ in scored_rows])
    for (_, pll, n_tokens), expected in zip(scored_rows, direct):
        assert n_tokens == expected["n_tokens"] and pll == pytest.approx(expected["pll"], abs=1e-4)


def test_masked_text_gets_fill_mask_candidates(scored):
    rows = read_parts(scored)
    fill = rows["fill_mask"][rows["text"].index(MASKED_TEXT)]
    assert len(fill) == 1 and len(fill[0]) == 5 and fill[0][0]["score"] >= fill[0][1]["score"]
    assert all(f is None for t, f in zip(rows["text"], rows["fill_mask"]) if t != MASKED_TEXT)


def test_percentile_filter_keeps_the_right_subset(scored, corpus):
    summary = json.loads((scored / "summary.json").read_text())
    kept = [json.loads(line)["text"] for line in (scored / "filtered" / "corpus.jsonl").read_text().splitlines()]
    rows = read_parts(scored)
    values = [v for v, e in zip(rows["pll_per_token"], rows["error"]) if not e]
    threshold = summary["filtered"]["threshold"]
    assert len(kept) == sum(v >= threshold for v in values) == summary["filtered"]["rows_kept"]
    assert set(kept) <= set(read_sample(GOOD)) | {MASKED_TEXT}
    assert len(values) * 0.7 <= len(kept) <= len(values) * 0.8 + 1


def test_too_long_text_is_an_error_row_under_the_error_policy(ray_cluster, tiny_model_dir, tmp_path):
    corpus = tmp_path / "long.txt"
    corpus.write_text("短い文です。\n" + "東京は日本の首都です。" * 200 + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["score", "--input", str(corpus), "--model", str(tiny_model_dir), "--out", str(out),
                 "--long-text", "error", "--no-progress"]) == 0
    rows = read_parts(out)
    errors = {text[:5]: error for text, error in zip(rows["text"], rows["error"])}  # parts hold no line order
    assert errors == {"短い文です": "", "東京は日本": "too_long"}


def test_killed_run_resumes_without_duplicates_or_gaps(corpus, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.score", "--input", str(corpus), "--model", str(tiny_model_dir),
            "--out", str(out), "--batch-size", "4", "--rows-per-part", "4", "--num-actors", "1", "--num-cpus", "2",
            "--no-progress"]
    # In a process group of its own with the local Ray it starts: all of it dies at once, as a lost node would.
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "parts").glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    wait_for_group_exit(process.pid)
    written = sum(json.loads(p.read_text())["stats"]["rows"] for p in (out / "done").glob("*/*.json"))
    assert 0 < written < len(expected_ids(corpus)) and not (out / "summary.json").exists()
    result = subprocess.run(args + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = read_parts(out)["id"]
    assert sorted(ids) == sorted(expected_ids(corpus)) and len(ids) == len(set(ids))
    assert json.loads((out / "summary.json").read_text())["rows_resumed"] == written


def test_missing_model_dir_is_one_clear_line(tmp_path, corpus):
    result = subprocess.run([sys.executable, "-m", "jobs.score", "--input", str(corpus), "--model",
                             str(tmp_path / "nope"), "--out", str(tmp_path / "o")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_small_corpus_is_cut_into_batch_sized_blocks(ray_cluster):
    # A read merges a small file into one block, and a block goes to one actor whole: without the cut, one
    # actor would score the whole sample while the others idle.
    from jbert_ray.corpus import read_corpus
    from tests.conftest import SAMPLE_PATH

    dataset = read_corpus(str(SAMPLE_PATH), rows_per_block=64).materialize()
    sizes = [block.num_rows for bundle in dataset.iter_internal_ref_bundles() for block in bundle.metadata]
    assert sum(sizes) == 9064
    assert len(sizes) >= 100 and max(sizes) <= 128


def test_model_and_output_on_s3_give_the_scores_of_a_local_run(scored, corpus, s3_model, s3_bucket):
    out = s3_bucket("scores")
    assert main(["score", "--input", str(corpus), "--model", s3_model, "--out", out, "--batch-size", "8",
                 "--rows-per-part", "16", "--filter-percentile", "25", "--no-progress"]) == 0  # fmt: skip
    store, rows, local = Store(out), read_s3_parts(out), read_parts(scored)
    assert sorted(rows["id"]) == sorted(expected_ids(corpus)) and len(store.files("parts")) >= 6  # ≤ 8 rows each
    local_pll = dict(zip(local["id"], local["pll"]))
    assert [local_pll[i] is None for i in rows["id"]] == [p is None for p in rows["pll"]]
    scored_ids = [(i, p) for i, p in zip(rows["id"], rows["pll"]) if p is not None]
    assert [p for _, p in scored_ids] == pytest.approx([local_pll[i] for i, _ in scored_ids], abs=1e-4)
    summary, local_summary = store.read_json("summary.json"), json.loads((scored / "summary.json").read_text())
    assert summary["rows_in"] == len(expected_ids(corpus)) and summary["config"]["model_dir"] == s3_model
    assert summary["filtered"]["rows_kept"] == local_summary["filtered"]["rows_kept"]
    assert store.is_file("filtered/corpus.jsonl") and len(store.read_bytes("pll_per_token.png")) > 1000


def test_resume_on_s3_scores_only_the_missing_ids(ray_cluster, corpus, s3_model, s3_bucket):
    out = s3_bucket("scores")
    args = ["score", "--input", str(corpus), "--model", s3_model, "--out", out, "--batch-size", "8",
            "--rows-per-part", "8", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    store = Store(out)
    parts = store.files("parts")
    for name in parts[len(parts) // 2 :] + ["summary.json"]:  # lost: their done records name missing parts
        store.delete(name)
    kept = read_s3_parts(out)["id"]
    assert main(args) == 2  # a non-empty output without --resume or --overwrite is refused
    assert main(args + ["--resume"]) == 0
    ids = read_s3_parts(out)["id"]
    assert sorted(ids) == sorted(expected_ids(corpus)) and len(ids) == len(set(ids))
    summary = store.read_json("summary.json")
    assert summary["rows_resumed"] == len(kept) and summary["rows_this_run"] == len(ids) - len(kept)


def test_missing_bucket_or_model_on_s3_is_one_clear_line(corpus, tiny_model_dir, s3_model, s3_endpoint, tmp_path,
                                                         capsys):  # fmt: skip
    missing_bucket = f"s3://no-such-{uuid.uuid4().hex[:8]}/scores?endpoint_override={s3_endpoint}&scheme=http"
    missing_model = s3_model.replace("models/tiny", "models/nope")
    cases = [(tiny_model_dir, missing_bucket, "cannot write to output"),
             (missing_model, str(tmp_path / "out"), "model directory not found: s3://")]  # fmt: skip
    for model, out, message in cases:
        assert main(["score", "--input", str(corpus), "--model", str(model), "--out", out]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_sigterm_stops_with_one_line_keeping_the_work_and_resume_finishes(tiny_model_dir, tmp_path):
    corpus = tmp_path / "ja.jsonl"
    texts = read_sample(400)
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.score", "--input", str(corpus), "--model", str(tiny_model_dir),
            "--out", str(out), "--batch-size", "200", "--flush-s", "0.01", "--num-actors", "1", "--num-cpus", "2",
            "--no-progress"]  # fmt: skip
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("done/*/*.json"))) < 2:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # what Kubernetes, systemd and `timeout` send
    _, err = process.communicate(timeout=120)
    kept = sum(json.loads(p.read_text())["stats"]["rows"] for p in out.glob("done/*/*.json"))
    assert process.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == [f"jbert score: stopped; {kept:,} scored rows are kept in {out}: run the same "
                                        "command with --resume to finish"], err[-3000:]  # fmt: skip
    assert 0 < kept < len(texts)
    result = subprocess.run(args + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = read_parts(out)["id"]
    assert sorted(ids) == sorted(f"{corpus}:{n}" for n in range(1, len(texts) + 1)) and len(ids) == len(set(ids))


def test_resume_refuses_a_moved_or_changed_corpus_before_any_work(scored, corpus, tiny_model_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(scored, out)
    moved = tmp_path / "moved" / corpus.name
    moved.parent.mkdir()
    shutil.copy2(corpus, moved)  # the same file elsewhere: its lines would be scored again under new ids
    args = ["score", "--input", str(moved), "--model", str(tiny_model_dir), "--out", str(out), "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "the corpus is not the one it scored: 1 files gone, 1 new (moved?" in err and "\n" not in err, err

    (out / "inputs.json").write_text(json.dumps([{"path": str(moved), "size": 1, "mtime_ns": 0}]))  # as if
    assert main(args) == 2  # that run had scored `moved` before a line was added to it
    err = capsys.readouterr().err.strip()
    assert f"the corpus is not the one it scored: 1 changed (e.g. {moved})" in err, err


def test_duplicate_ids_are_refused_before_scoring(ray_cluster, tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "ids.jsonl"
    rows = [{"id": f"doc-{i % 5}", "text": t} for i, t in enumerate(read_sample(8))]
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    code = main(["score", "--input", str(corpus), "--model", str(tiny_model_dir), "--out", str(out),
                 "--id-field", "id", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "ids are not unique" in err and "'doc-1' ×2" in err and "\n" not in err, err
    assert not (out / "parts").exists()


def test_a_row_over_max_tokens_per_row_is_too_long_even_with_windows(ray_cluster, tiny_model_dir, tmp_path):
    corpus = tmp_path / "long.txt"
    corpus.write_text("短い文です。\n" + "東京は日本の首都です。" * 20 + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["score", "--input", str(corpus), "--model", str(tiny_model_dir), "--out", str(out),
                 "--max-tokens-per-row", "50", "--no-progress"]) == 0  # fmt: skip
    rows = read_parts(out)
    errors = {text[:5]: error for text, error in zip(rows["text"], rows["error"])}  # parts hold no line order
    assert errors == {"短い文です": "", "東京は日本": "too_long"}


def test_the_strided_method_scores_through_jbert_score_as_the_inference_core_does(corpus, tiny_model_dir, tmp_path):
    from jbert_ray.inference import InferenceConfig

    out = tmp_path / "out"
    assert main(["score", "--input", str(corpus), "--model", str(tiny_model_dir), "--out", str(out),
                 "--method", "pll-strided", "--mask-stride", "4", "--filter-percentile", "10", "--no-progress"]) == 0
    rows = read_parts(out)
    scored = [(t, p) for t, p, e in zip(rows["text"], rows["pll"], rows["error"]) if not e]
    lm = MaskedLM.from_pretrained(tiny_model_dir, device="cpu", config=InferenceConfig(mask_stride=4))
    strided, exact = lm.score([t for t, _ in scored], "pll-strided"), lm.score([t for t, _ in scored])
    assert [p for _, p in scored] == pytest.approx([s["pll"] for s in strided], abs=1e-4)
    assert [p for _, p in scored] != pytest.approx([s["pll"] for s in exact], abs=1e-3)  # the method reached it
    assert json.loads((out / "summary.json").read_text())["config"]["method"] == "pll-strided"
