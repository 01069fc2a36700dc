"""read_corpus on a local Ray through a flaky filesystem (tests/faulty_fs.py): the copies pickled into read
tasks share one fault count, so a transient fault is retried mid-file, and a persistent one reaches the driver
as a UserError naming the file."""

import pyarrow.fs as pafs
import pytest

from jbert_ray import corpus
from jbert_ray.cli import _find_user_error
from jbert_ray.corpus import CorpusFiles, read_corpus
from jbert_ray.errors import UserError
from tests.conftest import SAMPLE_PATH
from tests.faulty_fs import Fault, faulty_filesystem

pytestmark = pytest.mark.ray


def test_a_read_task_retries_a_transient_error_and_fails_a_persistent_one_naming_the_file(
    ray_cluster, tmp_path, monkeypatch
):
    path = tmp_path / "a.jsonl"
    path.write_bytes(SAMPLE_PATH.read_bytes())
    clean = read_corpus(CorpusFiles([str(path)], pafs.LocalFileSystem()), positions=True).take_all()
    flaky = faulty_filesystem(Fault("read", after_bytes=1_000_000, times=2))
    assert read_corpus(CorpusFiles([str(path)], flaky), positions=True).take_all() == clean
    assert flaky.handler.calls(0) == 3  # two failed reads, then the one that resumed at byte 1,000,000

    monkeypatch.setattr(corpus, "_RETRY_DELAYS_S", (0.1,))  # taken by the datasource, on the driver
    broken = faulty_filesystem(Fault("read", after_bytes=1_000_000, times=9))
    with pytest.raises(UserError) as failure:  # Ray's RayTaskError(UserError): the CLI catches it
        read_corpus(CorpusFiles([str(path)], broken)).take_all()
    # What `jbert` prints: the innermost UserError (the wrapper's text is a traceback), its first line (Ray Data
    # appends retry advice on lines of its own).
    message = str(_find_user_error(failure.value)).splitlines()[0]
    assert message.startswith(f"cannot read corpus file {path} at byte 1,000,000: injected I/O error")
    assert message.endswith("then run again)") and "(2 attempts in " in message
