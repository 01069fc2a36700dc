"""Nothing we did not write is ever deleted, no output overlaps an input, and one run at a time writes an output:
the checks every stage runs before any work, as `jbert` runs them (no Ray: they fail before it starts), on local
disk and on the local S3 server."""

import shutil
import time

import pytest

from jbert_ray.cli import main
from jbert_ray.errors import UserError
from jbert_ray.outputs import LOCK, MARKER, OutputLock, check_output, clear_output
from jbert_ray.storage import Store
from tests.conftest import SAMPLE_PATH


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path, monkeypatch):
    """Where outputs go: a function of a relative name giving a local path or an s3:// URI."""
    if request.param == "s3":
        import jbert_ray.outputs

        # The lease's write-wait-read settles in 1 s against a remote store; the local server answers in ms.
        monkeypatch.setattr(jbert_ray.outputs, "_LEASE_SETTLE_S", 0.05)
        return request.getfixturevalue("s3_bucket")
    return lambda name: str(tmp_path / name)


@pytest.fixture
def corpus_dir(tmp_path):
    """A folder holding a real Japanese corpus, as a user's data/ folder would."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(SAMPLE_PATH, folder / "ja.jsonl")
    return folder


def run_jbert(capsys, *argv) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err.strip()


def test_score_refuses_an_output_that_is_its_corpus(corpus_dir, tiny_model_dir, capsys):
    before = sorted(p.name for p in corpus_dir.iterdir())
    for out in (corpus_dir, corpus_dir / "scores", corpus_dir.parent):  # the corpus, inside it, above it
        code, err = run_jbert(capsys, "score", "--input", corpus_dir, "--model", tiny_model_dir,
                              "--out", out, "--overwrite")  # fmt: skip
        assert code == 2 and "overlap" in err and "\n" not in err, err
    glob = f"{corpus_dir}/*.jsonl"
    code, err = run_jbert(capsys, "score", "--input", glob, "--model", tiny_model_dir, "--out", corpus_dir)
    assert code == 2 and "overlap" in err
    assert sorted(p.name for p in corpus_dir.iterdir()) == before
    assert (corpus_dir / "ja.jsonl").read_bytes() == SAMPLE_PATH.read_bytes()


def test_score_refuses_to_write_over_its_model(corpus_dir, tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    code, err = run_jbert(capsys, "score", "--input", corpus_dir, "--model", model, "--out", model, "--overwrite")
    assert code == 2 and "model" in err and "overlap" in err
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())


def test_an_output_next_to_a_single_corpus_file_is_fine(corpus_dir):
    out = check_output(corpus_dir / "scores", "score", inputs={"corpus": str(corpus_dir / "ja.jsonl")})
    assert out.read_json(MARKER) == {"stage": "score"}


@pytest.mark.parametrize("stage", ["score", "vocab"])
def test_overwrite_never_deletes_a_folder_we_did_not_write(location, stage):
    notes = Store(location("notes"))
    notes.write_text("todo.txt", "明日は雨が降るでしょう。")
    with pytest.raises(UserError, match="files jbert did not write"):
        check_output(notes.location, stage, overwrite=True)
    with pytest.raises(UserError, match="not a `jbert score` output"):
        clear_output(notes, "score")
    assert notes.files() == ["todo.txt"]


def test_overwrite_clears_our_own_output_of_the_same_stage_only(location):
    out = check_output(location("out"), "score")
    out.write_text("parts/part-00000.parquet", "x")
    with pytest.raises(UserError, match="holds a `jbert score` output"):
        check_output(out.location, "vocab", overwrite=True)
    out = check_output(out.location, "score", overwrite=True)
    clear_output(out, "score")
    assert out.files() == [MARKER]


def test_an_output_that_a_failed_start_left_holding_only_our_marker_is_empty(location):
    check_output(location("out"), "score")
    check_output(location("out"), "score")  # no --overwrite needed: nothing but the marker is there


def test_a_bucket_root_is_never_an_output(s3_bucket):
    bucket_root = s3_bucket("x").replace("/x?", "?")
    with pytest.raises(UserError, match="bucket's root"):
        check_output(bucket_root, "vocab", overwrite=True)


def test_a_second_run_on_one_output_is_refused_until_the_first_ends(location):
    out = check_output(location("out"), "score")
    first = OutputLock(out, "score").acquire()
    with pytest.raises(UserError, match=r"another `jbert score` run \(pid \d+ on .*\) is writing to"):
        OutputLock(out, "score").acquire()
    first.release()
    OutputLock(out, "score").acquire().release()


def test_a_second_score_command_is_refused_with_one_line(corpus_dir, tiny_model_dir, tmp_path, capsys):
    out = check_output(tmp_path / "scores", "score")
    with OutputLock(out, "score"):
        code, err = run_jbert(capsys, "score", "--input", corpus_dir, "--model", tiny_model_dir,
                              "--out", out.location, "--resume")  # fmt: skip
    assert code == 2 and "another `jbert score` run" in err and "\n" not in err


def test_a_stale_lease_of_a_dead_run_is_taken_over_and_the_stalled_run_learns_it(s3_bucket, monkeypatch):
    import jbert_ray.outputs as outputs

    out = check_output(s3_bucket("out"), "pretrain")
    dead = {"token": "dead", "stage": "pretrain", "host": "h", "pid": 1, "heartbeat": time.time() - 3600}
    out.write_json(LOCK, dead)
    monkeypatch.setattr(outputs, "_HEARTBEAT_S", 0.2)
    alive = OutputLock(out, "pretrain").acquire()
    assert out.read_json(LOCK)["token"] == alive.token
    out.write_json(LOCK, {**dead, "token": "newer", "heartbeat": time.time()})  # it stalled; another run took over
    deadline = time.time() + 10
    while not alive.lost and time.time() < deadline:
        time.sleep(0.1)
    assert alive.lost
    alive.release()
    assert out.read_json(LOCK)["token"] == "newer"  # releasing never deletes another run's lease


def test_a_damaged_state_file_is_an_error_not_a_fresh_start(location):
    store = Store(location("run"))
    store.write_bytes("stream.json", b'{"start_sequence": 40')
    with pytest.raises(UserError, match=r"stream.json\S* is damaged"):
        store.read_json("stream.json", default={})
    assert store.read_json("missing.json", default={}) == {}


def test_on_one_bucket_an_output_at_or_above_an_input_overlaps_and_a_sibling_does_not(s3_bucket):
    model = s3_bucket("models/m")
    Store(model).write_text("config.json", '{"model_type": "bert"}')
    for out in ("models/m", "models", "models/m/scores"):
        with pytest.raises(UserError, match="overlap"):
            check_output(s3_bucket(out), "score", inputs={"model": model}, overwrite=True)
    check_output(s3_bucket("scores"), "score", inputs={"model": model, "corpus": s3_bucket("data/*.jsonl")})
    with pytest.raises(UserError, match="corpus .* overlap"):
        check_output(s3_bucket("data/out"), "score", inputs={"corpus": s3_bucket("data/*.jsonl")})


def test_the_lease_of_a_killed_run_on_this_host_is_taken_over_at_once(s3_bucket):
    import socket
    import subprocess

    out = check_output(s3_bucket("out"), "preprocess")
    killed = subprocess.Popen(["sleep", "30"])
    killed.kill()
    killed.wait()  # reaped: its pid names no process
    holder = {"token": "killed", "host": socket.gethostname(), "pid": killed.pid}
    out.write_json(LOCK, {**holder, "stage": "preprocess", "heartbeat": time.time()})
    with OutputLock(out, "preprocess") as lock:
        assert out.read_json(LOCK)["token"] == lock.token
    out.write_json(LOCK, {**holder, "pid": 1, "heartbeat": time.time()})  # alive (init): refused
    with pytest.raises(UserError, match="another `jbert preprocess` run .* lease to go stale"):
        OutputLock(out, "preprocess").acquire()
