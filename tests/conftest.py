"""Shared fixtures: the bundled Japanese sample, a small tokenizer trained on it, one local Ray cluster and one local
S3-compatible server."""

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Credentials for the local S3 server (moto accepts any); set before Ray starts so its workers inherit them.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
# Fuzz tests draw the same examples on every run, so CI is reproducible; `--hypothesis-profile explore` draws new
# ones (and 10x as many) to hunt for the next class of bad input.
settings.register_profile("ci", max_examples=200, derandomize=True, database=None)
settings.register_profile("explore", max_examples=2000)
settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
SAMPLE_PATH = REPO / "jbert_ray" / "sample" / "ja_sample.jsonl"
SHARED_CORPUS = REPO.parent / "shared" / "corpus"  # train/valid; tests needing it skip when it is absent
TEST_VOCAB_SIZE = 4000


def can_make_namespaces() -> bool:
    """Root with `ip` and `unshare`: the two-node test can build its hosts (network, mount, UTS namespaces)."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["ip", "netns", "add", "jbsnprobe"], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "del", "jbsnprobe"], capture_output=True, check=False)
    return probe.returncode == 0


def wait_for_group_exit(pgid: int, timeout_s: float = 30) -> None:
    """Wait until every process of a killed process group (a driver and the local Ray it started) is gone."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def read_sample(limit: int | None = None) -> list[str]:
    with open(SAMPLE_PATH, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:limit]


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    return read_sample()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, sample_texts) -> Path:
    """A WordPiece vocab trained on the sample's MeCab words, without Ray (about a second)."""
    from jbert_ray.tokenizer import TokenizerConfig, train_vocab_on_texts

    path = tmp_path_factory.mktemp("tokenizer")
    train_vocab_on_texts(sample_texts, TokenizerConfig(vocab_size=TEST_VOCAB_SIZE)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A randomly initialised tiny BertForMaskedLM (hidden 64, 2 layers) + the test tokenizer, as a model dir."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from jbert_ray.checkpoint import save_model_dir
    from jbert_ray.tokenizer import JapaneseTokenizer

    tokenizer = JapaneseTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=512, initializer_range=0.3,  # peaked predictions
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_model")
    save_model_dir(path, BertForMaskedLM(config), tokenizer)
    return path


@pytest.fixture(scope="session")
def tiny_modernbert_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A randomly initialised tiny ModernBertForMaskedLM (our default architecture) + the test tokenizer."""
    import torch

    from jbert_ray.checkpoint import save_model_dir
    from jbert_ray.model import PRESETS, build_model, hf_config_dict
    from jbert_ray.tokenizer import JapaneseTokenizer

    tokenizer = JapaneseTokenizer.from_pretrained(tokenizer_dir)
    special_ids = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
    torch.manual_seed(0)
    model = build_model(hf_config_dict(PRESETS["tiny"], "modernbert", tokenizer.vocab_size, special_ids))
    path = tmp_path_factory.mktemp("tiny_modernbert")
    save_model_dir(path, model, tokenizer)
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """One local 2-CPU Ray for the whole test session (start-up costs ~5 s)."""
    import ray
    import ray.data

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto's S3 server on 127.0.0.1 for the whole session: HOST:PORT."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> Callable[[str], str]:
    """A fresh bucket; call it with a key prefix to get that prefix's URI (endpoint in the query)."""
    import uuid

    import pyarrow.fs as pafs

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", allow_bucket_creation=True).create_dir(bucket)
    return lambda key: f"s3://{bucket}/{key}?endpoint_override={s3_endpoint}&scheme=http"
