"""The README's Python snippets run as written, from a folder outside the repository, on the real models."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SNIPPETS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def checkout_env(**extra: str) -> dict[str, str]:
    """This checkout's code first on the path, whatever the installed editable copies point to."""
    paths = [REPO, *sorted((REPO / "integrations").glob("llama-index-*"))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")]), **extra}


def test_readme_has_the_two_snippets():
    assert len(SNIPPETS) == 2
    assert "engine.query(" in SNIPPETS[0] and "model.generate(" in SNIPPETS[1]


@pytest.mark.real_model
@pytest.mark.parametrize("code", [pytest.param(code, id=f"snippet{i}") for i, code in enumerate(SNIPPETS)])
def test_readme_snippet_runs_as_written(code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=checkout_env(GMSA_RAG_CACHE_DIR=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
