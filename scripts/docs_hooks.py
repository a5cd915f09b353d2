"""mkdocs hooks (``hooks:`` in mkdocs.yml): benchmark pages generated from ``benchmarks/results/`` at build time.

The benchmark scripts write their tables as markdown (``results.md``, ``speed.md``, ...) next to their JSON. Pasting
those tables into the docs would let the two drift apart, so the build reads the files instead:

- every ``benchmarks/results/**/*.md`` becomes a page ``results/<same path>`` (with the plots of its directory), and
- a page may embed such a file, or some of its sections, with a line
  ``<!-- results: PATH[#Section[|Other section]][ section-only] -->``: the file's preamble (date, machine, command,
  settings: everything before its first section) unless ``section-only``, then the named sections (one named
  section loses its own heading); headings are re-levelled under the page's current one.

``::: module.name`` API entries follow modules that moved (``MOVED`` in ``peqa_peft/_deprecated.py``), since
mkdocstrings reads the source and cannot see import-time aliases.

``<!-- TODO ... -->`` comments in the markdown source are notes for maintainers and are removed before rendering.

A directive that names a missing file or section fails the build (a warning, which ``--strict`` turns into an
error), so a renamed results file cannot silently empty a page.

The CLI reference is generated the same way: ``<!-- cli-help -->`` expands to the ``--help`` output of
``python -m peqa_peft`` and each of its sub-commands, run once per build in a subprocess.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.results")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# README_table.md is run.py's copy of the Headline section of results.md, written for pasting; not a page of its own.
SKIP = {"README_table.md"}
DIRECTIVE = re.compile(
    r"^<!-- results: (?P<path>[^#\s]+)(?:#(?P<section>[^>]+?))?(?P<only> section-only)? -->$", re.MULTILINE
)
CLI_DIRECTIVE = re.compile(r"^<!-- cli-help -->$", re.MULTILINE)
# notes for maintainers in the markdown source (`<!-- TODO ... -->`): Python-Markdown would copy an HTML comment into
# the page's HTML, so they are removed before rendering
TODO_COMMENT = re.compile(r"^<!-- TODO.*?-->\n?", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^(#{1,6}) (.*)$")
API_DIRECTIVE = re.compile(r"^::: (?P<name>[\w.]+)$", re.MULTILINE)


def result_pages() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*.md") if p.name not in SKIP)


def page_uri(path: Path) -> str:
    return "results/" + path.relative_to(RESULTS).as_posix()


def page_text(path: Path) -> str:
    """The results file as a page: a title if it has none, then its text, then the plots beside it."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(RESULTS).as_posix()
    if not text.lstrip().startswith("# "):
        text = f"# `benchmarks/results/{rel}`\n\n{text}"
    source = f"\n\n*Generated at build time from `benchmarks/results/{rel}`; do not edit here.*\n"
    lines = text.splitlines()
    text = "\n".join(lines[:1] + [source] + lines[1:])
    plots = sorted(path.parent.glob("*.png"))
    if plots and path.name == "results.md":
        text += "\n\n## Plots\n\n" + "\n\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    return text


def preamble(lines: list[str]) -> list[str]:
    """What a results file says before its first section: its date, machine, command and settings."""
    end = next((i for i, line in enumerate(lines) if (m := HEADING.match(line)) and len(m.group(1)) > 1), len(lines))
    return [line for line in lines[:end] if not line.startswith("# ")]


def section(lines: list[str], heading: str, keep_heading: bool) -> list[str] | None:
    """The lines of the section titled ``heading`` (up to the next heading of its level or above); None if absent."""
    for i, line in enumerate(lines):
        m = HEADING.match(line)
        if m and m.group(2).strip() == heading.strip():
            level = len(m.group(1))
            end = next(
                (j for j in range(i + 1, len(lines)) if (h := HEADING.match(lines[j])) and len(h.group(1)) <= level),
                len(lines),
            )
            return lines[i if keep_heading else i + 1 : end]
    return None


def extract(path: Path, sections: str | None, with_preamble: bool) -> str | None:
    """The embedded text: the preamble (unless ``section-only``) and the ``|``-separated sections, or the whole file
    without its title when no section is named. None when the file or a section is missing."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    if sections is None:
        return "\n".join(line for line in lines if not line.startswith("# ")).strip()
    names = [name for name in sections.split("|") if name.strip()]
    out = preamble(lines) if with_preamble else []
    for name in names:
        body = section(lines, name, keep_heading=len(names) > 1)
        if body is None:
            return None
        out += ["", *body]
    return "\n".join(out).strip()


def relevel(body: str, base: int) -> str:
    """Shift the headings of an embedded section so its top level sits one below ``base``."""
    levels = [len(m.group(1)) for m in map(HEADING.match, body.splitlines()) if m]
    if not levels:
        return body
    shift = base + 1 - min(levels)
    return "\n".join(
        (("#" * min(6, len(m.group(1)) + shift)) + " " + m.group(2)) if (m := HEADING.match(line)) else line
        for line in body.splitlines()
    )


def cli_help() -> str:
    """``--help`` of ``python -m peqa_peft`` and every sub-command, from one subprocess (importing torch once)."""
    code = (
        "import contextlib, io, runpy, sys\n"
        "for args in ([], ['train'], ['eval'], ['export']):\n"
        "    sys.argv = ['peqa-peft', *args, '--help']\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            runpy.run_module('peqa_peft', run_name='__main__', alter_sys=True)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    print('\\x00' + ' '.join(['peqa-peft', *args]) + '\\x01' + buf.getvalue())\n"
    )
    env = {
        **os.environ,
        "COLUMNS": "80",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("HF_HUB_OFFLINE", "1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"`python -m peqa_peft --help` failed:\n{out.stderr[-2000:]}")
    parts = []
    for chunk in out.stdout.split("\x00")[1:]:
        name, _, text = chunk.partition("\x01")
        parts.append(f"### `{name}`\n\n```text\n{text.strip()}\n```\n")
    return "\n".join(parts)


def moved_modules() -> dict[str, str]:
    """``MOVED`` of ``peqa_peft/_deprecated.py`` (old module -> new module), read without importing the package.

    mkdocstrings reads the source statically, so it cannot follow the import-time aliases that keep old module paths
    working; an API page written against a public path (``::: peqa_peft.export.export``) is pointed at the module's
    current home instead. Empty when the package has no moved modules.
    """
    path = REPO / "peqa_peft" / "_deprecated.py"
    if not path.is_file():
        return {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MOVED" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def current_name(name: str, moved: dict[str, str]) -> str:
    """``name`` with its longest moved module prefix replaced by the new module."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in moved:
            return ".".join([moved[prefix], *parts[i:]])
    return name


def on_files(files, config):
    for path in result_pages():
        files.append(File.generated(config, page_uri(path), content=page_text(path)))
        if path.name == "results.md":
            for png in sorted(path.parent.glob("*.png")):
                files.append(File.generated(config, page_uri(png), abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    markdown = TODO_COMMENT.sub("", markdown)
    moved = moved_modules()
    if moved:
        markdown = API_DIRECTIVE.sub(lambda m: f"::: {current_name(m.group('name'), moved)}", markdown)
    if CLI_DIRECTIVE.search(markdown):
        markdown = CLI_DIRECTIVE.sub(lambda _: cli_help(), markdown)

    def expand(match: re.Match) -> str:
        rel, heading = match.group("path"), match.group("section")
        path = RESULTS / rel
        body = extract(path, heading, with_preamble=not match.group("only"))
        if body is None:
            log.warning(f"{page.file.src_uri}: no results section {rel}#{heading} in benchmarks/results/")
            return match.group(0)
        before = markdown[: match.start()]
        levels = [len(m.group(1)) for m in map(HEADING.match, before.splitlines()) if m]
        base = levels[-1] if levels else 1
        link_base = os.path.relpath(page_uri(path), os.path.dirname(page.file.src_uri) or ".").replace(os.sep, "/")
        return f"{relevel(body, base)}\n\n*From [`benchmarks/results/{rel}`]({link_base}), generated at build time.*"

    return DIRECTIVE.sub(expand, markdown)
