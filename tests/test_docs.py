"""The README stays short and keeps the set-up commands CI runs; the docs build's generated content resolves.

The full site is built by ``mkdocs build --strict`` in CI (.ci/run); these tests cover the parts of
``scripts/docs_hooks.py`` that a broken results file or a careless edit would silently empty, without a build.
"""

import importlib.util
import re
from types import SimpleNamespace

import pytest
from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def load_hooks():
    pytest.importorskip("mkdocs", reason="the [docs] extra is not installed")
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_readme_setup_commands_are_the_ones_ci_runs():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    block = re.search(r"## Set-up \(two commands\)\n\n```bash\n(.*?)```", README, re.DOTALL)
    assert block, "README lost its set-up section"
    commands = [line for line in block.group(1).splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    install, test = commands
    # CI runs command 1 step by step (quietly) and command 2 verbatim
    for step in install.split(" && "):
        if step.startswith("python examples/") or step.startswith(". .venv") or step.startswith("python3 -m venv"):
            continue
        assert step.replace("pip install ", "pip install -q ", 1) in ci, step
    assert test in ci


def test_readme_links_into_docs_exist():
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert links, "README no longer links into the docs"
    for link in links:
        assert (REPO / link).is_file(), link


def test_every_results_directive_in_the_docs_resolves():
    hooks = load_hooks()
    found = 0
    for page in (REPO / "docs").rglob("*.md"):
        for match in hooks.DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            found += 1
            body = hooks.extract(
                hooks.RESULTS / match.group("path"), match.group("section"), with_preamble=not match.group("only")
            )
            assert body and "|" in body, f"{page.name}: {match.group(0)} resolves to no table"
    assert found >= 4


def test_extract_keeps_the_preamble_and_named_sections_only(tmp_path):
    hooks = load_hooks()
    results = tmp_path / "r.md"
    results.write_text("# Title\n\nDate X; command: `run`\n\n## A\n\n| a |\n\n### A.1\n\ntext\n\n## B\n\n| b |\n")
    both = hooks.extract(results, "A|B", with_preamble=True)
    assert both.startswith("Date X") and "## A" in both and "### A.1" in both and "| b |" in both
    assert "# Title" not in both
    one = hooks.extract(results, "A", with_preamble=False)
    assert one.startswith("| a |") and "| b |" not in one and "Date X" not in one
    assert hooks.extract(results, "A|No such section", with_preamble=True) is None
    assert hooks.extract(tmp_path / "missing.md", None, with_preamble=True) is None
    assert hooks.relevel("## A\n\n### A.1", base=2) == "### A\n\n#### A.1"


def test_missing_results_section_is_reported_and_todo_comments_are_not_rendered(caplog):
    hooks = load_hooks()
    page = SimpleNamespace(file=SimpleNamespace(src_uri="guides/x.md"))
    markdown = "# X\n\n<!-- TODO(someone): private note\n     second line -->\nkept\n\n<!-- results: nope.md#A -->\n"
    with caplog.at_level("WARNING"):
        out = hooks.on_page_markdown(markdown, page, config=None, files=None)
    assert "TODO" not in out and "private note" not in out and "kept" in out
    assert any("nope.md" in record.getMessage() for record in caplog.records)


def test_api_entries_follow_moved_modules():
    hooks = load_hooks()
    moved = {"peqa_peft.export": "peqa_peft.integrations.formats"}
    assert hooks.current_name("peqa_peft.export.export", moved) == "peqa_peft.integrations.formats.export"
    assert hooks.current_name("peqa_peft.exporter", moved) == "peqa_peft.exporter"
    assert hooks.current_name("peqa_peft.PeqaConfig", moved) == "peqa_peft.PeqaConfig"
    assert isinstance(hooks.moved_modules(), dict)
