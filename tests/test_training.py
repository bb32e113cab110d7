"""Checkpoints (atomic, weights-only, config-checked) and the training loop (resume, NaN stop, EMA, sampler)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from mgdm_core.config import load_params
from mgdm_core.errors import CheckpointError, NumericalError
from mgdm_core.training.checkpoint import load_checkpoint, save_checkpoint
from mgdm_core.training.loop import TrainResult, WarmupEMA, balanced_batch_indices, train_loop, warmup_ema_decay

CONFIG = {"width": 8, "channel_mult": (1, 2), "dropout": 0.2}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and avoids OpenMP spin-waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(nn.Module):
    """A conv net with dropout, so per-step seeding of the global RNG matters for resuming."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Dropout(0.2), nn.Conv2d(8, 1, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


DATA = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def denoising_loss(model: nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
    index = torch.randint(0, len(DATA), (8,), generator=generator)
    noise = torch.randn(8, 1, 8, 8, generator=generator)
    return ((model(DATA[index] + noise) - DATA[index]) ** 2).mean()


def train(path: Path, steps: int, *, loss_fn=denoising_loss, config=CONFIG, **kwargs) -> TrainResult:
    torch.manual_seed(0)  # the same initial weights in every call
    options = dict(
        model=TinyNet(), loss_fn=loss_fn, steps=steps, lr=1e-2, weight_decay=1e-4, ema_decay=0.9,
        device=torch.device("cpu"), seed=7, checkpoint_path=path, checkpoint_every=5, config=config,
        kind="toy", on_log=None, log_every=4, progress=False,
    )
    return train_loop(**{**options, **kwargs})


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_checkpoint_round_trip_keeps_config_and_tensors(tmp_path: Path) -> None:
    state = {"model": TinyNet().state_dict(), "step": 3, "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "sub" / "c.pt", kind="toy", config=CONFIG, state=state)
    config, loaded = load_checkpoint(tmp_path / "sub" / "c.pt", kind="toy", expected_config=CONFIG)
    assert config == {"width": 8, "channel_mult": [1, 2], "dropout": 0.2}  # JSON: tuples read back as lists
    assert loaded["step"] == 3
    assert torch.equal(loaded["rng"], state["rng"])
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.pt"]  # no temp file left behind


def test_weights_only_loading_refuses_a_pickled_object(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "kind": "toy", "config": "{}", "state": {"payload": TinyNet()}}, path)
    with pytest.raises(CheckpointError, match="weights-only loading refuses") as caught:
        load_checkpoint(path, kind="toy")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"), [(None, "not found"), (b"", "corrupt"), (b"not a checkpoint" * 50, "corrupt")]
)
def test_missing_or_corrupt_checkpoint_is_a_checkpoint_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "c.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(path, kind="toy")
    assert str(path) in str(caught.value)


def test_wrong_kind_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", kind="classifier", config=CONFIG, state={"step": 0})
    with pytest.raises(CheckpointError, match="'classifier' model, expected 'diffusion'"):
        load_checkpoint(tmp_path / "c.pt", kind="diffusion")


def test_architecture_mismatch_names_the_differing_key_and_both_configs(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", kind="toy", config=CONFIG, state={"step": 0})
    expected = {**CONFIG, "width": 16}
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "c.pt", kind="toy", expected_config=expected)
    message = str(caught.value)
    assert message.index("width: checkpoint 8 != expected 16") < message.index("checkpoint config:")
    assert '"width": 8' in message and '"width": 16' in message


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path: Path, caplog) -> None:
    straight = train(tmp_path / "a" / "checkpoint.pt", 20)
    train(tmp_path / "b" / "checkpoint.pt", 10)
    with caplog.at_level(logging.INFO, logger="mgdm_core.training.loop"):
        resumed = train(tmp_path / "b" / "checkpoint.pt", 20)
    assert resumed.resumed_from_step == 10
    assert "resumed from step 10" in caplog.text
    assert_same_weights(straight.model, resumed.model)
    assert_same_weights(straight.ema_model, resumed.ema_model)
    assert straight.losses[10:] == resumed.losses
    _, state_a = load_checkpoint(tmp_path / "a" / "checkpoint.pt", kind="toy")
    _, state_b = load_checkpoint(tmp_path / "b" / "checkpoint.pt", kind="toy")
    assert state_a["step"] == state_b["step"] == 20
    for a, b in zip(state_a["optimizer"]["state"].values(), state_b["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_resume_with_another_config_tells_the_user_what_to_do(tmp_path: Path) -> None:
    train(tmp_path / "checkpoint.pt", 5)
    with pytest.raises(CheckpointError, match=f"delete {tmp_path}") as caught:
        train(tmp_path / "checkpoint.pt", 10, config={**CONFIG, "dropout": 0.5})
    assert "dropout" in str(caught.value)


def test_non_finite_loss_stops_with_the_last_good_checkpoint_intact(tmp_path: Path) -> None:
    def poisoned(model: nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        loss = denoising_loss(model, step, generator)
        return loss * math.nan if step == 13 else loss

    # Checkpoints every 5 steps, losses checked every 4: the NaN at step 13 is seen at step 16,
    # after the checkpoint at 10 and before the one at 15 would hold the poisoned weights.
    with pytest.raises(NumericalError, match="at step 13.*step 10") as caught:
        train(tmp_path / "bad" / "checkpoint.pt", 20, loss_fn=poisoned)
    assert "\n" not in str(caught.value)
    _, state = load_checkpoint(tmp_path / "bad" / "checkpoint.pt", kind="toy")
    assert state["step"] == 10
    good = train(tmp_path / "good" / "checkpoint.pt", 10)
    for key, value in good.model.state_dict().items():
        assert torch.equal(state["model"][key], value)


def test_ema_differs_from_the_model_and_moves_toward_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    initial = torch.nn.utils.parameters_to_vector(TinyNet().parameters())
    result = train(tmp_path / "checkpoint.pt", 30)
    trained = torch.nn.utils.parameters_to_vector(result.model.parameters())
    ema = torch.nn.utils.parameters_to_vector(result.ema_model.parameters())
    assert not torch.equal(ema, trained)
    assert not torch.equal(ema, initial)
    # The EMA lags the model: closer to it than the starting point, but not on top of it.
    assert 0 < (ema - trained).norm() < (initial - trained).norm()


def test_on_log_reports_mean_losses_every_log_every_steps(tmp_path: Path) -> None:
    records: list[tuple[int, dict[str, float]]] = []
    result = train(tmp_path / "checkpoint.pt", 10, on_log=lambda step, values: records.append((step, values)))
    assert [step for step, _ in records] == [4, 8, 10]
    assert records[0][1]["loss"] == pytest.approx(sum(result.losses[:4]) / 4)
    assert len(result.losses) == 10


def test_balanced_sampler_roughly_balances_a_nine_to_one_label_set() -> None:
    labels = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    generator = torch.Generator().manual_seed(0)
    balanced = balanced_batch_indices(labels, 4000, generator, balanced=True)
    uniform = balanced_batch_indices(labels, 4000, generator, balanced=False)
    # Binomial(4000, p) has sd <= 0.008 in the fraction: 0.05 is over 6 sd.
    assert abs(labels[balanced].float().mean() - 0.5) < 0.05
    assert abs(labels[uniform].float().mean() - 0.1) < 0.05
    assert balanced.shape == (4000,) and balanced.dtype == torch.long


def _ema_weight_on_first_update(steps: int, decay: float) -> float:
    """What an EMA trained `steps` updates still holds of the first update's weights.

    A one-parameter model is 1 at the first update and 0 at every later one, so the EMA's value
    is exactly the remaining weight on the start.
    """
    model = nn.Linear(1, 1, bias=False)
    averaging = WarmupEMA(decay)
    ema = AveragedModel(model, multi_avg_fn=averaging, use_buffers=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.update_parameters(model)
        model.weight.fill_(0.0)
        for n in range(1, steps):
            averaging.n = n
            ema.update_parameters(model)
    return float(ema.module.weight.detach())


def test_ema_warmup_decay_schedule() -> None:
    assert warmup_ema_decay(0.999, 0) == pytest.approx(0.1)
    assert warmup_ema_decay(0.999, 8) == pytest.approx(0.5)
    assert warmup_ema_decay(0.999, 100_000) == 0.999


def test_ema_decays_are_indistinguishable_until_the_warmup_reaches_the_smaller() -> None:
    # The original's 0.9999 and the breastmnist profile's 0.998 average the same weights for the
    # first 4,491 updates, since the warm-up (1 + n) / (10 + n) stays at or below both until then:
    # at a 2,400-step budget the decay is not a factor at all (docs/fidelity.md, "UNet EMA").
    first_difference = next(n for n in range(100_000) if warmup_ema_decay(0.998, n) != warmup_ema_decay(0.9999, n))
    assert first_difference == 4_491
    assert all(warmup_ema_decay(0.995, n) == warmup_ema_decay(0.9999, n) for n in range(1_791))


def test_ema_forgets_the_initial_weights_at_every_profile_step_count() -> None:
    root = Path(__file__).resolve().parents[1]
    profiles = [None, *sorted(p.stem for p in (root / "profiles").glob("*.yaml"))]
    for profile in profiles:
        params = load_params(root / "params.yaml", profile)
        for section in (params.train_diffusion, params.train_classifier):
            # steps: auto can keep its first snapshot, after checkpoint_every steps.
            steps = section.checkpoint_every if section.steps == "auto" else section.steps
            remaining = _ema_weight_on_first_update(steps, section.ema_decay)
            assert remaining < 1e-3, (profile, section, remaining)
    # Without the warm-up, the breastmnist-sized run kept about 5 % of its start.
    assert 0.998 ** 1499 > 0.04
