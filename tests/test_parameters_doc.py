"""docs/parameters.md is generated from `Params` and stays true as keys are added."""

import importlib.util
import sys


def _params_doc(repo_root):
    spec = importlib.util.spec_from_file_location("params_doc", repo_root / "scripts" / "params_doc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("params_doc", module)
    spec.loader.exec_module(module)
    return module


def test_parameters_doc_is_up_to_date(repo_root):
    doc = _params_doc(repo_root)
    assert (repo_root / "docs" / "parameters.md").read_text() == doc.render(), \
        "docs/parameters.md is out of date: run `python scripts/params_doc.py`"


def test_every_key_is_documented_with_its_readers(repo_root):
    doc = _params_doc(repo_root)
    assert doc.undocumented() == [], "give these keys a comment in mgdm_core/config.py (or scripts/params_doc.py)"
    text = doc.render()
    # One row per key, e.g. the stage-2 scale, read by disturb alone.
    row = next(line for line in text.splitlines() if line.startswith("| `disturb.scale` |"))
    assert row.rstrip(" |").endswith("disturb") and "float" in row


def test_glossary_names_only_existing_keys(repo_root):
    from mgdm_core.config import Params

    doc = _params_doc(repo_root)
    dumped = Params().model_dump()
    for key in doc.MEANINGS:
        node = dumped
        for part in key.split("."):
            assert part in node, f"scripts/params_doc.py documents '{key}', which Params does not have"
            node = node[part]
