"""Bad input through the CLI: one clear error line naming the file or key, exit code 2, no traceback
(unless --debug), and artifacts of earlier good runs left byte-identical.

Parameter errors fail before torch/MLflow are imported, so they run as real subprocesses
(`python -m mgdm_core ...`, ~0.3 s each). Errors found inside a stage cost ~5 s of imports per
subprocess; two of them run as subprocesses, the rest through the same entry point (`cli.main`)
in this process, to keep the file fast. The assertions are the same for both.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mgdm_core import cli
from mgdm_core.io import save_npz_atomic, write_png
from mgdm_core.networks.classifier import NoisyClassifier
from mgdm_core.networks.unet import UNet
from mgdm_core.stages.common import classifier_config, unet_config
from mgdm_core.config import load_params
from mgdm_core.training.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    return env


def _args(stage: str, root: Path, *extra: str, params: Path | None = None, profile: str | None = "smoke") -> list[str]:
    args = [stage, "--params", str(params or root / "params.yaml"), "--root", str(root), *extra]
    return args + (["--profile", profile] if profile else [])


def _subprocess(args: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "mgdm_core", *args], env=_env(), capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stderr


def _check_one_line(code: int, stderr: str, stage: str, *names: str) -> str:
    """Exit 2; the last stderr line is the error and names `names`; the only error line; no traceback."""
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1]
    assert last.startswith(f"mgdm {stage}: error: "), last
    assert sum(": error: " in line for line in lines) == 1, stderr[-3000:]
    for name in names:
        assert name in last, (name, last)
    return last


def _digests(root: Path) -> dict[str, str]:
    """Hashes of the artifacts an earlier good run left (prepared data, models)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for sub in ("data/prepared", "models") if (root / sub).exists()
        for p in sorted((root / sub).rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module", autouse=True)
def _no_shared_mlflow():
    mp = pytest.MonkeyPatch()
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        mp.delenv(key)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tmp project after a good `prepare` (smoke profile, CPU)."""
    root = tmp_path_factory.mktemp("cli") / "base"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "profiles", root / "profiles")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["device"] = "cpu"
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli.main(_args("prepare", root)) == 0
    assert (root / "data" / "prepared" / "train.npz").is_file()
    return root


@pytest.fixture
def project(prepared: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "project"))


def _edit_profile(root: Path, section: str, key: str, value) -> None:
    """Set a key in the tmp smoke profile (merged last, so it wins over params.yaml)."""
    path = root / "profiles" / "smoke.yaml"
    raw = yaml.safe_load(path.read_text())
    raw.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


# --- parameters: real subprocesses, all fast --------------------------------------------------------


PARAM_CASES: dict[str, tuple[Callable[[Path], None], str, tuple[str, ...]]] = {
    "unknown key": (lambda r: _edit_profile(r, "train_diffusion", "stpes", 5), "train_diffusion",
                    ("unknown key 'train_diffusion.stpes'", "smoke.yaml")),
    "wrong type": (lambda r: _edit_profile(r, "train_diffusion", "steps", "many"), "train_diffusion",
                   ("train_diffusion.steps", "'many'")),
    "negative steps": (lambda r: _edit_profile(r, "train_diffusion", "steps", -5), "train_diffusion",
                       ("train_diffusion.steps", "-5")),
    "unknown guidance": (lambda r: _edit_profile(r, "generate", "guidance", "magic"), "generate",
                         ("generate.guidance", "'magic'")),
}


@pytest.mark.parametrize("case", sorted(PARAM_CASES))
def test_bad_parameter_is_one_line_naming_the_key_and_keeps_artifacts(project: Path, case: str) -> None:
    edit, stage, names = PARAM_CASES[case]
    before = _digests(project)
    edit(project)
    _check_one_line(*_subprocess(_args(stage, project)), stage, *names)
    assert _digests(project) == before


def test_nan_scale_written_as_yaml_dot_nan_is_refused(project: Path) -> None:
    path = project / "profiles" / "smoke.yaml"
    raw = yaml.safe_load(path.read_text())
    text = yaml.safe_dump(raw, sort_keys=False).replace("generate:\n", "generate:\n  scale: .nan\n", 1)
    path.write_text(text)
    assert yaml.safe_load(text)["generate"]["scale"] != yaml.safe_load(text)["generate"]["scale"]  # really NaN
    before = _digests(project)
    _check_one_line(*_subprocess(_args("generate", project)), "generate", "generate.scale", "NaN")
    assert _digests(project) == before


def test_missing_params_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    _check_one_line(*_subprocess(_args("prepare", tmp_path, params=missing, profile=None)), "prepare",
                    str(missing), "not found")


def test_missing_profile_names_it_and_lists_the_available_ones(project: Path) -> None:
    _check_one_line(*_subprocess(_args("prepare", project, profile="nosuch")), "prepare",
                    "profile 'nosuch' not found", "smoke")


def test_root_under_a_regular_file_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    root = blocker / "project"
    _check_one_line(*_subprocess(_args("prepare", root, params=tmp_path / "params.yaml")), "prepare",
                    str(root), "cannot create output directory")
    assert blocker.read_text() == "not a directory"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    code, stderr = _subprocess(_args("prepare", tmp_path, "--debug", params=tmp_path / "nowhere.yaml", profile=None))
    assert code != 0
    assert "Traceback (most recent call last)" in stderr
    assert "ConfigError" in stderr and "nowhere.yaml" in stderr


# --- data sources: `prepare` over a project that already holds good prepared data ------------------


def _use_source(root: Path, source: str, path: str) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["data"].update(source=source, path=path)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _npz(path: Path, drop: str | None = None, train_labels: np.ndarray | None = None) -> None:
    arrays = {}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = np.zeros((n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.int64)
    if train_labels is not None:
        arrays["train_labels"] = train_labels
    if drop:
        arrays.pop(drop)
    save_npz_atomic(path, **arrays)


def _imagefolder(root: Path, empty: str | None = None, corrupt: str | None = None) -> None:
    for name in ("benign", "malignant"):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        if name == empty:
            continue
        for i in range(6):
            write_png(root / "images" / name / f"{i}.png", np.full((8, 8, 1), 40 * i, dtype=np.uint8))
    if corrupt:
        file = root / "images" / corrupt
        file.write_bytes(file.read_bytes()[:40])  # header parses, pixel data is cut


def test_npz_missing_keys_through_the_cli_subprocess(project: Path) -> None:
    _npz(project / "bad.npz", drop="train_labels")
    _use_source(project, "npz", "bad.npz")
    before = _digests(project)
    _check_one_line(*_subprocess(_args("prepare", project)), "prepare", "bad.npz", "train_labels")
    assert _digests(project) == before


DATA_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "npz labels out of range": (
        lambda r: (_npz(r / "labels.npz", train_labels=np.array([0, 1, 0, 1, 0, 1, 0, 7])), _use_source(r, "npz", "labels.npz")),
        ("labels.npz", "train_labels"),
    ),
    "empty class folder": (
        lambda r: (_imagefolder(r, empty="malignant"), _use_source(r, "imagefolder", "images")),
        ("malignant",),
    ),
}


def _in_process(args: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    code = cli.main(args)
    return code, capfd.readouterr().err


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_is_one_line_naming_the_file_and_keeps_prepared_data(project: Path, case: str, capfd) -> None:
    setup, names = DATA_CASES[case]
    setup(project)
    before = _digests(project)
    _check_one_line(*_in_process(_args("prepare", project), capfd), "prepare", *names)
    assert _digests(project) == before


def test_corrupt_png_in_an_imagefolder_through_the_cli_subprocess(project: Path) -> None:
    _imagefolder(project, corrupt="benign/3.png")
    _use_source(project, "imagefolder", "images")
    before = _digests(project)
    _check_one_line(*_subprocess(_args("prepare", project)), "prepare", "benign/3.png", "image")
    assert _digests(project) == before


# --- checkpoints: `generate` with missing, foreign or unsafe models --------------------------------


def _smoke_configs(root: Path) -> tuple[dict, dict]:
    params = load_params(root / "params.yaml", "smoke")
    return (unet_config(params, 16, 1, 2).model_dump(mode="json"),
            classifier_config(params, 16, 1, 2).model_dump(mode="json"))


def _models(root: Path, unet_size: int = 16) -> None:
    """Untrained but well-formed models (the error cases never sample)."""
    unet_cfg, clf_cfg = _smoke_configs(root)
    # attention at the second level whatever the size (the smoke value fits 16-pixel images only)
    unet_cfg.update(image_size=unet_size, attention_resolutions=[unet_size // 2])
    from mgdm_core.networks.classifier import ClassifierConfig
    from mgdm_core.networks.unet import UNetConfig

    torch.manual_seed(0)
    save_checkpoint(root / "models" / "diffusion.pt", kind="unet", config=unet_cfg,
                    state={"model": UNet(UNetConfig(**unet_cfg)).state_dict()})
    save_checkpoint(root / "models" / "classifier.pt", kind="classifier", config=clf_cfg,
                    state={"model": NoisyClassifier(ClassifierConfig(**clf_cfg)).state_dict()})


class Payload:  # a pickled object weights-only loading must refuse
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_missing_checkpoint_through_the_cli_subprocess(project: Path) -> None:
    before = _digests(project)
    _check_one_line(*_subprocess(_args("generate", project)), "generate", "checkpoint not found", "diffusion.pt")
    assert _digests(project) == before
    assert not (project / "synthetic" / "stage1" / "manifest.csv").exists()


def _classifier_as_diffusion(root: Path) -> None:
    _models(root)
    shutil.copy(root / "models" / "classifier.pt", root / "models" / "diffusion.pt")


def _pickled(root: Path) -> None:
    _models(root)
    torch.save({"format": 1, "kind": "unet", "config": "{}", "state": {"model": Payload()}},
               root / "models" / "diffusion.pt")


CHECKPOINT_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "classifier checkpoint as the diffusion model": (_classifier_as_diffusion, ("diffusion.pt", "'classifier'", "'unet'")),
    "unet trained for another image size": (lambda r: _models(r, unet_size=32),
                                            ("diffusion.pt", "image_size", "32", "16")),
    "pickled object": (_pickled, ("diffusion.pt", "weights-only")),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint_is_one_line_naming_it_and_keeps_artifacts(project: Path, case: str, capfd) -> None:
    setup, names = CHECKPOINT_CASES[case]
    setup(project)
    before = _digests(project)
    code, stderr = _in_process(_args("generate", project), capfd)
    _check_one_line(code, stderr, "generate", *names)
    assert "unpickled!" not in stderr
    assert _digests(project) == before
