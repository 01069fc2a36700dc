"""The README and docs/ say only what is there: every `jbert X` the README shows is a command, every relative link
in README.md and docs/*.md is a file or folder of this checkout (and every #anchor a heading of its page), and
`.ci/run` runs the README's test command."""

import re
from pathlib import Path

import pytest

from jbert_ray.cli import main
from tests.conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
COMMAND = re.compile(r"(?<![\w/.-])jbert ([a-z]+)\b")
EXTERNAL = ("http://", "https://", "mailto:")


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """The relative links of a Markdown page whose file, folder or #anchor does not exist ("page: target (why)")."""
    broken, name = [], page.relative_to(root)
    for target in LINK.findall(_without_code_blocks(page.read_text(encoding="utf-8"))):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{name}: {target} (no such heading)")
    return broken


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids of a page (lower case, punctuation dropped, spaces → -, repeats -1, -2…) and its
    explicit <a id=…>/<a name=…> anchors."""
    text = _without_code_blocks(page.read_text(encoding="utf-8"))
    found, seen = set(re.findall(r"<a (?:id|name)=\"([^\"]+)\"", text)), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = [link for page in PAGES for link in broken_links(page)]
    assert broken == [], "\n".join(broken)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Its `--flag` part\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#its---flag-part) [gone](missing.md) [no heading](other.md#nothing) "
                    "[web](https://example.com/x) ![pic](other.md)\n```sh\n[in code](nowhere.md)\n```\n",
                    encoding="utf-8")  # fmt: skip
    assert broken_links(page, root=tmp_path) == [
        "page.md: missing.md (no such file)", "page.md: other.md#nothing (no such heading)"]  # fmt: skip


@pytest.mark.parametrize("command", sorted(set(COMMAND.findall(README.read_text(encoding="utf-8")))))
def test_every_command_the_readme_shows_exists(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0, capsys.readouterr().err


def test_the_readme_shows_the_six_commands():
    shown = set(COMMAND.findall(README.read_text(encoding="utf-8")))
    assert {"vocab", "preprocess", "pretrain", "score", "serve", "demo"} <= shown


def test_ci_runs_the_readme_s_test_command():
    text = README.read_text(encoding="utf-8")
    test_line = next(line for line in text.splitlines() if line.endswith("&& python -m pytest"))
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").replace(" -q ", " ")
    for step in test_line.split(" && "):
        if step.startswith("pip install") or step == "python -m pytest":
            assert step in ci, step
    demo_line = next(line for line in text.splitlines() if line.endswith("&& jbert demo"))
    assert demo_line.split(" && jbert demo")[0].replace('-e .', '-e ".[dev]"') == test_line.split(" && python")[0]
