"""The shipped checkpoints in data/models/ exist, restore exactly, match their recipe and meet their targets.

A missing checkpoint is a failure, not a skip: the notebooks cannot run without it.
Rebuild one with ``python -m utils.train <name>``.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformer_lens import TransformerBridge, TransformerBridgeConfig

from utils import models, tasks, train

MODELS_DIR = Path(models.MODELS_DIR)
NAMES = list(models.SPECS)


def _path(name: str, suffix: str) -> Path:
    return MODELS_DIR / f"{name}.{suffix}"


def _meta(name: str) -> dict:
    path = _path(name, "json")
    if not path.exists():
        pytest.fail(f"{path} is missing; rebuild it with: python -m utils.train {name}")
    return json.loads(path.read_text())


def _restore(name: str) -> TransformerBridge:
    """The documented way to restore a checkpoint, with a strict state-dict load."""
    weights = _path(name, "safetensors")
    if not weights.exists():
        pytest.fail(f"{weights} is missing; rebuild it with: python -m utils.train {name}")
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**_meta(name)["config"]))
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_files_exist(name):
    for suffix in ("safetensors", "json"):
        path = _path(name, suffix)
        assert path.is_file() and path.stat().st_size > 0, \
            f"{path} is missing or empty; rebuild it with: python -m utils.train {name}"


@pytest.mark.parametrize("name", NAMES)
def test_metadata(name):
    meta = _meta(name)
    assert set(meta) >= {"config", "training"}
    config, training = meta["config"], meta["training"]
    assert set(training) >= {"seed", "seconds", "versions"}
    assert isinstance(training["seed"], int) and config["seed"] == training["seed"]
    assert isinstance(training["seconds"], numbers.Real) and training["seconds"] > 0
    versions = training["versions"]
    assert set(versions) >= {"python", "torch", "transformer_lens"}
    assert all(isinstance(v, str) and v and v != "unknown" for v in versions.values()), versions
    # the checkpoint was trained with today's config and recipe: otherwise rebuild it
    assert config == dict(models.spec(name).config, seed=training["seed"]), \
        f"config differs from utils.models.spec({name!r}).config; rebuild with: python -m utils.train {name}"
    if "recipe" in training:
        assert training["recipe"] == dataclasses.asdict(models.spec(name).recipe), \
            f"recipe differs from utils.models.spec({name!r}).recipe; rebuild with: python -m utils.train {name}"


@pytest.mark.parametrize("name", NAMES)
def test_restores_exactly(name):
    model = _restore(name)
    state = model.state_dict()
    for key, value in state.items():
        assert torch.isfinite(value).all(), key
        if key.endswith("bias"):
            assert (value == 0).all(), f"{key} should be frozen at zero"
    if name == "bigram":
        assert (state["pos_embed.weight"] == 0).all()
    # load_model gives the same model
    cfg = models.spec(name).config
    tokens = torch.randint(0, cfg["d_vocab"], (32, cfg["n_ctx"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(models.load_model(name, MODELS_DIR)(tokens), model(tokens))


@pytest.mark.parametrize("name", NAMES)
def test_meets_target(name):
    spec = models.spec(name)
    report = spec.evaluate(_restore(name))
    assert spec.meets_target(report), f"{name} misses its target ({spec.target}): {spec.summary(report)}"
    assert _meta(name)["training"]["meets_target"] is True


def test_fibonacci_is_right_on_its_whole_domain():
    """Every one of the 14,400 targets of the 8,256 start pairs, fed as the padded batch and unpadded."""
    model = _restore("fibonacci")
    tokens, targets = tasks.fibonacci_sequences()
    assert int((targets != tasks.IGNORE).sum()) == 14_400
    assert models.accuracy(model, tokens, targets) == 1.0
    with torch.no_grad():  # [100, 20] -> 120, the example that failed before
        assert model(torch.tensor([[100, 20]]))[0, -1].argmax().item() == 120
        assert model(torch.tensor([[0, 127]]))[0, -1].argmax().item() == 127


def test_fibonacci_padding_changes_no_prediction_at_a_valid_position():
    model = _restore("fibonacci")
    tokens, targets = tasks.fibonacci_sequences()
    valid = tasks.fibonacci_valid_positions(tokens)
    assert not valid.all()  # there is padding to change
    other = torch.where(valid, tokens, torch.randint(0, tasks.ADDITION_MAX + 1, tokens.shape,
                                                      generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(other, tokens) and torch.equal(tasks.fibonacci_targets(other), targets)
    padded, repadded = models.predictions(model, tokens), models.predictions(model, other)
    assert torch.equal(padded[valid], repadded[valid])
    # and a short sequence fed as it is, without padding, gets the same predictions
    short = valid.sum(-1) == 3
    assert short.any()
    assert torch.equal(models.predictions(model, tokens[short, :3]), padded[short, :3])


def test_induction_heads():
    """Chapter 7 finds a previous-token head in layer 0 and an induction head in layer 1 of the shipped model."""
    model = _restore("induction")
    half = tasks.INDUCTION_HALF
    tokens, _ = tasks.induction_batch(512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    query = torch.arange(half, 2 * half - 1)  # the repeat's predictable positions
    previous = cache["pattern", 0][:, :, query, query - 1].mean((0, 2))  # [n_heads]
    induction = cache["pattern", 1][:, :, query, query - half + 1].mean((0, 2))  # [n_heads]
    assert previous.max() > 0.9, f"no previous-token head in layer 0: {previous.tolist()}"
    assert induction.max() > 0.9, f"no induction head in layer 1: {induction.tolist()}"
    k_composition = model.all_composition_scores("K")[0, :, 1, :]  # [layer-0 head, layer-1 head]
    best = k_composition[previous.argmax(), induction.argmax()]
    for kind in ("Q", "V"):
        assert best > 2 * model.all_composition_scores(kind)[0, :, 1, :].max(), kind
