"""The Colab notebook stays in sync with the library: generated from colab/make_notebooks.py,
its code compiles, and every name it imports from larv_jax exists."""

import ast
import importlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_matches_generator_and_imports_exist():
    import runpy

    gen = runpy.run_path(str(ROOT / "colab" / "make_notebooks.py"))
    on_disk = json.loads((ROOT / "colab" / "larv_quickstart.ipynb").read_text())
    assert on_disk == json.loads(json.dumps(gen["notebook"]())), "re-run colab/make_notebooks.py"
    checked = 0
    for cell in on_disk["cells"]:
        if cell["cell_type"] != "code":
            continue
        module = ast.parse("".join(cell["source"]))
        for node in ast.walk(module):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("larv_jax"):
                mod = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(mod, alias.name) or importlib.util.find_spec(
                        f"{node.module}.{alias.name}"), f"{node.module}.{alias.name}"
                    checked += 1
    assert checked >= 8
