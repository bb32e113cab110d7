"""The one typed configuration: `Params`, loaded from `params.yaml` (plus an optional profile).

Each section of params.yaml is a sub-model here, and each pipeline stage declares which
sections it reads (`stages.<stage>.READS`), which is exactly what dvc.yaml lists as its params.
Unknown keys, wrong types, NaN and out-of-range values are errors naming the key.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from mgdm_core.conditions import parse_condition
from mgdm_core.errors import ConfigError

Measure = Literal["entropy", "margin", "least_confidence", "classifier"]
MEASURES: tuple[str, ...] = ("entropy", "margin", "least_confidence", "classifier")


def _auto_is_none(value: Any) -> Any:
    return None if value == "auto" else value


# A network size that `auto` (or null) leaves to the per-image-size preset (mgdm_core/networks/presets.py).
T = TypeVar("T")
Auto = Annotated[T | None, BeforeValidator(_auto_is_none)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataParams(Section):
    source: Literal["phantom", "npz", "imagefolder", "medmnist"] = "phantom"
    path: str | None = None  # npz file or imagefolder root (relative to the params file's folder)
    val_path: str | None = None  # imagefolder only: a separate validation root
    test_path: str | None = None  # imagefolder only: a separate test root
    flag: str | None = None  # medmnist only: the data set flag, e.g. "breastmnist"
    class_names: tuple[str, ...] | None = None  # display names in label order (default: the source's)
    image_size: int = Field(28, ge=8, le=512)
    channels: Literal[1, 3] = 1
    phantom_counts: tuple[int, ...] = (360, 120)  # images per class before splitting (phantom)
    val_fraction: float = Field(0.15, gt=0, lt=0.5)  # used when the source has no official split
    test_fraction: float = Field(0.2, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _source_needs(self) -> "DataParams":
        if self.source in ("npz", "imagefolder") and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        if self.source == "medmnist" and not self.flag:
            raise ValueError("data.flag is required when data.source is 'medmnist' (e.g. breastmnist)")
        if self.source == "phantom" and (len(self.phantom_counts) < 2 or min(self.phantom_counts) < 4):
            raise ValueError("data.phantom_counts needs at least two classes of at least 4 images")
        return self


class DiffusionParams(Section):
    """The diffusion model: noise schedule and UNet architecture (shared by training and sampling)."""

    schedule: Literal["linear", "cosine"] = "linear"
    steps: int = Field(1000, ge=10, le=10000)
    learn_sigma: bool = True
    # UNet channels at the first level; `auto` (or null): the preset for data.image_size
    # (networks/presets.py: 64 up to 32 px, 96 at 64 px, 128 above).
    width: Auto[int] = Field(None, ge=8)
    # UNet width multiplier per resolution level; `auto`: the preset (28/32 px 1,2,2; 64 px 1,2,3,4;
    # 128 px 1,1,2,3,4).
    channel_mult: Auto[tuple[int, ...]] = None
    num_res_blocks: int = Field(2, ge=1)
    # feature-map sizes in pixels where attention runs; `auto`: the two coarsest levels; `coarsest`:
    # the coarsest level only (both follow data.image_size, explicit sizes do not)
    attention_resolutions: Auto[tuple[int, ...] | Literal["coarsest"]] = None
    num_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    scale_shift_norm: bool = True
    resblock_updown: bool = True


def _positive_int_or_auto(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("must be a positive integer or auto")


class TrainDiffusionParams(Section):
    # optimiser steps (raising it continues a finished run from its checkpoint), or `auto`: train in
    # chunks of checkpoint_every steps, judge each EMA snapshot as `quality` does (unguided sample:
    # FD / floor, class fidelity of a reference classifier trained on real images) and stop by the
    # rule of the auto_* keys (docs/architecture.md, "Training as long as it pays")
    steps: Annotated[int | Literal["auto"], BeforeValidator(_positive_int_or_auto)] = 3000
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)  # reached after a warm-up: min(decay, (1+n)/(10+n))
    # Clip the gradient's global L2 norm to this before each step; null: no clipping (the original release).
    grad_clip: float | None = Field(1.0, gt=0)
    # Weight of the eps-MSE per timestep: sqrt_one_minus_alpha_bar = 1/sqrt(1+SNR) (the original
    # release's), uniform (DDPM's L_simple) or min_snr (Min-SNR-5, Hang et al. 2023).
    mse_weighting: Literal["sqrt_one_minus_alpha_bar", "uniform", "min_snr"] = "sqrt_one_minus_alpha_bar"
    p_uncond: float = Field(0.1, ge=0, le=1)  # per-sample null-class dropout, for CFG
    balanced: bool = True  # class-balanced sampling (the original's imbalanced-sampler flag)
    random_flip: bool = True
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    # DDPM respacing of the sample grid drawn after training (plots/train_diffusion_samples.png)
    preview_respacing: str = "100"
    # steps: auto. Stop once a snapshot's class fidelity AUC is at least the real test images' minus
    # auto_fidelity_tolerance and FD / floor has not improved (by auto_min_improvement, relative) for
    # auto_patience snapshots in a row, or (auto_rise_stop) has risen to that many times its best;
    # never train past auto_max_steps. The model kept is the faithful snapshot with the lowest
    # FD / floor (the lowest overall when none is faithful). (mgdm_core/training/auto_steps.py)

    auto_max_steps: int = Field(20000, ge=1)  # steps: auto: the most steps trained
    auto_patience: int = Field(3, ge=1)  # steps: auto: snapshots in a row without an FD / floor improvement
    auto_min_improvement: float = Field(0.02, ge=0, lt=1)  # steps: auto: relative FD / floor drop that counts
    # steps: auto: stop at once, whatever the patience, when the latest FD / floor is at least this many
    # times the best (a clear rise; null: only the patience stops)
    auto_rise_stop: float | None = Field(None, gt=1)
    auto_fidelity_tolerance: float = Field(0.02, ge=0, le=1)  # steps: auto: fidelity AUC margin below real's
    auto_samples: int = Field(64, ge=2)  # steps: auto: unguided images per snapshot, classes balanced, fixed seeds
    auto_respacing: str = "50"  # steps: auto: DDPM respacing of those images
    auto_reference_epochs: int = Field(20, ge=1)  # steps: auto: epochs of the reference classifier (simple_cnn)


class ClassifierParams(Section):
    """The noise-aware classifier p(y | x_t, t) used for guidance."""

    # classifier channels at the first level; `auto` (or null): the preset (32 up to 32 px, 64 above)
    width: Auto[int] = Field(None, ge=8)
    depth: int = Field(2, ge=1)
    channel_mult: Auto[tuple[int, ...]] = None
    # attention sizes in pixels; `auto`: the two coarsest levels; `coarsest`: the coarsest level only
    attention_resolutions: Auto[tuple[int, ...] | Literal["coarsest"]] = None
    head_channels: int = Field(64, ge=8)
    pool: Literal["attention", "mean"] = "attention"
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout in the classifier's residual blocks (the original release: 0.4)


class TrainClassifierParams(Section):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    # Decay of the exponential moving average of the weights that is saved (with train_diffusion.ema_decay's
    # warm-up); 0 keeps no average, the last step's weights are saved (the original release).
    ema_decay: float = Field(0.999, ge=0, lt=1)
    # Clip the gradient's global L2 norm to this before each step; null: no clipping (the original release).
    grad_clip: float | None = Field(1.0, gt=0)
    # Random crop of each training image (the original classifier's random_crop_arr): the image is
    # enlarged so the crop keeps between this fraction (the original: 0.8) and all of each side,
    # then cropped back to its size at a random place; null: no crop.
    random_crop_min_frac: float | None = Field(None, gt=0, le=1)
    noised: bool = True  # train on x_t at random t (needed for guidance); False: clean images
    balanced: bool = True
    random_flip: bool = True
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    eval_buckets: int = Field(5, ge=1, le=20)  # noise-level buckets for validation accuracy


class GenerateParams(Section):
    """MGDM stage 1: in-distribution samples per class."""

    guidance: Literal["classifier", "cfg", "none"] = "classifier"
    # classifier: eps - sqrt(1-abar) * scale * grad log p(y|x_t); cfg: eps_c + scale * (eps_c - eps_u)
    # (the original release's convention: 0 = plain conditional sampling).
    scale: float = 1.0
    # ddpm (stochastic), ddim (deterministic with eta 0) or dpmpp_2m (DPM-Solver++(2M): deterministic,
    # second order, x0_hat dynamically thresholded; nearer the exact ODE than ddim at equal steps); one model call per step
    sampler: Literal["ddim", "ddpm", "dpmpp_2m"] = "ddim"
    respacing: str = "ddim50"
    eta: float = Field(0.0, ge=0, le=1)
    # balance: fill every class up to the largest (any number of classes); counts: `counts[k]` of class k
    mode: Literal["balance", "counts"] = "balance"
    counts: tuple[int, ...] = (64, 64)  # images per class (mode: counts; one number per class)
    batch_size: int = Field(64, ge=1)


class DecodeSetting(Section):
    """One stage-2 step setting `disturb.respacing: auto` may choose: both halves' respacing and the
    inversion's fixed-point iterations."""

    respacing: str
    inversion_refine: int = Field(ge=0, le=10)

    @field_validator("respacing")
    @classmethod
    def _a_respacing(cls, value: str) -> str:
        # Checked here so that a bad later entry is refused before the earlier ones cost any work.
        if not re.fullmatch(r"\s*(ddim\d+|\d+(\s*,\s*\d+)*)\s*", value.lower()):
            raise ValueError(f"expected a respacing like 'ddim20' or '10,15,25', got {value!r}")
        return value


class DisturbParams(Section):
    """MGDM stage 2: DDIM-invert stage-1 images and decode them with uncertainty guidance."""

    measure: Measure | tuple[Measure, ...] = "entropy"
    scale: float = 4.0
    # Both halves' respacing; `auto`: the first of `auto_candidates` (cheapest first) whose round trip
    # on the checked images (`round_trip_images`) is within `round_trip_tolerance`, so the step count
    # follows the generator (mgdm_core/stages/disturb.py: first_within_tolerance).
    respacing: str = "ddim50"
    # Fixed-point iterations per inversion step (1 + refine model calls): 0 is plain DDIM inversion
    # (round-trip error first-order in the step size); on BreastMNIST at `ddim25` the unclipped round
    # trip errs by 0.019 at 1, 0.0049 at 2 and 0.0013 at 4 (mean |error| on [-1, 1], 32 real test images).
    inversion_refine: int = Field(2, ge=0, le=10)
    # Decode with the unclipped DDIM step that the inversion inverts and clamp only the final image
    # (exact round trip); true clips x0_hat at every step as the original release does.
    clip_denoised: bool = False
    # The unguided round trip (decode the latents without guidance, compare with the stage-1 image)
    # checks the inversion; it costs one decode per checked image, so it checks this many images,
    # evenly spread over the manifest (null: every image). On BreastMNIST (ddim20, refine 2) the
    # per-image errors of 64 checked images had sd 11 % of their mean: standard error of the mean 1.4 %.
    # The max reported is the sample's.
    round_trip_images: int | None = Field(64, ge=1)
    # The stage warns when the checked images' mean round-trip error exceeds this (null: never): above
    # it the stage-2 images carry reconstruction error besides the guidance. 0.01 is the bound the
    # stage-2 cost curves were judged by (docs/results/breastmnist_time_to_quality.md); how few steps
    # stay inside it depends on the generator (ddim10, refine 3: 0.0076 on one BreastMNIST generator,
    # 0.0135 on another), so a cheap respacing is only safe where this check has passed.
    round_trip_tolerance: float | None = Field(0.01, gt=0)
    # respacing: auto tries these in order (list them cheapest first) and keeps the first whose checked
    # round trip passes, the last when none does (the stage then warns); each replaces `respacing` and
    # `inversion_refine`. UNet calls per image: steps x (1 + refine) to invert, steps per measure to
    # decode, and steps more for a checked image at every setting tried. On BreastMNIST ddim10 / refine 3
    # erred by 0.0076 on one generator and 0.0123-0.0135 on two others, where ddim20 / refine 2 gave
    # 0.0062 (docs/results/breastmnist_time_to_quality.md).
    auto_candidates: tuple[DecodeSetting, ...] = (
        DecodeSetting(respacing="ddim10", inversion_refine=3),
        DecodeSetting(respacing="ddim15", inversion_refine=2),
        DecodeSetting(respacing="ddim20", inversion_refine=2),
        DecodeSetting(respacing="ddim25", inversion_refine=2),
        DecodeSetting(respacing="ddim50", inversion_refine=2),
    )
    class_map: dict[int, int] = Field(default_factory=dict)  # source class -> target class
    batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _auto_needs_a_tolerance(self) -> "DisturbParams":
        if self.is_auto:
            if self.round_trip_tolerance is None:
                raise ValueError("disturb.respacing: auto chooses by disturb.round_trip_tolerance, which is null; "
                                 "set a tolerance (e.g. 0.01) or a fixed respacing (e.g. ddim20)")
            if not self.auto_candidates:
                raise ValueError("disturb.respacing: auto needs at least one entry in disturb.auto_candidates")
        return self

    @property
    def is_auto(self) -> bool:
        return self.respacing.strip().lower() == "auto"

    @property
    def decode_settings(self) -> tuple[DecodeSetting, ...]:
        """The settings the stage may use, in the order it tries them (one unless respacing is auto)."""
        if self.is_auto:
            return self.auto_candidates
        return (DecodeSetting(respacing=self.respacing, inversion_refine=self.inversion_refine),)

    @property
    def measures(self) -> tuple[str, ...]:
        return (self.measure,) if isinstance(self.measure, str) else tuple(dict.fromkeys(self.measure))


class EvaluateParams(Section):
    networks: tuple[str, ...] = ("resnet18",)
    # `<data>[+<augment>]` (mgdm_core/conditions.py): data `real` (the baseline), `real+stage1`,
    # `real+stage2` (every measure run), `real+stage2:<measure>` or `synthetic`; augment, applied to
    # training batches only: `classic`, `trivialaugment`, `randaugment`, `mixup`, `cutmix` (README, "Evaluation")
    conditions: tuple[str, ...] = ("real", "real+classic", "real+stage1", "real+stage2")
    seeds: tuple[int, ...] = (0, 1)
    # network -> its own seeds (cheap networks can afford more); networks not listed use `seeds`
    seeds_per_network: dict[str, tuple[int, ...]] = {}
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    synthetic_ratio: float = Field(0.5, gt=0)  # synthetic images added per real training image
    workers: int = Field(1, ge=1)  # units trained at once, each in its own process
    # Downstream classifiers saved as MLflow models: none, the best seed (validation AUC) of
    # every (network, condition), or all units.
    log_models: Literal["none", "best", "all"] = "best"
    # Finished units stay cached under .mgdm/evaluate-units/ (reused by any later run on the same
    # inputs); a completed run removes those no run has used for this many days (0: all it did not use).
    unit_cache_days: int = Field(30, ge=0)

    @field_validator("conditions")
    @classmethod
    def _known_conditions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cond in value:
            try:
                measure = parse_condition(cond).measure
            except ConfigError as exc:  # pydantic reports ValueError under the key's name
                raise ValueError(str(exc)) from None
            if measure is not None and measure not in MEASURES:
                raise ValueError(f"condition '{cond}': a measure suffix needs real+stage2 and one of {MEASURES}")
        if "real" not in value:
            raise ValueError("conditions must include the baseline 'real'")
        return value

    @model_validator(mode="after")
    def _known_seed_networks(self) -> "EvaluateParams":
        for network, seeds in self.seeds_per_network.items():
            if network not in self.networks:
                raise ValueError(f"seeds_per_network: '{network}' is not in networks {list(self.networks)}")
            if not seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"seeds_per_network.{network}: needs distinct seeds, got {list(seeds)}")
        return self

    def seeds_for(self, network: str) -> tuple[int, ...]:
        """The seeds `network` is trained with: its `seeds_per_network` entry, else `seeds`."""
        return self.seeds_per_network.get(network, self.seeds)


class QualityParams(Section):
    """The quality report: fidelity, diversity, boundary and memorisation of the synthetic sets."""

    feature_network: str = "simple_cnn"  # reference classifier trained on real data: its features
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    nn_percentile: float = Field(1.0, gt=0, lt=100)  # memorised: closer than this percentile of real test
    pr_k: int = Field(3, ge=1)  # k of the k-NN manifolds for precision/recall
    kid_subsets: int = Field(50, ge=2)
    kid_subset_size: int = Field(100, ge=2)
    max_pairs: int = Field(8, ge=1)  # nearest-neighbour pairs shown in the report
    # Quality by training step, from the EMA snapshots train_diffusion saves at its checkpoints:
    by_step_max_snapshots: int = Field(8, ge=0)  # snapshots judged, evenly chosen, always the last (0: none)
    by_step_samples: int = Field(64, ge=2)  # unguided images per snapshot, classes balanced, same seeds each step
    by_step_respacing: str = "50"  # DDPM respacing the by-step images are drawn with


class LauncherParams(Section):
    """Where the multi-process stages (training, generate, disturb) run; never changes their results.

    `local`: this process. `torchrun`: `nproc_per_node` processes on this machine (one per GPU,
    DistributedDataParallel for training, images sharded for sampling); see docs/scaling.md.
    No stage lists it in READS, so changing it does not make DVC or Prefect rerun anything.
    """

    kind: Literal["local", "torchrun"] = "local"
    nproc_per_node: int = Field(1, ge=1, le=64)


class Params(Section):
    seed: int = 0
    # seed of the generator stages (train_diffusion, train_classifier, generate, disturb); null: `seed`.
    # G experiments that differ only in it are G independently trained generators on the same data
    # split, and their generator-independent evaluate units (real, real+<augment>) are trained once
    generator_seed: int | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataParams = DataParams()
    diffusion: DiffusionParams = DiffusionParams()
    train_diffusion: TrainDiffusionParams = TrainDiffusionParams()
    classifier: ClassifierParams = ClassifierParams()
    train_classifier: TrainClassifierParams = TrainClassifierParams()
    generate: GenerateParams = GenerateParams()
    disturb: DisturbParams = DisturbParams()
    quality: QualityParams = QualityParams()
    evaluate: EvaluateParams = EvaluateParams()
    launcher: LauncherParams = LauncherParams()

    @model_validator(mode="after")
    def _cfg_needs_label_dropout(self) -> "Params":
        # Without label dropout the null class's embedding is never trained: classifier-free guidance
        # would extrapolate from an untrained branch (the original release's prob_uncon 0 has the same gap).
        if self.generate.guidance == "cfg" and self.train_diffusion.p_uncond == 0:
            raise ValueError("generate.guidance: cfg needs a UNet trained with label dropout, but "
                             "train_diffusion.p_uncond is 0 (the null class is never trained); set p_uncond "
                             "to e.g. 0.1 and retrain, or use guidance: classifier")
        return self

    @property
    def generator_seed_value(self) -> int:
        """The seed the generator stages use: `generator_seed`, or `seed` when it is null."""
        return self.seed if self.generator_seed is None else self.generator_seed

    def with_overrides(self, overrides: dict[str, Any]) -> "Params":
        """A copy with dotted-key overrides applied (`{"disturb.scale": 2.0}`), validated again."""
        raw = self.model_dump(mode="json")
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return validate_params(raw, source="overrides")


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"override '{key}': unknown key '{parts[-1]}'")
    node[parts[-1]] = value


def deep_merge(base: dict, override: dict) -> dict:
    """Profiles override params.yaml section by section, key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "class_map":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_error(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    got = err.get("input")
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("extra_forbidden",):
        return f"unknown key '{key}'"
    if isinstance(got, float) and math.isnan(got):
        return f"{key}: NaN is not allowed"
    return f"{key}: {message} (got {got!r})" if not isinstance(got, dict) else f"{key}: {message}"


def validate_params(raw: Any, *, source: str) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        first = _format_error(exc.errors()[0])
        more = len(exc.errors()) - 1
        raise ConfigError(f"{source}: {first}" + (f" (and {more} more)" if more else "")) from None


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load_params(path: str | Path = "params.yaml", profile: str | Path | None = None) -> Params:
    """Load and validate params.yaml, optionally with a profile file merged over it."""
    path = Path(path)
    raw = read_yaml(path)
    source = str(path)
    if profile is not None:
        profile_path = resolve_profile(profile, path.parent)
        raw = deep_merge(raw, read_yaml(profile_path))
        source = f"{path} + {profile_path}"
    return validate_params(raw, source=source)


def resolve_profile(profile: str | Path, root: Path) -> Path:
    """A profile is a name under profiles/ (`smoke`) or a path to a YAML file."""
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    named = root / "profiles" / f"{profile}.yaml"
    if not named.is_file():
        available = sorted(p.stem for p in (root / "profiles").glob("*.yaml"))
        raise ConfigError(f"profile '{profile}' not found in {root / 'profiles'} (available: {', '.join(available)})")
    return named
