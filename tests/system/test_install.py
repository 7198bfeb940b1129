"""Install metadata: setup.cfg's ranges admit requirements.lock's pins; setup_env.sh refuses
an unsupported Python with a message naming what to install."""

import configparser
import os
import subprocess

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup_cfg_requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():
        lines += extra.splitlines()
    return [Requirement(x) for x in (line.strip() for line in lines) if x and x[0] != "#"]


def _lock(python_version: str) -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if not line:
                continue
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"python_version": python_version}):
                (spec,) = req.specifier
                assert spec.operator == "==", line
                name = req.name.lower().replace("_", "-")
                assert name not in pins, f"{name} pinned twice for Python {python_version}"
                pins[name] = spec.version
    return pins


@pytest.mark.parametrize("python_version,jax", [("3.11", "0.10.2"), ("3.12", "0.11.2")])
def test_lock_pins_lie_in_setup_cfg_ranges(python_version, jax):
    pins = _lock(python_version)
    assert pins["jax"] == pins["jaxlib"] == jax
    for plugin in ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda12-pjrt", "jax-cuda13-pjrt"):
        assert pins[plugin] == jax, plugin
    for req in _setup_cfg_requirements():
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"setup.cfg requires {name}, which requirements.lock does not pin"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {req}"


def _fake_python(tmp_path, version: str) -> str:
    path = tmp_path / f"python{version}"
    path.write_text(f'#!/bin/sh\necho "{version}"\n')
    path.chmod(0o755)
    return str(path)


def test_setup_env_refuses_an_unsupported_python(tmp_path):
    env = dict(os.environ, PYTHON=_fake_python(tmp_path, "3.10"), FLATFSC_VENV=str(tmp_path / "v"))
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "setup_env.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "needs Python 3.11 (jax 0.10.2) or 3.12 (jax 0.11.2)" in out.stderr
    assert "python3.10=3.10" in out.stderr and "PYTHON=/path/to/python3.12" in out.stderr
    assert not (tmp_path / "v").exists()
