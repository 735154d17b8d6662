"""The layers of ARCHITECTURE.md hold: every import points down, never up or sideways between siblings.

application  scorescope/            may import everything below
verbs        probes/  interventions/  siblings: each imports only interp
world        interp/clevr/          uses the zoo
substrate    interp/ (incl. models/)  imports no verb, no application; interp/models never imports interp/clevr
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports (top-level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _offenders(package: str, forbidden: tuple[str, ...], *, exclude: str | None = None) -> list[str]:
    bad = []
    for path in files(package):
        if exclude and str(path.relative_to(ROOT)).startswith(exclude):
            continue
        for mod in imported_modules(path):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    return bad


@pytest.mark.parametrize(
    ("package", "forbidden", "exclude"),
    [
        ("interp", ("probes", "interventions", "scorescope"), None),
        ("interp/models", ("interp.clevr",), None),
        ("probes", ("interventions", "scorescope"), None),
        ("interventions", ("probes", "scorescope"), None),
    ],
)
def test_imports_point_down(package, forbidden, exclude):
    assert _offenders(package, forbidden, exclude=exclude) == []


def test_importing_interp_loads_no_verb_and_no_diffusers():
    """``import interp`` is the substrate only: no verbs, no application, and diffusers stays lazy (seconds)."""
    code = (
        "import interp, sys; "
        "bad = {'probes', 'interventions', 'scorescope', 'diffusers', 'transformers', 'nnsight'} & set(sys.modules); "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_layer_scan_sees_a_violation(tmp_path):
    """The scanner itself works: an upward import is found."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from probes.jacobian import pixel_jacobian\n")
    assert "probes.jacobian" in imported_modules(bad)
