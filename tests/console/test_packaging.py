"""The console works from a non-editable install: every file under ``console/static`` is
named by pyproject's package-data globs (what setuptools copies into the wheel), and the
page references only files that exist there."""
from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path

import promptfleet
from promptfleet.console.routes import STATIC_DIR

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(promptfleet.__file__).parent


def test_every_static_file_is_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["promptfleet"]
    files = [p.relative_to(PACKAGE).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert len(files) >= 10
    # setuptools' '*' does not cross '/', as fnmatch's does: compare segment by segment
    def matches(path: str, pattern: str) -> bool:
        a, b = path.split("/"), pattern.split("/")
        return len(a) == len(b) and all(fnmatchcase(x, y) for x, y in zip(a, b))

    missing = [f for f in files if not any(matches(f, g) for g in globs)]
    assert missing == [], f"not in [tool.setuptools.package-data]: {missing}"


def test_the_page_references_only_shipped_files():
    html = (STATIC_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="/console/static/([^"]+)"', html)
    assert "vendor/uPlot.iife.min.js" in refs and "js/main.js" in refs
    for ref in refs:
        assert (STATIC_DIR / ref).is_file(), ref
    for module in (STATIC_DIR / "js").glob("*.js"):  # ES module imports between the scripts
        for ref in re.findall(r'from "\./([^"]+)"', module.read_text()):
            assert (STATIC_DIR / "js" / ref).is_file(), (module.name, ref)
    assert (STATIC_DIR / "vendor" / "uPlot.LICENSE").read_text().startswith("The MIT License")
