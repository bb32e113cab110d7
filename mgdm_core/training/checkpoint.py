"""One-file checkpoints: kind + config (JSON) + state, written atomically, loaded with weights_only=True.

A checkpoint is a `torch.save`d dict {"format": 1, "kind": str, "config": JSON str, "state": dict}.
The state holds only what `torch.load(weights_only=True)` accepts (tensors, state_dicts, numbers,
strings, lists, tuples, dicts), so loading never runs pickled code from the file.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from mgdm_core.errors import CheckpointError

CHECKPOINT_FORMAT = 1
_PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def _check_plain(value: Any, where: str) -> None:
    """Refuse, at save time, anything weights-only loading would refuse later (a TypeError: a bug, not user input)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint state key {where}[{key!r}] must be str or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _PLAIN_TYPES):
        raise TypeError(f"checkpoint state {where} is a {type(value).__name__}, which weights-only loading refuses")


def _canonical(config: dict[str, Any]) -> dict[str, Any]:
    """The config as it reads back from JSON (tuples become lists), so saved and expected compare equal."""
    return json.loads(json.dumps(config, sort_keys=True))


def save_checkpoint(path: str | os.PathLike[str], *, kind: str, config: dict[str, Any], state: dict[str, Any]) -> None:
    """Write one checkpoint file atomically: temp file in the same directory, fsync, os.replace.

    A crash mid-write leaves the previous checkpoint (or none), never a truncated file.
    `config` must be JSON-serialisable; `state` must hold only weights-only-loadable types.
    """
    path = Path(path)
    _check_plain(state, "state")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "config": json.dumps(config, sort_keys=True),
        "state": state,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    # Persist the rename itself: without a directory fsync a power loss may forget it.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _config_differences(saved: Any, expected: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, e.g. ["width: 64 != 32", "channel_mult: ..."]."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        differences = []
        for key in sorted(set(saved) | set(expected)):
            name = f"{prefix}{key}"
            if key not in saved:
                differences.append(f"{name}: only in the expected config")
            elif key not in expected:
                differences.append(f"{name}: only in the checkpoint")
            else:
                differences.extend(_config_differences(saved[key], expected[key], f"{name}."))
        return differences
    if saved != expected:
        return [f"{prefix.rstrip('.')}: checkpoint {json.dumps(saved)} != expected {json.dumps(expected)}"]
    return []


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    kind: str,
    expected_config: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load (config, state) from a checkpoint with `weights_only=True`.

    Raises CheckpointError (one line) when the file is missing, unreadable or corrupt, holds a
    pickled object that weights-only loading refuses, is of another kind, or its config differs
    from `expected_config` (differing keys first, then both configs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load raises many types on garbage (IndexError, EOFError, RuntimeError...)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch's weights-only message spans many lines; the "Unsupported ..." line holds the cause:
        # "Unsupported global: GLOBAL module.Class" for a refused object, an opcode for garbage.
        unsupported = next((line for line in lines if "Unsupported" in line), None)
        if isinstance(err, pickle.UnpicklingError) and unsupported and "Unsupported global" in unsupported:
            raise CheckpointError(
                f"checkpoint {path} holds a pickled Python object that weights-only loading refuses "
                f"(not loaded, since unpickling it could run code): {unsupported}"
            ) from None
        reason = unsupported or (lines[0] if lines else type(err).__name__)
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or not {"kind", "config", "state"} <= set(payload):
        raise CheckpointError(f"checkpoint {path} is not an mgdm checkpoint (format {CHECKPOINT_FORMAT})")
    if payload["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} holds a '{payload['kind']}' model, expected '{kind}'")
    config = json.loads(payload["config"])
    if expected_config is not None:
        expected = _canonical(expected_config)
        differences = _config_differences(config, expected)
        if differences:
            raise CheckpointError(
                f"checkpoint {path} was made with another {kind} config; differs in "
                f"{'; '.join(differences)}; checkpoint config: {json.dumps(config, sort_keys=True)}; "
                f"expected config: {json.dumps(expected, sort_keys=True)}"
            )
    return config, payload["state"]
