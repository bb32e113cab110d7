"""Every artifact path of the pipeline, in one place. dvc.yaml mirrors these (a test checks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    # prepare
    @property
    def raw_data_dir(self) -> Path:
        """Input data kept in the project (`dvc add` / `dvc import` it here): a dependency of prepare."""
        return self.root / "data" / "raw"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    def split_file(self, split: str) -> Path:
        return self.prepared / f"{split}.npz"

    @property
    def classes_file(self) -> Path:
        return self.prepared / "classes.json"

    # train_diffusion / train_classifier
    @property
    def diffusion_dir(self) -> Path:
        """Resumable training state; `persist: true` in dvc.yaml so DVC never deletes it."""
        return self.root / "models" / "diffusion"

    @property
    def diffusion_snapshots_dir(self) -> Path:
        """EMA weights saved along the way (`step_{step:07d}.pt`, same format as `diffusion_model`)."""
        return self.diffusion_dir / "snapshots"

    @property
    def diffusion_model(self) -> Path:
        return self.root / "models" / "diffusion.pt"

    @property
    def classifier_dir(self) -> Path:
        return self.root / "models" / "classifier"

    @property
    def classifier_model(self) -> Path:
        return self.root / "models" / "classifier.pt"

    # generate / disturb
    @property
    def stage1_dir(self) -> Path:
        return self.root / "synthetic" / "stage1"

    @property
    def stage2_dir(self) -> Path:
        return self.root / "synthetic" / "stage2"

    def stage2_measure_dir(self, measure: str) -> Path:
        return self.stage2_dir / measure

    # metrics, plots, reports (committed to git, `cache: false`)
    def metrics_file(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    def headline_dir(self, stage: str) -> Path:
        """The small per-row files DVC declares as metrics (`mgdm_core.headline`): evaluate, quality."""
        return self.root / "metrics" / stage

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def plot_file(self, name: str) -> Path:
        return self.plots_dir / name

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))
