"""The README's code map names every module of the package, so a newcomer finds where a stage lives."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_module_is_in_the_readme_code_map():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Code map", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"[A-Za-z_0-9]+\.py", section))
    modules = {p.name for p in (ROOT / "src" / "fadal").rglob("*.py") if p.name != "__init__.py"}
    assert modules - named == set(), f"modules missing from the README's code map: {sorted(modules - named)}"
    assert named - modules == set(), f"the README's code map names modules that do not exist: {sorted(named - modules)}"
