"""The stage packages of src/demopsd import only downward, with no cycle and no other module's private names."""

import importlib
from pathlib import Path

import pytest

from tests.import_graph import LAYERS, PACKAGE_DIR, module_cycles, package_graph, private_imports, upward_imports


def test_imports_point_only_downward_without_cycles_or_private_names():
    assert upward_imports() == []
    assert private_imports() == []
    assert module_cycles() == []


def test_every_module_lives_in_a_stage_package_with_a_docstring():
    top_level = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert top_level == ["__init__.py"]
    assert sorted(p.name for p in PACKAGE_DIR.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)
    for name in LAYERS:
        doc = importlib.import_module(f"demopsd.{name}").__doc__
        assert doc and "May import" in doc, f"demopsd.{name} does not say what it may import"


def write(root: Path, module: str, text: str) -> None:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake_package(tmp_path) -> Path:
    root = tmp_path / "demopsd"
    write(tmp_path, "demopsd.__init__", "")
    write(tmp_path, "demopsd.config.settings", "X = 1\n")
    write(tmp_path, "demopsd.training.run", "from demopsd.config.settings import X\n")
    return root


def test_the_checks_find_an_upward_import_a_cycle_and_a_private_name(fake_package, tmp_path):
    assert (upward_imports(fake_package), module_cycles(fake_package), private_imports(fake_package)) == ([], [], [])
    assert package_graph(fake_package)["training"] == {"config"}
    write(tmp_path, "demopsd.config.check", "def f():\n    from demopsd.training.run import _helper\n")
    write(tmp_path, "demopsd.config.settings", "from demopsd.config.check import f\nX = 1\n")
    write(tmp_path, "demopsd.config.check", "from demopsd.config.settings import X\n"
                                            "def f():\n    from demopsd.training.run import _helper\n")
    assert upward_imports(fake_package) == ["demopsd.config.check:3 -> demopsd.training.run"]
    assert private_imports(fake_package) == ["demopsd.config.check:3 -> demopsd.training.run._helper"]
    assert ["demopsd.config.check", "demopsd.config.settings", "demopsd.config.check"] in module_cycles(fake_package)
