"""The tests exercise this checkout's ``src/demopsd``, in this process and in the processes they start."""

import sys
from pathlib import Path

import demopsd
from tests.helpers import REPO_ROOT, run_python

PACKAGE = REPO_ROOT / "src" / "demopsd"


def test_this_process_imports_the_checkouts_package():
    assert Path(demopsd.__file__).resolve().parent == PACKAGE
    first = next(Path(p or ".").resolve() for p in sys.path if (Path(p or ".") / "demopsd" / "__init__.py").is_file())
    assert first == PACKAGE.parent, f"{first} comes before this checkout's src/ on sys.path"


def test_a_process_started_like_the_end_to_end_runs_imports_the_same_package():
    """Started as tests/helpers.py starts src/train.py, but without the script's directory first on sys.path:
    what the environment itself installed (``pip install -e .``) must be this checkout too."""
    result = run_python("-c", "import demopsd; print(demopsd.__file__)", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()).resolve().parent == PACKAGE
