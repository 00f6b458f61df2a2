"""The package layout: four folders, one import package, and no shadowing of the stdlib ``io``."""

import subprocess
import sys

from conftest import REPO


def test_import_io_from_repo_root_is_stdlib():
    code = "import io, sys; assert io.open is open, io; print(getattr(io, '__file__', 'frozen'))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "pdacscreen" not in out.stdout
    # Also with the repository root first on sys.path, as an IDE or `python -m` from there does.
    code2 = f"import sys; sys.path.insert(0, {str(REPO)!r}); import io; assert io.open is open"
    subprocess.run([sys.executable, "-c", code2], cwd=REPO, check=True)


def test_subpackages_map_to_folders():
    import pdacscreen.engine
    import pdacscreen.flows
    import pdacscreen.io
    import pdacscreen.kernels

    for mod, folder in [
        (pdacscreen.io, "io"),
        (pdacscreen.kernels, "kernels"),
        (pdacscreen.engine, "engine"),
        (pdacscreen.flows, "flows"),
    ]:
        assert mod.__file__ is not None
        assert mod.__file__.endswith(f"{folder}/__init__.py"), mod.__file__


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "pdacscreen.flows.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for name in ("phantom", "index", "volume", "train", "sweep", "query", "evaluate", "worklist"):
        assert name in out.stdout
