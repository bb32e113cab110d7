"""`mgdm compare`: DVC experiments side by side, one row per figure, one column per experiment.

`dvc exp show` lays experiments out as rows and every parameter and metric as a column; with the
headline rows of a two-network evaluation (about 70 figures) its table is far wider than a
terminal and rich folds the cells into "…". This view turns the table on its side: the figures
that differ between the experiments are the rows (changed parameters first, then the quality and
evaluation headline figures, the difference to `real` with its interval in one cell), and the
experiments are columns, printed in as many blocks as the terminal's width needs. It reads
`dvc exp show --json`, so it shows exactly what DVC records.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mgdm_core.errors import ConfigError

MISSING = "-"
# A cell wraps onto more lines beyond this (a list parameter); 23 is the width of a difference
# with its interval, "+0.020 [-0.340, +0.367]", so three experiments fit 120 columns.
MAX_CELL = 23
_INTERVAL = ("d_auc", "d_lo", "d_hi")


@dataclass(frozen=True)
class Column:
    name: str
    values: dict[str, str]  # row label -> formatted value


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value


def _format(value: Any, metric: bool = False) -> str:
    if metric and isinstance(value, float):
        # the headline's three decimals; a small figure (a loss, a KID) keeps three significant digits
        return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # ", " separators: a long list wraps between its items
    return MISSING if value is None else str(value)


def _metric_label(path: str, key: str) -> str:
    """`metrics/evaluate/resnet18/real+stage1.json`, `auc` -> `resnet18 real+stage1 auc`."""
    for kind in ("metrics/evaluate/", "metrics/quality/"):
        if path.startswith(kind) and path.endswith(".json"):
            row = path[len(kind):-len(".json")].replace("/", " ")
            return f"{'quality ' if kind.endswith('quality/') else ''}{row} {key}"
    return f"{path}:{key}"


def figures(data: Mapping[str, Any]) -> dict[str, str]:
    """One revision's `data` from `dvc exp show --json` as {row label: formatted value}: every
    parameter (dotted keys, the file named when it is not params.yaml) and every metric, with
    a headline row's `d_auc`, `d_lo`, `d_hi` folded into one `d_auc [CI]` cell (the
    interval the headline row holds: Bonferroni, simultaneous 95% over the network's comparisons)."""
    rows: dict[str, str] = {}
    for file, content in (data.get("params") or {}).items():
        flat: dict[str, Any] = {}
        _flatten("", (content or {}).get("data") or {}, flat)
        prefix = "" if file == "params.yaml" else f"{file}:"
        rows.update({f"{prefix}{key}": _format(value) for key, value in flat.items()})
    for path, content in (data.get("metrics") or {}).items():
        flat = {}
        _flatten("", (content or {}).get("data") or {}, flat)
        if all(isinstance(flat.get(key), (int, float)) for key in _INTERVAL):
            d, lo, hi = (flat.pop(key) for key in _INTERVAL)
            flat["d_auc [CI]"] = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        rows.update({_metric_label(path, key): _format(value, metric=True) for key, value in flat.items()})
    return rows


def columns(shown: Sequence[Mapping[str, Any]]) -> list[Column]:
    """The workspace, each baseline commit and each of its experiments, in `dvc exp show`'s order;
    queued, running or failed experiments (no data yet) are left out."""
    out = []
    for baseline in shown:
        entries = [baseline] + [exp["revs"][0] for exp in (baseline.get("experiments") or []) if exp.get("revs")]
        for entry in entries:
            data = entry.get("data")
            if not data or entry.get("error"):
                continue
            rev = str(entry.get("rev", ""))
            name = entry.get("name") or (rev if rev == "workspace" else rev[:7])
            out.append(Column(name, figures(data)))
    return out


def select(available: Sequence[Column], names: Iterable[str]) -> list[Column]:
    """The named columns in the order named; without names, all of them, the workspace only when it
    differs from every other column (after `dvc exp run` it is a copy of the last experiment)."""
    names = list(names)
    if names:
        by_name = {c.name: c for c in available}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"no experiment or commit named {', '.join(unknown)} in `dvc exp show` "
                              f"(there are: {', '.join(by_name) or 'none'})")
        return [by_name[n] for n in names]
    others = [c for c in available if c.name != "workspace"]
    workspace = [c for c in available if c.name == "workspace"]
    if workspace and any(c.values == workspace[0].values for c in others):
        return others
    return workspace + others


def rows(cols: Sequence[Column], only_changed: bool = True) -> list[str]:
    """Row labels in first-seen order (parameters, then metrics); with `only_changed`, only those
    whose value (or presence) differs between the columns."""
    labels: dict[str, None] = {}
    for column in cols:
        labels.update(dict.fromkeys(column.values))
    if not only_changed or len(cols) < 2:
        return list(labels)
    return [label for label in labels if len({c.values.get(label, MISSING) for c in cols}) > 1]


def _wrapped(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False) or [text]


def render(cols: Sequence[Column], labels: Sequence[str], width: int = 120) -> str:
    """A plain-text table, split into blocks of columns so that no line is wider than `width`;
    a value wider than MAX_CELL wraps onto continuation lines of its row."""
    if not cols:
        return "no experiments to compare (run one with `dvc exp run` or `mgdm repro --profile ...`)"
    if not labels:
        return f"{', '.join(c.name for c in cols)}: no figure differs"
    label_width = max(len("figure"), *(len(label) for label in labels))
    cells = [{label: _wrapped(c.values.get(label, MISSING), MAX_CELL) for label in labels} for c in cols]
    cell_widths = [max(len(c.name), *(len(line) for lines in column.values() for line in lines))
                   for c, column in zip(cols, cells)]
    blocks: list[list[int]] = [[]]
    used = label_width
    for index, cell in enumerate(cell_widths):
        if blocks[-1] and used + 2 + cell > width:
            blocks.append([])
            used = label_width
        blocks[-1].append(index)
        used += 2 + cell
    text = []
    for block in blocks:
        lines = ["figure".ljust(label_width) + "".join("  " + cols[i].name.rjust(cell_widths[i]) for i in block),
                 "-" * label_width + "".join("  " + "-" * cell_widths[i] for i in block)]
        for label in labels:
            height = max(len(cells[i][label]) for i in block)
            for n in range(height):
                lines.append((label if n == 0 else "").ljust(label_width) + "".join(
                    "  " + (cells[i][label][n] if n < len(cells[i][label]) else "").rjust(cell_widths[i])
                    for i in block))
        text.append("\n".join(line.rstrip() for line in lines))
    return "\n\n".join(text)


def dvc_exp_show(cwd: str = ".", all_commits: bool = False) -> list[dict[str, Any]]:
    command = ["dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ConfigError("`dvc` is not on PATH (install the project with `make install`)") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ConfigError(f"`{' '.join(command)}` failed in {cwd}: {last}")
    return json.loads(done.stdout or "[]")


def compare(names: Iterable[str] = (), cwd: str = ".", only_changed: bool = True, all_commits: bool = False,
            width: int | None = None) -> str:
    cols = select(columns(dvc_exp_show(cwd, all_commits)), names)
    width = width or shutil.get_terminal_size((120, 24)).columns
    return render(cols, rows(cols, only_changed), width)
