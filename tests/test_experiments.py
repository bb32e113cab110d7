"""`mgdm compare`: DVC experiments side by side, a row per figure that differs, readable in 120 columns."""

import pytest

from mgdm_core.errors import ConfigError
from mgdm_core.experiments import columns, render, rows, select


def _revision(rev: str, name: str | None, scale: float, d_auc: float, stage2_auc: float) -> dict:
    """One revision as `dvc exp show --json` (DVC 3) reports it."""
    return {"rev": rev, "name": name, "data": {
        "rev": rev, "timestamp": None,
        "params": {"params.yaml": {"data": {"disturb": {"scale": scale, "measure": ["entropy"]},
                                            "train_diffusion": {"lr": 0.0005}}}},
        "metrics": {
            "metrics/evaluate/resnet18/real.json": {"data": {"auc": 0.889, "acc": 0.84}},
            "metrics/evaluate/resnet18/real+stage2-entropy.json": {"data": {
                "auc": stage2_auc, "acc": 0.85, "d_auc": d_auc, "d_lo": d_auc - 0.02, "d_hi": d_auc + 0.02}},
            "metrics/quality/stage2-entropy.json": {"data": {"fd_ratio": 5.3 * scale / 4, "fidelity": 0.9}},
        }, "deps": {}, "outs": {}, "meta": {}}, "error": None}


def _shown(workspace_scale: float = 8.0) -> list[dict]:
    baseline = _revision("a" * 40, "main", 4.0, 0.01, 0.899)
    baseline["experiments"] = [
        {"revs": [_revision("b" * 40, "scale8", 8.0, 0.03, 0.919)]},
        {"revs": [{"rev": "c" * 40, "name": "queued-one", "data": None, "error": None}]},
    ]
    workspace = _revision("workspace", None, workspace_scale, 0.03, 0.919)
    workspace["experiments"] = None
    return [workspace, baseline]


def test_experiments_become_columns_and_a_copy_of_one_in_the_workspace_is_left_out() -> None:
    cols = select(columns(_shown()), [])
    assert [c.name for c in cols] == ["main", "scale8"]  # the queued experiment has no data yet
    assert cols[1].values["disturb.scale"] == "8.0"
    assert cols[1].values["train_diffusion.lr"] == "0.0005"  # parameters keep their digits


def test_a_workspace_that_differs_from_every_experiment_is_shown_first() -> None:
    assert [c.name for c in select(columns(_shown(workspace_scale=2.0)), [])] == ["workspace", "main", "scale8"]


def test_only_figures_that_differ_are_rows_with_the_paired_difference_and_interval_in_one_cell() -> None:
    cols = select(columns(_shown()), [])
    labels = rows(cols)
    assert labels == ["disturb.scale", "resnet18 real+stage2-entropy auc",
                      "resnet18 real+stage2-entropy d_auc [CI]", "quality stage2-entropy fd_ratio"]
    assert cols[1].values["resnet18 real+stage2-entropy d_auc [CI]"] == "+0.030 [+0.010, +0.050]"
    assert "resnet18 real auc" in rows(cols, only_changed=False)


def test_named_columns_come_in_the_order_named_and_an_unknown_name_is_one_clear_error() -> None:
    available = columns(_shown())
    assert [c.name for c in select(available, ["scale8", "workspace"])] == ["scale8", "workspace"]
    with pytest.raises(ConfigError, match="no experiment or commit named nope.*there are: workspace, main, scale8"):
        select(available, ["nope"])


def test_many_experiments_print_in_blocks_no_wider_than_the_terminal() -> None:
    base = select(columns(_shown()), [])
    many = [type(base[0])(f"exp-{i:02d}", base[i % 2].values) for i in range(9)]
    text = render(many, rows(many), width=120)
    assert max(len(line) for line in text.splitlines()) <= 120
    blocks = text.split("\n\n")
    assert len(blocks) > 1 and all(block.startswith("figure") for block in blocks)
    assert all(f"exp-{i:02d}" in text for i in range(9))
    assert "+0.030 [+0.010, +0.050]" in text and "+0.010 [-0.010, +0.030]" in text


def test_one_column_shows_all_its_figures_and_identical_columns_say_nothing_differs() -> None:
    assert "no experiments" in render([], [])
    (main,) = select(columns(_shown()), ["main"])
    assert rows([main]) == list(main.values)
    assert render([main, main], rows([main, main])) == "main, main: no figure differs"


def test_a_long_value_wraps_between_list_items_instead_of_widening_its_column() -> None:
    shown = _shown(workspace_scale=2.0)
    shown[0]["data"]["params"]["params.yaml"]["data"]["evaluate"] = {
        "conditions": ["real", "real+classic", "real+stage1", "real+stage2", "synthetic"]}
    cols = select(columns(shown), [])
    text = render(cols, rows(cols), width=120)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120 and "\n\n" not in text  # three columns, one block
    start = next(i for i, line in enumerate(lines) if line.startswith("evaluate.conditions"))
    row = [lines[start]] + [line for line in lines[start + 1:start + 5] if line.startswith(" ")]
    assert len(row) > 1  # continuation lines carry no label
    items = " ".join(line.split()[1 if line is row[0] else 0] for line in row)
    assert items == '["real", "real+classic", "real+stage1", "real+stage2", "synthetic"]'
