"""Layers point one way: file formats (data) below scoring and training; scoring independent of training."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qmargin_spk"
FORBIDDEN = {"data": ("qmargin_spk.scoring", "qmargin_spk.training", "qmargin_spk.experiment"),
             "scoring": ("qmargin_spk.training",), "losses": ("qmargin_spk.training", "qmargin_spk.scoring"),
             "metrics": ("qmargin_spk.training", "qmargin_spk.scoring", "qmargin_spk.data", "qmargin_spk.inference"),
             "calibration": ("qmargin_spk.training", "qmargin_spk.inference")}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_higher_layers(package):
    offending = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for name in imported_modules(path)
        if name.startswith(FORBIDDEN[package])
    ]
    assert not offending, offending


def test_code_cites_only_docs_that_exist():
    docs = PACKAGE.parent / "docs"
    cited = {name for path in PACKAGE.rglob("*.py") for name in re.findall(r"docs/([\w./-]+\.md)", path.read_text(encoding="utf-8"))}
    missing = sorted(name for name in cited if not (docs / name).is_file())
    assert cited and not missing, missing
