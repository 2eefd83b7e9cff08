"""An earlier fileserver/analysis.py from git, as a module: the reference that
tests/unit/test_analysis_adversarial2.py, tests/unit/test_analysis_reference.py and
tests/integration/test_analysis_corpus.py compare :func:`fileserver.analysis.analyse`
with. A clone has the commits; without git or the commit the test fails, never skips."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_reference(commit: str) -> ModuleType:
    """fileserver/analysis.py as of ``commit``, as a module (loaded once per commit)."""
    name = f"_analysis_at_{commit}"
    if name in sys.modules:
        return sys.modules[name]
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{commit}:fileserver/analysis.py"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"the reference implementation {commit} is not in git here: {exc}")
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    try:
        exec(compile(source, f"{commit}:fileserver/analysis.py", "exec"), module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module
