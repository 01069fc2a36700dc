"""The command line is generated from the config classes: one flag per setting, checks in the configs, old
spellings still accepted."""

import dataclasses
import re

import pytest

from jbert_ray.cli import main
from jbert_ray.cli.data import PREPROCESS_FLAGS, VOCAB_FLAGS
from jbert_ray.cli.model import PRETRAIN_FLAGS, SCORE_FLAGS, SERVE_FLAGS
from jbert_ray.errors import UserError
from jbert_ray.preprocess import PreprocessConfig
from jbert_ray.pretrain.config import PretrainConfig
from jbert_ray.score import ScoreConfig
from jbert_ray.serve import ServeArgs
from jbert_ray.vocab import VocabConfig

RAY_FLAGS = {"--num-cpus", "--verbose"}
COMMANDS = [  # command, config class, its flag table, flags of the command itself
    ("vocab", VocabConfig, VOCAB_FLAGS, RAY_FLAGS),
    ("preprocess", PreprocessConfig, PREPROCESS_FLAGS, RAY_FLAGS),
    ("pretrain", PretrainConfig, PRETRAIN_FLAGS, RAY_FLAGS),
    ("score", ScoreConfig, SCORE_FLAGS, RAY_FLAGS),
    ("serve", ServeArgs, SERVE_FLAGS, RAY_FLAGS | {"--host", "--port", "--haproxy", "--allow-unauthenticated"}),
]


def help_flags(command: str, capsys) -> set[str]:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    options = re.findall(r"^  (-.*?)(?:\s{2,}|$)", capsys.readouterr().out, re.MULTILINE)  # the left column
    return {flag for column in options for flag in re.findall(r"--[a-z][a-z-]*", column)} - {"--help"}


def setting_paths(cls, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted path, default) of every leaf setting; nested config classes are walked."""
    if not dataclasses.is_dataclass(cls):  # pydantic (ServeArgs)
        return [(prefix + name, info.default) for name, info in cls.model_fields.items()]
    paths = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            paths += setting_paths(f.default_factory, prefix + f.name + ".")
        else:
            paths.append((prefix + f.name, f.default))
    return paths


@pytest.mark.parametrize("command, config, flags, extra", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_lists_exactly_one_flag_per_config_setting(command, config, flags, extra, capsys):
    expected = set(extra)
    for path, default in setting_paths(config):
        spec = flags.get(path)
        if spec is not None and spec.hidden:
            continue
        flag = spec.name if spec is not None and spec.name else "--" + path.rsplit(".", 1)[-1].replace("_", "-")
        expected.add(flag)
        if isinstance(default, bool):
            expected.add("--no-" + flag[2:])
    assert help_flags(command, capsys) == expected


def test_config_checks_run_for_python_callers_too():
    with pytest.raises(UserError, match="--top-k must be between 1 and 50"):
        ScoreConfig(input="corpus.jsonl", model_dir="model", output_dir="out", top_k=0)
    with pytest.raises(UserError, match="--eval-every must be at least 1"):
        PretrainConfig(data_dir="shards", output_dir="run", eval_every=0)
    with pytest.raises(UserError, match="not both"):
        PreprocessConfig(input="c", tokenizer_dir="t", output_dir="o", resume=True, overwrite=True)


def test_a_bad_value_is_one_error_line_before_anything_starts(capsys):
    assert main(["score", "--input", "c.jsonl", "--model", "m", "--out", "o", "--top-k", "0"]) == 2
    assert capsys.readouterr().err.strip() == "jbert score: error: --top-k must be between 1 and 50, not 0"
    assert main(["serve", "--model", "m", "--max-replicas", "0"]) == 2
    assert "--max-replicas: Input should be greater than or equal to 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, path, value",
    [
        (["score", "--input", "c", "--model", "m", "--out", "o", "--actors", "3"], "num_actors", 3),
        (["score", "--input", "c", "--model", "m", "--out", "o", "--id-column", "key"], "id_field", "key"),
        (["vocab", "--input", "c", "--out", "o", "--keep-non-japanese"], "text.require_japanese", False),
        (["pretrain", "--data", "d", "--out", "o", "--masking", "whole-word"], "masking.whole_word", True),
        (["pretrain", "--data", "d", "--out", "o", "--token-masking"], "masking.whole_word", False),
    ],
)
def test_old_spellings_still_work_but_are_hidden(argv, path, value, capsys):
    from jbert_ray.cli import build_parser

    assert getattr(build_parser(argv[0]).parse_args(argv), path) == value
    old = next(arg for arg in reversed(argv) if arg.startswith("--"))
    assert old not in help_flags(argv[0], capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["vocab", "--input", "{tmp}/none.jsonl", "--out", "{tmp}/tok"], "corpus not found"),
        (["preprocess", "--input", "{tmp}/c.jsonl", "--tokenizer", "{tmp}", "--out", "{tmp}/s"], "no vocab.txt"),
        (["pretrain", "--data", "{tmp}/none", "--out", "{tmp}/run"], "does not exist"),
        (["score", "--input", "{tmp}/c.jsonl", "--model", "{tmp}", "--out", "{tmp}/o"], "no config.json"),
    ],
    ids=["vocab", "preprocess", "pretrain", "score"],
)
def test_inputs_are_checked_before_ray_starts(argv, message, tmp_path, capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr("jbert_ray.cli.data.init_ray", no_ray)
    monkeypatch.setattr("jbert_ray.cli.model.init_ray", no_ray)
    (tmp_path / "c.jsonl").write_text('{"text": "東京は日本の首都です。"}\n', encoding="utf-8")
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "myhost.example"])
def test_serving_beyond_loopback_needs_a_token_or_an_explicit_flag(host, tiny_model_dir, capsys, monkeypatch):
    started = []
    monkeypatch.setattr("jbert_ray.cli.model.init_ray", lambda *a, **k: started.append(1) or 1 / 0)
    monkeypatch.delenv("JBERT_API_TOKEN", raising=False)
    assert main(["serve", "--model", str(tiny_model_dir), "--host", host]) == 2
    assert "set JBERT_API_TOKEN" in capsys.readouterr().err and not started
    for allowed in (["--allow-unauthenticated"], []):  # the flag, or a token in the environment
        monkeypatch.setenv("JBERT_API_TOKEN", "" if allowed else "s3cret")
        with pytest.raises(ZeroDivisionError):  # got past the check, to where Ray would start
            main(["serve", "--model", str(tiny_model_dir), "--host", host, *allowed])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_token(host, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("jbert_ray.cli.model.init_ray", lambda *a, **k: 1 / 0)
    monkeypatch.delenv("JBERT_API_TOKEN", raising=False)
    with pytest.raises(ZeroDivisionError):
        main(["serve", "--model", str(tiny_model_dir), "--host", host])


@pytest.mark.parametrize("argv, ray_cpus, replica_cpus", [
    ([], None, 1.0),
    (["--num-cpus", "2"], 2, 1.0),
    (["--num-cpus", "2", "--replica-cpus", "0.5"], 2, 0.5),
])  # fmt: skip
def test_serve_keeps_the_local_rays_cpus_apart_from_each_replicas(argv, ray_cpus, replica_cpus):
    """Both were `num_cpus`: a plain `jbert serve` started a 1-CPU Ray, where a second replica never fit."""
    from jbert_ray.cli import build_parser
    from jbert_ray.cli.flags import config_from_args

    args = build_parser("serve").parse_args(["serve", "--model", "m", *argv])
    assert args.ray_num_cpus == ray_cpus
    assert config_from_args(ServeArgs, args, SERVE_FLAGS).num_cpus == replica_cpus
