"""Write docs/parameters.md from the `Params` model (never typed by hand).

    python scripts/params_doc.py          # rewrite docs/parameters.md
    python scripts/params_doc.py --check  # exit 1 when docs/parameters.md is out of date

Every key of `mgdm_core.config.Params`: its type and allowed range, its default in the code and
its value in params.yaml, its meaning (the field's description, or the comments beside and just
above it in config.py), and the stages that read it (their `READS`, which dvc.yaml mirrors).
tests/test_parameters_doc.py checks that the committed file equals this script's output.
"""

from __future__ import annotations

import argparse
import inspect
import io
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mgdm_core import config  # noqa: E402
from mgdm_core.stages import STAGES, stage_module  # noqa: E402

OUTPUT = ROOT / "docs" / "parameters.md"
# Keys no stage lists in READS, and who uses them instead.
NOT_IN_READS = {"launcher": "every front door (`run_stage` decides where the stage runs; never changes results)"}


# Meanings of keys whose definition in config.py carries no description or comment. A key in
# neither place fails tests/test_parameters_doc.py: document it there or here.
MEANINGS = {
    "seed": "base seed of every stage (data split, weight init, per-step and per-image noise)",
    "data.source": "where the images come from: a generated phantom, an npz file, an image folder or MedMNIST",
    "data.image_size": "images are resized to this many pixels square",
    "data.channels": "1 (grayscale) or 3 (RGB); images are converted",
    "data.test_fraction": "share held out for testing when the source has no official split",
    "diffusion.schedule": "noise schedule of beta_t",
    "diffusion.steps": "diffusion timesteps T of the trained model (samplers respace them)",
    "diffusion.learn_sigma": "the UNet also predicts the variance interpolation (improved DDPM)",
    "diffusion.channel_mult": "UNet width multiplier per resolution level (null: preset for the image size)",
    "diffusion.num_res_blocks": "residual blocks per UNet level",
    "diffusion.num_heads": "attention heads in the UNet's attention blocks",
    "diffusion.dropout": "dropout in the UNet's residual blocks",
    "diffusion.scale_shift_norm": "condition the group norms on the time/class embedding by scale and shift (FiLM)",
    "diffusion.resblock_updown": "down- and up-sample with residual blocks instead of plain convolutions",
    "train_diffusion.steps": "optimiser steps (raising it continues a finished run from its checkpoint)",
    "train_diffusion.batch_size": "images per step",
    "train_diffusion.lr": "AdamW learning rate",
    "train_diffusion.weight_decay": "AdamW weight decay",
    "train_diffusion.random_flip": "flip half of each batch horizontally",
    "train_diffusion.checkpoint_every": "steps between resumable checkpoints",
    "train_diffusion.log_every": "steps between logged loss values",
    "classifier.depth": "residual blocks per level of the classifier's encoder",
    "classifier.channel_mult": "width multiplier per resolution level (null: preset for the image size)",
    "classifier.attention_resolutions": "feature-map sizes in pixels with attention (null: preset for the image size; coarsest: the coarsest level)",
    "classifier.head_channels": "channels per attention head",
    "classifier.pool": "how the encoder's feature map becomes logits: attention pooling or mean",
    "train_classifier.steps": "optimiser steps (raising it continues a finished run from its checkpoint)",
    "train_classifier.batch_size": "images per step",
    "train_classifier.lr": "AdamW learning rate",
    "train_classifier.weight_decay": "AdamW weight decay",
    "train_classifier.ema_decay": "decay of the exponential moving average of the weights that is saved",
    "train_classifier.balanced": "class-balanced sampling",
    "train_classifier.random_flip": "flip half of each batch horizontally",
    "train_classifier.checkpoint_every": "steps between resumable checkpoints",
    "train_classifier.log_every": "steps between logged loss values",
    "generate.guidance": "stage-1 guidance: the noisy classifier's gradient, classifier-free, or none",
    "generate.sampler": "ddpm (stochastic) or ddim (deterministic with eta 0)",
    "generate.respacing": "sampling steps: \"100\" keeps 100 evenly spaced steps, \"ddim50\" DDIM's spacing",
    "generate.eta": "DDIM's eta: 0 deterministic, 1 DDPM-like noise (sampler: ddim)",
    "generate.batch_size": "images sampled at once",
    "disturb.measure": "uncertainty measure(s) that guide the stage-2 decode; one stage-2 set per measure",
    "disturb.scale": "guidance scale of the uncertainty (or classifier) gradient in the stage-2 decode",
    "disturb.respacing": "DDIM steps of the inversion and of the decode",
    "disturb.batch_size": "images inverted and decoded at once",
    "quality.epochs": "training epochs of the reference classifier",
    "quality.batch_size": "reference classifier batch size",
    "quality.lr": "reference classifier learning rate",
    "quality.seed": "seed of the reference classifier and of the KID subsets",
    "quality.kid_subsets": "random subsets averaged for KID",
    "quality.kid_subset_size": "images per KID subset (capped by the set sizes)",
    "quality.by_step_samples": "images drawn per snapshot (quality by training step)",
    "quality.by_step_respacing": "DDPM respacing of those images (quality by training step)",
    "evaluate.networks": "downstream classifiers trained from scratch: resnet18 (CIFAR-style, native resolution, "
    "for images of 32 px and below), simple_cnn, or a torchvision name (resnet18_imagenet, resnet50, ...: "
    "ImageNet stem, images resized to at least 64 px)",
    "evaluate.seeds": "training seeds per (network, condition); the paired statistics need several",
    "evaluate.epochs": "training epochs per unit; the learning rate drops 10x after 50% and 75% of them "
    "(MedMNIST's protocol) and the best validation-AUC epoch is tested",
    "evaluate.batch_size": "training batch size",
    "evaluate.lr": "Adam learning rate (no weight decay)",
    "launcher.kind": "local: this process; torchrun: nproc_per_node processes on this machine",
    "launcher.nproc_per_node": "processes (GPUs) per stage under torchrun",
}


def type_name(annotation: Any) -> str:
    """`Literal['a', 'b']` -> `a | b`, `tuple[int, ...]` -> `list of int`, `str | None` -> `str or null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and inspect.isclass(args[0]) and issubclass(args[0], BaseModel):
            return "list of {" + ", ".join(args[0].model_fields) + "}"  # entries, e.g. disturb.auto_candidates
        return f"list of {type_name(args[0])}" if len(args) == 2 and args[1] is Ellipsis else "list"
    if origin is dict:
        return f"map {type_name(args[0])} -> {type_name(args[1])}"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = ((annotated_types.Ge, "≥", "ge"), (annotated_types.Gt, ">", "gt"),
           (annotated_types.Le, "≤", "le"), (annotated_types.Lt, "<", "lt"))


def bounds(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for kind, symbol, attr in _BOUNDS:
            if isinstance(meta, kind):
                parts.append(f"{symbol} {getattr(meta, attr)}")
    return ", ".join(parts)


def default_of(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def show(value: Any) -> str:
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, tuple):
        # a list of small models (disturb.auto_candidates) is shown as the YAML a user would write
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"`{text}`"


def source_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment block just above its line plus its trailing comment(s)."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found: dict[str, str] = {}
    for name in cls.model_fields:
        start = next((i for i, line in enumerate(lines, 1) if line.strip().startswith(f"{name}:")), None)
        if start is None:
            continue
        above, row = [], start - 1
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        # The field's own lines: its first line and any more-indented continuation lines.
        indent = len(lines[start - 1]) - len(lines[start - 1].lstrip())
        trailing, row = [], start
        while True:
            if row in comments and not lines[row - 1].strip().startswith("#"):
                trailing.append(comments[row])
            nxt = lines[row] if row < len(lines) else ""
            if not nxt.strip() or len(nxt) - len(nxt.lstrip()) <= indent:
                break
            row += 1
        found[name] = " ".join(above + trailing)
    return found


def meaning(cls: type, name: str, field: FieldInfo, key: str) -> str:
    text = field.description or source_comments(cls).get(name, "") or MEANINGS.get(key, "")
    return text.replace("|", "\\|")


def readers(key: str) -> list[str]:
    """Stages whose READS hold the key itself, its section, or (for a section) one of its fields."""
    section = key.split(".")[0]
    out = []
    for stage in STAGES:
        reads = stage_module(stage).READS
        if key in reads or section in reads or any(r.startswith(key + ".") for r in reads):
            out.append(stage)
    return out


def yaml_value(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return PydanticUndefined
        node = node[part]
    return node


def render() -> str:
    params_yaml = yaml.safe_load((ROOT / "params.yaml").read_text()) or {}
    out = [
        "# Parameters",
        "",
        "<!-- Generated by `python scripts/params_doc.py` from `mgdm_core/config.py`; do not edit by hand. -->",
        "",
        "Every key `params.yaml` may hold, one table per section. Unknown keys, wrong types and",
        "out-of-range values are errors naming the key. *default* is the value when the key is absent;",
        "*params.yaml* is what the committed file sets (profiles in `profiles/` override it for one run,",
        "see the README). *read by* lists the stages that declare the key in `READS` (mirrored by",
        "`params:` in dvc.yaml), so changing it reruns exactly those stages under DVC and Prefect.",
        "",
    ]
    top = [(n, f) for n, f in config.Params.model_fields.items() if not inspect.isclass(f.annotation)
           or not issubclass(f.annotation, BaseModel)]
    sections = [(n, f) for n, f in config.Params.model_fields.items() if (n, f) not in top]
    out += _table("Top level", None, config.Params, top, params_yaml, "")
    for name, field in sections:
        cls = field.annotation
        out += _table(f"`{name}`", inspect.getdoc(cls) if cls.__doc__ else None, cls, list(cls.model_fields.items()),
                      params_yaml, f"{name}.")
    return "\n".join(out).rstrip() + "\n"


def _table(title: str, doc: str | None, cls: type, fields: list[tuple[str, FieldInfo]], params_yaml: dict,
           prefix: str) -> list[str]:
    lines = [f"## {title}", ""]
    if doc:
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | params.yaml | meaning | read by |", "| --- | --- | --- | --- | --- | --- |"]
    for name, field in fields:
        key = prefix + name
        kind = type_name(field.annotation)
        limit = bounds(field)
        in_yaml = yaml_value(params_yaml, key)
        who = readers(key) or [NOT_IN_READS.get(key.split(".")[0], "no stage")]
        lines.append(f"| `{key}` | {kind}{f' ({limit})' if limit else ''} | {show(default_of(field))} | "
                     f"{'(absent)' if in_yaml is PydanticUndefined else show(in_yaml)} | {meaning(cls, name, field, key)} | "
                     f"{', '.join(who)} |")
    return lines + [""]


def undocumented() -> list[str]:
    """Keys without a meaning (neither a description nor a comment in config.py)."""
    missing = [n for n, f in config.Params.model_fields.items()
               if not (inspect.isclass(f.annotation) and issubclass(f.annotation, BaseModel))
               and not meaning(config.Params, n, f, n)]
    for section, field in config.Params.model_fields.items():
        cls = field.annotation
        if inspect.isclass(cls) and issubclass(cls, BaseModel):
            missing += [f"{section}.{n}" for n, f in cls.model_fields.items() if not meaning(cls, n, f, f"{section}.{n}")]
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/parameters.md is up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run `python scripts/params_doc.py`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
