"""The package split the users were promised: the board side stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_device_agent_never_imports_tensorflow_or_edgekit():
    offenders = [
        f"{p.relative_to(ROOT)} imports {mod}"
        for p in sorted((ROOT / "device_agent").rglob("*.py"))
        for mod in _imports(p)
        if mod in {"tensorflow", "tf_keras", "keras", "edgekit", "tensorflow_model_optimization"}
    ]
    assert offenders == []


def test_importing_the_agent_loads_no_tensorflow():
    code = "import sys, device_agent, device_agent.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow','edgekit')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_edgekit_cli_help_is_cheap():
    code = "import sys, edgekit.cli; edgekit.cli.build_parser(); print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_surface_is_explicit():
    import device_agent
    import edgekit

    for pkg in (device_agent, edgekit):
        assert pkg.__all__, pkg.__name__
        missing = [name for name in pkg.__all__ if not hasattr(pkg, name)]
        assert missing == []
