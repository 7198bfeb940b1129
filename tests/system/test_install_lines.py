"""The documented shell lines for preparing data run: their set-up part, in a dry mode,
installs the extras the preparation needs, and the modules they run exist.

The lines live in docs/data.md between ``<!-- prepare-commands:begin -->`` and
``<!-- prepare-commands:end -->``; reading them from there keeps the documentation and the
scripts from drifting apart (once, the documented line did not install TensorFlow).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "data.md")
BEGIN, END = "<!-- prepare-commands:begin -->", "<!-- prepare-commands:end -->"


def shell_lines(markdown: str) -> list[str]:
    """The commands of the fenced shell blocks between the markers, with ``\\``
    continuations joined and comments dropped; [] when the markers are absent."""
    if BEGIN not in markdown or END not in markdown:
        return []
    block = markdown.split(BEGIN, 1)[1].split(END, 1)[0]
    lines = []
    for fence in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", block, re.S):
        for line in fence.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            line = line[2:] if line.startswith("$ ") else line
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def dry_run(line: str, tmp_path) -> str:
    """Runs a setup_env.sh line from the repository root with FLATFSC_DRY_RUN set."""
    env = dict(os.environ, FLATFSC_DRY_RUN="1", FLATFSC_VENV=str(tmp_path / "venv"))
    env.pop("FLATFSC_EXTRAS", None)  # only what the line itself sets
    proc = subprocess.run(
        ["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"{line!r} failed:\n{proc.stderr}"
    return proc.stdout


def pip_extras(output: str) -> set[str]:
    match = re.search(r"pip install .*-e \S*\[([a-z0-9_,]*)\]", output)
    assert match, f"no pip install line in {output!r}"
    return set(match.group(1).split(","))


def test_shell_lines_are_read_from_the_marked_block():
    doc = (
        "text\n```bash\nignored outside\n```\n" + BEGIN + "\n```bash\n# comment\n"
        "FLATFSC_EXTRAS=dev,prepare bash scripts/setup_env.sh   # TensorFlow\n"
        "python -m flatfsc_jax.cli.prepare \\\n  --sources=dtd\n```\n" + END
    )
    assert shell_lines(doc) == [
        "FLATFSC_EXTRAS=dev,prepare bash scripts/setup_env.sh",
        "python -m flatfsc_jax.cli.prepare    --sources=dtd",
    ]
    assert shell_lines("no markers") == []


@pytest.mark.parametrize(
    "line,extras",
    [
        ("FLATFSC_EXTRAS=dev,prepare bash scripts/setup_env.sh", {"dev", "prepare"}),
        ("bash scripts/setup_env.sh dev,prepare", {"dev", "prepare"}),
        ("FLATFSC_EXTRAS=tpu bash scripts/setup_env.sh prepare", {"prepare"}),  # $1 wins
        ("bash scripts/setup_env.sh", {"dev", "notebooks"}),
    ],
)
def test_setup_env_takes_extras_from_the_argument_or_flatfsc_extras(line, extras, tmp_path):
    assert pip_extras(dry_run(line, tmp_path)) == extras


def test_setup_env_refuses_an_unknown_extra(tmp_path):
    env = dict(os.environ, FLATFSC_DRY_RUN="1", FLATFSC_VENV=str(tmp_path / "venv"))
    proc = subprocess.run(
        ["bash", "scripts/setup_env.sh", "dev,tensorflow"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "unknown extra 'tensorflow'" in proc.stderr and "prepare" in proc.stderr


def test_documented_prepare_lines_install_the_prepare_extra(tmp_path):
    with open(DOC, encoding="utf-8") as f:
        lines = shell_lines(f.read())
    assert lines, f"docs/data.md has no {BEGIN} ... {END} block of shell lines"
    setup = [line for line in lines if "setup_env.sh" in line]
    assert setup, "the prepare commands must say how to install their extras"
    for line in setup:
        assert "prepare" in pip_extras(dry_run(line, tmp_path)), line
    for line in lines:  # every `python -m <module>` the lines run exists
        words = shlex.split(line)
        for i, word in enumerate(words[:-1]):
            if word == "-m" and re.search(r"python[0-9.]*$", words[i - 1]):
                assert importlib.util.find_spec(words[i + 1]) is not None, line
