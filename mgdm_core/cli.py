"""`mgdm <stage>`: the command-line front door (also `python -m mgdm_core <stage>`).

Errors a user can fix (bad parameters, bad data, bad checkpoints) print one line and exit 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

from pydantic import BaseModel

from mgdm_core.errors import ConfigError, MgdmError
from mgdm_core.stages import STAGES

log = logging.getLogger("mgdm")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgdm", description="Measurement-guided diffusion data augmentation.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, parents=[common], help=f"run the {stage} stage")
        p.add_argument("--profile", help="a profile merged over the parameters file (name under profiles/ or a path)")
        p.add_argument("--root", default=".", help="project root holding the outputs (default: .)")
    p = sub.add_parser("repro", parents=[common], help="`dvc repro` (with --profile: `dvc exp run -S ...`) "
                       "inside one MLflow pipeline run")
    p.add_argument("--profile", help="run as a DVC experiment with the profile's values as -S overrides; "
                   "the parameters file is left as it was")
    p.add_argument("dvc_args", nargs=argparse.REMAINDER, help="extra arguments passed to dvc repro / dvc exp run")
    p = sub.add_parser("profile", parents=[common], help="print the `dvc exp run -S ...` command a profile stands for")
    p.add_argument("name", help="profile name under profiles/ or a YAML path")
    p = sub.add_parser("compare", help="DVC experiments side by side: one row per figure that differs, "
                       "one column per experiment (reads `dvc exp show --json`)")
    p.add_argument("names", nargs="*", help="experiments or commits to show, in this order (default: all of "
                   "`dvc exp show`; the workspace only when it differs from all of them)")
    p.add_argument("--all-rows", action="store_true", help="every parameter and figure, not only those that differ")
    p.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not only HEAD's")
    p.add_argument("--width", type=int, help="line width (default: the terminal's)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p = sub.add_parser("pool", help="pool the evaluate results of several generators (runs that differ only in "
                       "the generator seed): a t-interval over generators per comparison, variance components, "
                       "and the generators and seeds a target difference needs")
    p.add_argument("sources", nargs="+", help="one evaluate.json (or project root holding metrics/evaluate.json) "
                   "per generator")
    p.add_argument("--reference", default="real", help="condition every other is compared with (default: real)")
    p.add_argument("--compare", action="append", default=[], metavar="COND:REF",
                   help="compare COND with REF instead (repeatable; one family per network and metric)")
    p.add_argument("--shared", help="evaluate.json or project root whose conditions fill in those a generator's "
                   "file lacks (generator-independent ones: real, real+classic), the same for every generator")
    p.add_argument("--metric", default="auc", help="metric of the markdown report (the JSON holds every compared "
                   "metric; default: auc)")
    p.add_argument("--target", type=float, default=0.01, help="difference the design table sizes for (default: 0.01)")
    p.add_argument("--out", default="reports/pooled.md", help="markdown report; the JSON goes beside it "
                   "(default: reports/pooled.md and reports/pooled.json)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _pool(args: argparse.Namespace) -> int:
    from mgdm_core.evaluation import generators
    from mgdm_core.io import atomic_write, ensure_writable_dir, write_json_atomic

    runs = [generators.load_runs(source) for source in args.sources]
    shared = generators.load_runs(args.shared) if args.shared else None
    known = sorted({c for r in [*runs, shared or {}] for by_metric in r.values() for by_cond in by_metric.values()
                    for c in by_cond})
    pooled = generators.pool(
        runs, shared=shared, reference=args.reference,
        comparisons=[generators.parse_comparison(text, known) for text in args.compare] or None,
        metrics=None, target=args.target,
        names=[str(generators.evaluate_file(source)) for source in args.sources],
    )
    report = generators.pooled_markdown(pooled, args.metric)
    out = Path(args.out)
    ensure_writable_dir(out.parent)
    with atomic_write(out) as tmp:
        Path(tmp).write_text(report)
    write_json_atomic(out.with_suffix(".json"), pooled)
    print(report)
    log.info("pool: wrote %s and %s", out, out.with_suffix(".json"))
    return 0


def _run_stage(args: argparse.Namespace) -> int:
    from mgdm_core.config import load_params
    from mgdm_core.layout import Layout
    from mgdm_core.launch import run_stage

    from mgdm_core.io import ensure_writable_dir

    params = load_params(args.params, args.profile)
    # Before tracking opens its store under the root: an unusable root is one DataError line,
    # not a traceback from deep inside MLflow/SQLite.
    ensure_writable_dir(Path(args.root))
    run_stage(args.command, params, Layout(Path(args.root)))
    return 0


def profile_overrides(params_path: Path, profile: Path) -> list[str]:
    """The profile as Hydra overrides for `dvc exp run -S`, one per key it sets.

    `++key=value` sets a key whether or not params.yaml holds it; a map value (`disturb.class_map`)
    is first removed (`~key`) so that it replaces, as `config.deep_merge` does, rather than merges.
    Applied to params.yaml they give exactly `load_params(params.yaml, profile)` (tested).
    """
    from mgdm_core.config import Params, read_yaml

    base, wanted = read_yaml(params_path), read_yaml(profile)
    sections = {name for name, field in Params.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}
    leaves: list[tuple[str, object]] = []
    for key, value in wanted.items():
        if key in sections and isinstance(value, dict):
            leaves += [(f"{key}.{sub}", v) for sub, v in value.items()]
        else:
            leaves.append((key, value))
    overrides = []
    for key, value in leaves:
        if isinstance(value, dict):
            section, _, name = key.partition(".")
            if name in (base.get(section) or {}):
                overrides.append(f"~{key}")
            overrides.append(f"+{key}={_hydra_value(value)}")
        else:
            overrides.append(f"++{key}={_hydra_value(value)}")
    return overrides


def _hydra_value(value: object) -> str:
    """A value in Hydra's override grammar: strings quoted (so "100" stays a string), lists, maps."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"profile value {value!r}: cannot pass a {type(value).__name__} to dvc exp run -S")


@contextmanager
def _restored(path: Path):
    """`dvc exp run -S` writes the overrides into the parameters file and leaves them there; the
    experiment (its commit under refs/exps) keeps them, the tracked file gets its bytes back."""
    original = path.read_bytes()
    try:
        yield
    finally:
        if path.read_bytes() != original:
            path.write_bytes(original)


def _repro(args: argparse.Namespace) -> int:
    from mgdm_core import tracking
    from mgdm_core.config import load_params, resolve_profile
    from mgdm_core.stages.common import dataset_name

    params_path = Path(args.params).resolve()
    root = params_path.parent
    profile = resolve_profile(args.profile, root) if args.profile else None
    params = load_params(params_path, profile)  # fail fast on bad parameters, before DVC starts anything
    dvc_args = [a for a in args.dvc_args if a != "--"]
    if profile is None:
        command = ["dvc", "repro", *dvc_args]
    else:
        command = ["dvc", "exp", "run", *_set_params(params_path, profile), *dvc_args]
    tags = {"dataset": dataset_name(params), "front_door": "dvc", **({"profile": args.profile} if profile else {})}
    parent = tracking.open_pipeline_run(root, "pipeline", tags)
    parent.log_params(params.model_dump(mode="json"))  # the full resolved parameters, dotted keys
    env = {**os.environ, tracking.PARENT_ENV: parent.run_id}
    env.pop("MLFLOW_RUN_ID", None)  # it would override our explicit parent (mlflow#15713)
    code = 1
    try:
        with _restored(params_path) if profile else nullcontext():
            code = subprocess.call(command, cwd=root, env=env)
    finally:
        parent.finish("FINISHED" if code == 0 else "FAILED")
    log.info("MLflow pipeline run %s (%s)", parent.run_id, "finished" if code == 0 else "failed")
    return code


def _set_params(params_path: Path, profile: Path) -> list[str]:
    return [arg for override in profile_overrides(params_path, profile) for arg in ("-S", override)]


def _profile(args: argparse.Namespace) -> int:
    from mgdm_core.config import load_params, resolve_profile

    base = Path(args.params)
    profile = resolve_profile(args.name, base.resolve().parent)
    load_params(base, profile)  # validate first
    print(shlex.join(["dvc", "exp", "run", *_set_params(base, profile)]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "repro":
            return _repro(args)
        if args.command == "profile":
            return _profile(args)
        if args.command == "pool":
            return _pool(args)
        if args.command == "compare":
            from mgdm_core.experiments import compare

            print(compare(args.names, only_changed=not args.all_rows, all_commits=args.all_commits, width=args.width))
            return 0
        return _run_stage(args)
    except MgdmError as exc:
        if args.debug:
            raise
        print(f"mgdm {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mgdm {args.command}: interrupted", file=sys.stderr)
        return 130
