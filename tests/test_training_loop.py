"""The shared training loop: loss falls, LR schedule, checkpoint/resume equals an uninterrupted run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nemoforge.config import TrainConfig
from nemoforge.training.checkpoint import is_complete_checkpoint, latest_checkpoint
from nemoforge.training.loop import epoch_batches, train
from nemoforge.training.losses import causal_lm_loss_BT
from nemoforge.training.optim import lr_multiplier

VOCAB = 96


def _tiny_model(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=dropout,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _lm_loss(model: torch.nn.Module, input_ids_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    loss = causal_lm_loss_BT(model(input_ids_BT, use_cache=False).logits, input_ids_BT).mean()
    return loss, {}


def _rows(num_rows: int = 8, seq_len: int = 12) -> torch.Tensor:
    # a learnable pattern: each row counts up from a random start
    starts = torch.randint(0, VOCAB, (num_rows, 1), generator=torch.Generator().manual_seed(1))
    return (starts + torch.arange(seq_len)) % VOCAB


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lr_schedule_is_linear_warmup_then_cosine_to_the_floor():
    values = [lr_multiplier(i, steps=10, warmup_steps=2, min_lr_ratio=0.1) for i in range(10)]
    expected = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 9)]
    assert values == pytest.approx(expected, abs=1e-12)
    assert values[-1] == pytest.approx(0.1, abs=1e-12)
    assert [lr_multiplier(i, steps=4, warmup_steps=0, min_lr_ratio=0.0) for i in range(4)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)], abs=1e-12
    )


def test_epoch_batches_cover_each_row_once_per_epoch():
    ids_NT = torch.arange(10).reshape(5, 2)
    batches = epoch_batches(ids_NT, 2, seed=0)
    seen = torch.cat([batches(i) for i in range(5)])[:, 0] // 2  # 10 rows = two epochs
    assert sorted(seen[:5].tolist()) == [0, 1, 2, 3, 4] and sorted(seen[5:].tolist()) == [0, 1, 2, 3, 4]
    assert not torch.equal(seen[:5], seen[5:])  # a fresh order each epoch
    assert torch.equal(epoch_batches(ids_NT, 2, seed=0)(3), batches(3))


def test_loss_falls_params_change_and_lr_follows_the_schedule(tmp_path: Path):
    model = _tiny_model()
    before = _params(model)
    cfg = TrainConfig(steps=25, batch_size=4, lr=1e-2, warmup_steps=3, checkpoint_every_steps=100)
    logged: list[int] = []
    state = train(
        model,
        _lm_loss,
        epoch_batches(_rows(), 4, seed=0),
        cfg,
        seed=0, checkpoint_dir=tmp_path,
        desc="test",
        on_log=lambda step, metrics: logged.append(step),
    )
    losses = [v for _, v in state.history["loss"]]
    assert state.step == 25 and logged == list(range(1, 26))
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    lrs = [v for _, v in state.history["lr"]]
    assert lrs == pytest.approx(
        [1e-2 * lr_multiplier(i, steps=25, warmup_steps=3, min_lr_ratio=0.1) for i in range(25)]
    )
    assert set(state.history) >= {"loss", "lr", "grad_norm", "tokens_per_s"}
    assert state.checkpoint == tmp_path / "step-25" and is_complete_checkpoint(state.checkpoint)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path: Path, capsys):
    cfg = TrainConfig(steps=7, batch_size=3, lr=5e-3, warmup_steps=2, checkpoint_every_steps=3)
    batches = epoch_batches(_rows(), 3, seed=0)  # 8 rows / 3 per step: epochs cross batch boundaries

    reference = _tiny_model(dropout=0.2)  # dropout: the RNG state must be restored too
    full = train(reference, _lm_loss, batches, cfg, seed=0, checkpoint_dir=tmp_path / "full", desc="full")

    def interrupt_at_5(step: int, metrics: dict[str, float]) -> None:
        if step == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(
            _tiny_model(dropout=0.2),
            _lm_loss,
            batches,
            cfg,
            seed=0, checkpoint_dir=tmp_path / "cut",
            desc="cut",
            on_log=interrupt_at_5,
        )
    assert latest_checkpoint(tmp_path / "cut") == tmp_path / "cut" / "step-3"
    # a half-written checkpoint (no meta.json) is ignored
    (tmp_path / "cut" / "step-6").mkdir()
    (tmp_path / "cut" / "step-6" / "model.safetensors").write_bytes(b"partial")

    # as in a new process: a different init, overwritten by the resume
    resumed_model = _tiny_model(seed=123, dropout=0.2)
    capsys.readouterr()
    resumed = train(resumed_model, _lm_loss, batches, cfg, seed=0, checkpoint_dir=tmp_path / "cut", desc="resumed")
    assert resumed.resumed_from_step == 3 and resumed.step == 7
    assert "resuming resumed from step 3 of 7" in capsys.readouterr().err
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value, rtol=0, atol=1e-6)
    assert [v for _, v in resumed.history["loss"]] == pytest.approx(
        [v for _, v in full.history["loss"]], abs=1e-6
    )
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["step-6", "step-7"]  # keep_checkpoints=2

    # a finished run restarts as a no-op
    again = train(
        _tiny_model(dropout=0.2), _lm_loss, batches, cfg, seed=0, checkpoint_dir=tmp_path / "cut", desc="again"
    )
    assert again.resumed_from_step == 7 and again.step == 7


def test_divergence_names_the_step(tmp_path: Path):
    from nemoforge.errors import NemoforgeError

    def nan_loss(model: torch.nn.Module, input_ids_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return _lm_loss(model, input_ids_BT)[0] * float("nan"), {}

    cfg = TrainConfig(steps=3, warmup_steps=0)
    with pytest.raises(NemoforgeError, match="step 1.*lower the lr"):
        train(
            _tiny_model(),
            nan_loss,
            epoch_batches(_rows(), 2, seed=0),
            cfg,
            seed=0, checkpoint_dir=tmp_path,
            desc="nan",
        )


class _Planted:
    """Unpickling this runs ``Path.touch(marker)``: what a crafted ``state.pt`` in the artifact store could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_state_file_that_would_run_code_and_runs_none(tmp_path: Path):
    import json

    from nemoforge.errors import NemoforgeError

    cfg = TrainConfig(steps=3, batch_size=3, lr=5e-3, warmup_steps=0, checkpoint_every_steps=3)
    batches = epoch_batches(_rows(), 3, seed=0)
    train(_tiny_model(), _lm_loss, batches, cfg, seed=0, checkpoint_dir=tmp_path / "ckpt", desc="first")
    step_dir = tmp_path / "ckpt" / "step-3"
    marker = tmp_path / "pwned"
    state = torch.load(step_dir / "state.pt", weights_only=True)  # what nemoforge writes loads without pickle
    torch.save({**state, "rng": _Planted(marker)}, step_dir / "state.pt")
    meta = json.loads((step_dir / "meta.json").read_text())  # the attacker keeps the checkpoint "complete"
    meta["file_sizes"]["state.pt"] = (step_dir / "state.pt").stat().st_size
    (step_dir / "meta.json").write_text(json.dumps(meta))
    assert latest_checkpoint(tmp_path / "ckpt") == step_dir

    with pytest.raises(NemoforgeError, match=r"refusing to resume from .*step-3/state.pt"):
        train(_tiny_model(), _lm_loss, batches, cfg.model_copy(update={"steps": 5}), seed=0, checkpoint_dir=tmp_path / "ckpt",
              desc="resume")
    assert not marker.exists()
