"""The pipeline stages. Every front door (CLI, dvc.yaml, Prefect) runs them through `mgdm_core.launch.run_stage`."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from mgdm_core.config import Params

STAGES: tuple[str, ...] = (
    "prepare", "train_diffusion", "train_classifier", "generate", "disturb", "quality", "evaluate",
)


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise KeyError(f"unknown stage '{name}' (expected one of {', '.join(STAGES)})")
    return importlib.import_module(f"mgdm_core.stages.{name}")


def reads(params: Params, keys: tuple[str, ...]) -> dict[str, Any]:
    """The parameter values a stage declares it reads (`READS`), as a nested dict."""
    raw = params.model_dump(mode="json")
    selected: dict[str, Any] = {}
    for key in keys:
        section, _, field = key.partition(".")
        if field:
            selected.setdefault(section, {})[field] = raw[section][field]
        else:
            selected[section] = raw[section]
    return selected
