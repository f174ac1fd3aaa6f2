"""The package layout shows the pipeline, ground floor first: a lower floor never imports a higher one.

Every ``import medkd...`` / ``from medkd... import`` in medkd/ counts, at module level or inside a
function (lazy), found by parsing the source with :mod:`ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "medkd"

#: floor of each top-level part of medkd (0 = ground floor); a module may import its own floor and below.
FLOORS = {
    "storage": 0,
    "models": 1, "losses": 1,
    "config": 2, "data": 2, "recipes": 2, "plans": 2,
    "teachers": 3,
    "engine": 4,
    "evaluation": 5, "deploy": 5,
    "workflows": 6,
    "cli": 7, "cli_errors": 7, "cli_plan": 7, "cli_nnunet": 7, "cli_study": 7, "__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _medkd_imports(path: Path) -> set[str]:
    """Absolute names of the medkd modules (or packages) ``path`` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the floor check reads absolute ones)"
            if node.module == "medkd":  # from medkd import cli: the submodules themselves
                names |= {f"medkd.{alias.name}" for alias in node.names}
            else:
                names.add(node.module or "")
    return {name for name in names if name == "medkd" or name.startswith("medkd.")}


def _floor(module: str) -> int | None:
    """Floor of ``medkd.X...``; None for the package itself (``medkd``: version only)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    assert parts[1] in FLOORS, f"{module}: top-level part {parts[1]!r} has no floor in FLOORS"
    return FLOORS[parts[1]]


def _upward_imports() -> list[tuple[str, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        floor = _floor(module)
        for imported in sorted(_medkd_imports(path)):
            target = _floor(imported)
            if floor is not None and target is not None and target > floor:
                found.append((module, imported))
    return found


def test_every_top_level_part_has_a_floor():
    parts = {p.stem if p.suffix == ".py" else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert parts <= set(FLOORS), f"give these a floor: {sorted(parts - set(FLOORS))}"


def test_storage_imports_nothing_from_medkd():
    assert _medkd_imports(PACKAGE / "storage.py") == set()


def test_a_lower_floor_never_imports_a_higher_one():
    upward = sorted(_upward_imports())
    assert not upward, "upward imports:\n" + "\n".join(f"  {a} -> {b}" for a, b in upward)


def test_engine_checkpoint_is_gone():
    assert not (PACKAGE / "engine" / "checkpoint.py").exists()
    for path in PACKAGE.rglob("*.py"):
        assert "medkd.engine.checkpoint" not in _medkd_imports(path), path
