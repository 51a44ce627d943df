"""pyproject.toml names its packages one by one (kernels/ installs as vllm_eagle.kernels): every
folder of Python modules under vllm_eagle/ must be listed, or a wheel silently leaves it out (an
editable install would still find it)."""

import os

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_listed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {
        os.path.relpath(d, ROOT).replace(os.sep, ".")
        for d, _, files in os.walk(os.path.join(ROOT, "vllm_eagle"))
        if "__pycache__" not in d and any(f.endswith(".py") for f in files)
    }
    assert not found - listed, f"[tool.setuptools] packages lacks {sorted(found - listed)}"
    assert setuptools["package-dir"] == {"vllm_eagle.kernels": "kernels"}
    assert "benchmarks" not in listed
