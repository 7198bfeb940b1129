"""Links that cannot rot: every pointer into the docs names a file and a heading that exist.

Code, configs and scripts point readers at ``docs/<page>.md#<anchor>``; the Markdown pages
link to each other with relative links. A heading renamed or a page split silently breaks
such a pointer, so this test resolves every one of them the way GitHub renders anchors:
the heading's text, lower-cased, with every character that is not a letter, digit, space,
``-`` or ``_`` removed and spaces turned into ``-``; a repeated slug gets ``-1``, ``-2``.
Headings inside fenced code blocks are not headings (a ``# comment`` in a bash block).

It also keeps the README a front door (at most 12,000 characters, the two commands on the
first screen) and the code free of pointers at README headings, which move whenever the
README is edited.
"""

import pathlib
import re

import pytest


def _repo_root() -> pathlib.Path:
    # Found by content, not by depth, so the file can move within tests/.
    for parent in pathlib.Path(__file__).resolve().parents:
        if (parent / "README.md").is_file() and (parent / "flatfsc_jax").is_dir():
            return parent
    raise RuntimeError(f"no repository root above {__file__}")


ROOT = _repo_root()
README_MAX_CHARS = 12_000
FIRST_SCREEN_LINES = 40
ZOO_LISTING_MARKERS = ("<!-- zoo-listing:begin -->", "<!-- zoo-listing:end -->")

# Folders and files whose text may point into the docs. This file is left out of the
# repository scan: it spells broken pointers on purpose, to test the checker.
CODE_DIRS = ("flatfsc_jax", "configs", "bench", "tools", "scripts", "tests")
CODE_SUFFIXES = (".py", ".sh")
CODE_FILES = ("run.sh", "test.sh")
MARKDOWN_FILES = ("README.md", "CONTRIBUTING.md", "CHANGELOG.md")

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
_MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_DOCS_POINTER = re.compile(r"(?<![\w/.-])(docs/[\w.-]+\.md)(?:#([\w-]+))?")
_README_POINTER = re.compile(r"\bREADME\b(?!\.md)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (before de-duplication)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML renders as nothing
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every anchor of a Markdown text: headings outside code fences, plus HTML anchors."""
    found, seen, in_fence = set(), {}, False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        found.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def _strip_fences(markdown: str) -> str:
    """The text outside fenced code blocks (links inside them are code, not links)."""
    kept, in_fence = [], False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        kept.append("" if in_fence else line)
    return "\n".join(kept)


def _target_error(root, path: pathlib.Path, anchor: str | None, cache: dict) -> str | None:
    if not path.exists():
        shown = path.relative_to(root) if path.is_relative_to(root) else path
        return f"{shown.as_posix()} does not exist"
    if anchor is None:
        return None
    if path.suffix != ".md":
        return f"{path} is not Markdown, so #{anchor} names no heading"
    if path not in cache:
        cache[path] = anchors(path.read_text(encoding="utf-8"))
    if anchor not in cache[path]:
        return f"{path.name} has no heading with anchor #{anchor}"
    return None


def broken_links(root: pathlib.Path, code: list, markdown: list) -> list[str]:
    """``file:line: problem`` for every pointer in ``code`` / ``markdown`` that does not resolve.

    Code files (and Markdown, in its prose) may write ``docs/<page>.md#<anchor>``, read from
    ``root``; Markdown links are read relative to the page that holds them.
    """
    cache: dict = {}
    problems = []

    def check(source, lineno, target, anchor):
        error = _target_error(root, target, anchor, cache)
        if error:
            problems.append(f"{source.relative_to(root)}:{lineno}: {error}")

    for path in [*code, *markdown]:
        text = path.read_text(encoding="utf-8")
        is_markdown = path.suffix == ".md"
        lines = _strip_fences(text).splitlines() if is_markdown else text.splitlines()
        for lineno, line in enumerate(lines, 1):
            for page, anchor in _DOCS_POINTER.findall(line):
                check(path, lineno, root / page, anchor or None)
            if not is_markdown:
                continue
            for link in _MD_LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = link.partition("#")
                target = (path.parent / file_part).resolve() if file_part else path
                check(path, lineno, target, anchor or None)
    return list(dict.fromkeys(problems))  # a Markdown link to docs/ matches both patterns


def readme_pointers(root: pathlib.Path, files: list) -> list[str]:
    """``file:line: text`` for every line that points at the README instead of a docs page."""
    hits = []
    for path in files:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _README_POINTER.search(line):
                hits.append(f"{path.relative_to(root)}:{lineno}: {line.strip()}")
    return hits


def _code_files(root: pathlib.Path) -> list[pathlib.Path]:
    files = [
        path
        for folder in CODE_DIRS
        for path in sorted((root / folder).rglob("*"))
        if path.suffix in CODE_SUFFIXES and path.is_file()
    ]
    files += sorted((root / "notebooks").glob("*.py"))
    files += [root / name for name in CODE_FILES if (root / name).is_file()]
    this = pathlib.Path(__file__).resolve()
    return [path for path in files if path.resolve() != this]


def _markdown_files(root: pathlib.Path) -> list[pathlib.Path]:
    files = [root / name for name in MARKDOWN_FILES if (root / name).is_file()]
    return files + sorted((root / "docs").glob("*.md"))


# -------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    "heading, slug",
    [
        # Anchors GitHub gave the headings of earlier READMEs (their tables of contents).
        ("What `./run.sh` does, and what it found", "what-runsh-does-and-what-it-found"),
        (
            "The paper's Meta-Dataset numbers, for comparison (a different benchmark)",
            "the-papers-meta-dataset-numbers-for-comparison-a-different-benchmark",
        ),
        (
            "Fusion by distillation (URL): `erm+kd`, `sam+kd`",
            "fusion-by-distillation-url-ermkd-samkd",
        ),
        ("Per-domain table (Meta-Dataset)", "per-domain-table-meta-dataset"),
        ("Install, extras, accelerators", "install-extras-accelerators"),
        ("XLA CPU loops", "xla-cpu-loops"),
        ("snake_case stays", "snake_case-stays"),
        ("See [the zoo](zoo.md)", "see-the-zoo"),
    ],
)
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_anchors_deduplicate_and_skip_code_fences():
    text = '# Notes\n## Notes\n## Notes\n```bash\n# not a heading\n```\n<a id="custom"></a>\n'
    assert anchors(text) == {"notes", "notes-1", "notes-2", "custom"}


def _write(root: pathlib.Path, relative: str, text: str) -> pathlib.Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_checker_rejects_broken_links(tmp_path):
    _write(tmp_path, "docs/perf.md", "# Perf\n## XLA CPU loops\n## Twice\n## Twice\n")
    good_md = _write(
        tmp_path,
        "docs/ok.md",
        "# Ok\nSee [loops](perf.md#xla-cpu-loops), [again](perf.md#twice-1), [top](#ok),\n"
        "[root](../README.md), ![img](perf.md) and [web](https://example.org/x#y).\n"
        "```\n[inside a fence](missing.md#nothing)\n```\n",
    )
    _write(tmp_path, "README.md", "# Front\n")
    good_code = _write(tmp_path, "pkg/mod.py", "# why: docs/perf.md#xla-cpu-loops\n")
    assert broken_links(tmp_path, [good_code], [good_md]) == []

    bad_md = _write(
        tmp_path,
        "docs/bad.md",
        "# Bad\n[a](perf.md#xla-loops)\n[b](gone.md)\n[c](#nowhere)\n[d](perf.md#twice-2)\n",
    )
    bad_code = _write(
        tmp_path,
        "pkg/bad.py",
        "# see docs/perf.md#missing-anchor\n# and docs/gone.md#perf\nx = 1  # docs/perf.md\n",
    )
    problems = broken_links(tmp_path, [bad_code], [bad_md])
    assert problems == [
        "pkg/bad.py:1: perf.md has no heading with anchor #missing-anchor",
        "pkg/bad.py:2: docs/gone.md does not exist",
        "docs/bad.md:2: perf.md has no heading with anchor #xla-loops",
        "docs/bad.md:3: docs/gone.md does not exist",
        "docs/bad.md:4: bad.md has no heading with anchor #nowhere",
        "docs/bad.md:5: perf.md has no heading with anchor #twice-2",
    ]


def test_readme_pointer_check_flags_headings_not_other_readmes(tmp_path):
    flagged = _write(
        tmp_path,
        "pkg/a.py",
        '"""Rules of README "Reliability".\n\nSee README Benchmarks, the README\'s command."""\n',
    )
    allowed = _write(tmp_path, "pkg/b.py", "# provenance in that folder's README.md\n")
    assert readme_pointers(tmp_path, [flagged, allowed]) == [
        'pkg/a.py:1: """Rules of README "Reliability".',
        'pkg/a.py:3: See README Benchmarks, the README\'s command."""',
    ]


# ------------------------------------------------------------------- the repository


def test_repository_scan_covers_code_and_pages():
    code = {p.relative_to(ROOT).as_posix() for p in _code_files(ROOT)}
    pages = {p.relative_to(ROOT).as_posix() for p in _markdown_files(ROOT)}
    assert {"run.sh", "test.sh", "configs/glyphs.py"} <= code
    assert any(name.startswith("notebooks/") for name in code)
    assert {"README.md", "docs/design.md", "docs/performance.md"} <= pages
    assert "tests/" + pathlib.Path(__file__).name not in code


def test_every_docs_link_resolves():
    problems = broken_links(ROOT, _code_files(ROOT), _markdown_files(ROOT))
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= README_MAX_CHARS, f"README.md is {len(text)} characters"
    first_screen = "\n".join(text.splitlines()[:FIRST_SCREEN_LINES])
    for command in ("./run.sh", "./test.sh"):
        assert command in first_screen, f"{command} is not in the README's first screen"


def test_code_does_not_point_at_readme_headings():
    # Other README.md files may be named (the provenance note of the shipped Meta-Dataset
    # splits); the README's sections may not.
    hits = readme_pointers(ROOT, _code_files(ROOT))
    assert not hits, "point at docs/<page>.md#<anchor> instead:\n" + "\n".join(hits)


def test_zoo_page_lists_the_default_recipe():
    """The listing is of a real default run: every seen script's erm and sam backbone, with
    the steps and rho of configs/glyphs.py (a stale listing once showed old defaults)."""
    from configs import glyphs

    text = (ROOT / "docs" / "zoo.md").read_text(encoding="utf-8")
    begin, end = (text.index(marker) for marker in ZOO_LISTING_MARKERS)
    assert begin < end
    listed = {}
    for line in text[begin:end].splitlines():
        parts = line.split()
        if parts and parts[0].startswith("glyphs/"):  # entry, arch, width, steps, rho, acc
            listed[parts[0]] = (int(parts[3]), float(parts[4]))
    for domain in glyphs.get_config().domains:
        row = glyphs.GLYPHS_TABLE[domain]
        assert listed[f"glyphs/{domain}/erm"] == (row["num_steps"], 0.0)
        assert listed[f"glyphs/{domain}/sam"] == (row["num_steps"], row["rho"])
