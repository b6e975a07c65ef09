"""Packaging of the report: the top-level templates/ ship inside the package (gridlab.templates), so a non-editable
install renders a report with no checkout in sight."""

import json
import os
import site
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import setuptools

from report_synthetic import build_cells, finish, parent_loss, power_law, write_db

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_ships_every_package_and_the_templates():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # The package-dir mapping needs an explicit package list: it must name every package under src/.
    assert sorted(config["packages"]) == sorted([*setuptools.find_packages(ROOT / "src"), "gridlab.templates"])
    assert config["package-dir"] == {"": "src", "gridlab.templates": "templates"}
    patterns = config["package-data"]["gridlab.templates"]
    templates = [p.name for p in (ROOT / "templates").iterdir() if p.is_file() and p.suffix != ".py"]
    assert templates and all(any(fnmatch(name, pattern) for pattern in patterns) for name in templates)


def _see_these_packages(python: Path) -> None:
    """Put the site-packages folders of this interpreter on the path of the environment of ``python``, after its
    own (a .pth file of plain folder lines: the .pth files inside those folders, e.g. an editable install of
    gridlab, are not run, so the environment's own gridlab is the one it imports)."""
    own = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    folders = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (Path(own) / "outer-environment.pth").write_text("".join(f"{f}\n" for f in folders if Path(f).is_dir()))


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_a_wheel_install_renders_the_report_outside_the_checkout(tmp_path):
    # What a clone holds: tracked files and untracked ones git does not ignore (no build outputs, no egg-info).
    source = tmp_path / "source"
    listed = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT).split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRIDLAB_TEMPLATES")}
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(wheels), str(source)], env=env, cwd=tmp_path)
    (wheel,) = wheels.glob("gridlab-*.whl")
    listing = _run([sys.executable, "-m", "zipfile", "-l", str(wheel)])
    assert "gridlab/templates/report.html.j2" in listing and "gridlab/templates/report.css" in listing

    # A fresh environment that sees the packages of the one running the tests (torch, duckdb …: a virtual
    # environment's or the system's) but has gridlab from the wheel only. `venv --system-site-packages` would see
    # the base interpreter's packages, not those of a virtual environment the tests run in.
    environment = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(environment)])
    python = environment / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], env=env)
    _see_these_packages(python)

    cells = build_cells(["shortgpt", "wanda"], [0.5], [1_000_000 * 2**i for i in range(4)], [0, 1], 50_000_000,
                        references=True)
    curve = {"pruned": power_law(2.0, 0.5, 0.3), "random": power_law(1.9, 2.0, 0.5)}
    metrics = finish(cells, lambda m, r, i, s, tok, seed: (8.0 if tok == 0 else curve[i](tok)) + 0.002 * seed)
    db = write_db(tmp_path / "data" / "results.duckdb", cells, metrics, parent_metrics=parent_loss(2.3, 50_000_000))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import json, sys, gridlab\n"
              "from gridlab.report import build_report\n"
              "from gridlab.report.render import templates_dir\n"
              "paths = build_report(sys.argv[1], 'report')\n"
              "print(json.dumps({'gridlab': gridlab.__file__, 'templates': str(templates_dir()),\n"
              "                  'paths': {k: str(v) for k, v in paths.items()}}))\n")
    found = json.loads(_run([str(python), "-c", script, str(db)], env=env, cwd=elsewhere).splitlines()[-1])
    assert Path(found["gridlab"]).is_relative_to(environment), found  # the installed copy, not this checkout
    assert Path(found["templates"]).is_relative_to(environment), found
    html = (elsewhere / "report" / "index.html").read_text(encoding="utf-8")
    assert "The answer: prune or train from scratch" in html and "Setting 2, judged by what it needs" in html
    assert (elsewhere / "report" / "report.pdf").read_bytes().startswith(b"%PDF")
    assert (elsewhere / "report" / "summary.md").is_file()
