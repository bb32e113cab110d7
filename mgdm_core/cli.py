"""`mgdm <stage>`: the command-line front door (also `python -m mgdm_core <stage>`).

Errors a user can fix (bad parameters, bad data, bad checkpoints) print one line and exit 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from mgdm_core.errors import MgdmError
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
    p = sub.add_parser("repro", parents=[common], help="`dvc repro` inside one MLflow pipeline run")
    p.add_argument("dvc_args", nargs=argparse.REMAINDER, help="extra arguments passed to dvc repro")
    p = sub.add_parser("profile", parents=[common], help="write params.yaml merged with a profile (for DVC)")
    p.add_argument("name", help="profile name under profiles/ or a YAML path")
    p.add_argument("--output", default=None, help="where to write (default: the --params file)")
    return parser


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


def _repro(args: argparse.Namespace) -> int:
    from mgdm_core import tracking
    from mgdm_core.config import load_params
    from mgdm_core.stages.common import dataset_name

    params = load_params(args.params)  # fail fast on bad parameters, before DVC starts anything
    root = Path(args.params).resolve().parent
    parent = tracking.open_pipeline_run(root, "pipeline", {"dataset": dataset_name(params), "front_door": "dvc"})
    parent.log_params(params.model_dump(mode="json"))  # the full resolved parameters, dotted keys
    env = {**os.environ, tracking.PARENT_ENV: parent.run_id}
    env.pop("MLFLOW_RUN_ID", None)  # it would override our explicit parent (mlflow#15713)
    dvc_args = [a for a in args.dvc_args if a != "--"]
    code = subprocess.call(["dvc", "repro", *dvc_args], cwd=root, env=env)
    parent.finish("FINISHED" if code == 0 else "FAILED")
    log.info("MLflow pipeline run %s (%s)", parent.run_id, "finished" if code == 0 else "failed")
    return code


def _profile(args: argparse.Namespace) -> int:
    import yaml

    from mgdm_core.config import deep_merge, load_params, read_yaml, resolve_profile
    from mgdm_core.io import atomic_write

    base = Path(args.params)
    profile = resolve_profile(args.name, base.parent)
    load_params(base, profile)  # validate before writing anything
    merged = deep_merge(read_yaml(base), read_yaml(profile))
    output = Path(args.output or base)
    header = f"# params.yaml with profile '{args.name}' merged in ({profile}); `git checkout params.yaml` restores it\n"
    with atomic_write(output) as tmp:
        Path(tmp).write_text(header + yaml.safe_dump(merged, sort_keys=False))
    print(f"wrote {output} ({base} + {profile})")
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
        return _run_stage(args)
    except MgdmError as exc:
        if args.debug:
            raise
        print(f"mgdm {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mgdm {args.command}: interrupted", file=sys.stderr)
        return 130
