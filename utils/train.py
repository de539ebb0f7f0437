"""Training: one short loop for every model, and the command that rebuilds the checkpoints.

    python -m utils.train <name | all> [--seed N] [--out DIR] [--reuse]

retrains `name` (any model of utils.models.SPECS, or all of them) from scratch, deterministically
on the CPU, prints its accuracy report and writes data/models/<name>.{safetensors,json}.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from dataclasses import asdict
from typing import Callable

from utils import runtime  # noqa: F401  (one torch thread; freed memory back after every cell)
import torch
import torch.nn.functional as F
from torch import Tensor

from utils import models, tasks
from utils.models import Recipe


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position that has a target (targets != IGNORE)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=tasks.IGNORE)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: Tensor, targets: Tensor) -> float:
    """One optimisation step on one batch; returns the batch loss as a float."""
    return step_on_loss(optimizer, loss_fn(model(tokens), targets))


def step_on_loss(optimizer: torch.optim.Optimizer, loss: Tensor) -> float:
    """Clear the gradients, backpropagate `loss`, let `optimizer` update; returns the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def length_groups(tokens: Tensor, targets: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The rows of a padded batch grouped by their last target position, each group cut after it.

    Returns [(tokens, targets)], one pair per length. Attention is causal, so what follows
    a row's last target changes none of its logits at a target.
    """
    has_target = targets != tasks.IGNORE
    ends = (has_target * torch.arange(1, targets.shape[1] + 1)).max(-1).values  # [batch], 0: no target
    return [(tokens[ends == n, :n], targets[ends == n, :n]) for n in ends.unique().tolist() if n > 0]


def train_step_on_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: Tensor,
                         targets: Tensor) -> float:
    """train_step for padded rows (Fibonacci): the same loss and gradient, without computing the padding.

    Each length group runs on its own and its summed loss, divided by the batch's number of
    targets, is backpropagated, so the gradients add up to those of the mean loss.
    """
    optimizer.zero_grad(set_to_none=True)
    n_targets = (targets != tasks.IGNORE).sum()
    total = 0.0
    for group_tokens, group_targets in length_groups(tokens, targets):
        logits = model(group_tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), group_targets.flatten(), ignore_index=tasks.IGNORE,
                               reduction="sum") / n_targets
        loss.backward()
        total += loss.item()
    optimizer.step()
    return total


def step_function(name: str) -> Callable[..., float]:
    """The training step `train` uses for model `name`: train_step, or train_step_on_groups for padded rows."""
    return train_step_on_groups if models.spec(name).padded else train_step


def lr_at(step: int, recipe: Recipe) -> float:
    """Learning rate at `step`: linear warm-up, then cosine decay from lr to lr / 20 at recipe.steps, then lr / 20."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = min(1.0, (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup))
    return recipe.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: torch.nn.Module,
    name: str,
    recipe: Recipe | None = None,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    stop_at_target: bool = False,
    step: Callable[..., float] | None = None,
    batches: Callable[[int, torch.Generator], Callable[[], tuple[Tensor, Tensor]]] | None = None,
) -> list[float]:
    """Train `model` on task `name` in place with AdamW; returns the loss at every step.

    `on_step(step, loss)` is called after every step (the notebooks use it for a live
    loss curve). Only parameters with requires_grad train, so frozen biases stay zero.
    With `stop_at_target`, the model is evaluated every `recipe.check_every` steps,
    training stops at the first evaluation that meets the model's target, and it may run
    `recipe.extra_steps` beyond `recipe.steps` (at the final learning rate) to get there.
    `step(model, optimizer, tokens, targets) -> float` replaces the task's training step (chapter 01 passes
    the learner's), and `batches(batch_size, generator)` the task's batch factory (e.g. models.weighted_batches).
    """
    from tqdm.auto import tqdm

    spec = models.spec(name)
    recipe = recipe or spec.recipe
    generator = torch.Generator().manual_seed(seed)
    next_batch = (batches or spec.batches)(recipe.batch_size, generator)
    step_fn = step or step_function(name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    losses = []
    total = recipe.steps + (recipe.extra_steps if stop_at_target else 0)
    bar = tqdm(range(total), desc=f"training {name}", disable=not progress, mininterval=0.5)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        losses.append(step_fn(model, optimizer, *next_batch()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if on_step is not None:
            on_step(step, losses[-1])
        if stop_at_target and recipe.check_every and (step + 1) % recipe.check_every == 0:
            model.eval()
            if spec.meets_target(spec.evaluate(model)):
                break
            model.train()
    model.eval()
    return losses


def steps_below(losses: list[float], threshold: float) -> tuple[int, int]:
    """(the first step whose loss is below `threshold`, the first step from which every loss stays below it).

    Steps count from 0, as `train`'s list of losses does; -1 where a loss curve never gets there.
    """
    below = [loss < threshold for loss in losses]
    first = below.index(True) if True in below else -1
    settled = len(below)
    while settled > 0 and below[settled - 1]:
        settled -= 1
    return first, (settled if settled < len(below) else -1)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformer_lens": version("transformer-lens")}


def train_checkpoint(name: str, seed: int = 0, out: str | None = None, progress: bool = True) -> tuple[dict, Path]:
    """Train `name` from scratch with its recipe, evaluate it, save it; returns (report, path)."""
    torch.manual_seed(seed)
    model = models.build_model(name, seed=seed)
    recipe = models.spec(name).recipe
    spec, reached = models.spec(name), []

    def note_milestone(step: int, _loss: float) -> None:  # the first check at which the milestone holds
        if not reached and (step + 1) % spec.milestone_every == 0:
            model.eval()
            if spec.milestone(spec.evaluate(model)):
                reached.append(step + 1)
            model.train()

    start = time.perf_counter()
    losses = train(model, name, recipe, seed=seed, progress=progress, stop_at_target=True,
                   on_step=note_milestone if spec.milestone else None)
    seconds = time.perf_counter() - start
    report = models.evaluate(model, name)
    training = {"seed": seed, "recipe": asdict(recipe), "steps_run": len(losses), "seconds": round(seconds, 1),
                "report": report, "meets_target": models.meets_target(name, report), "versions": versions()}
    if spec.milestone:  # seconds include the milestone's evaluations
        training["steps_to_milestone"] = reached[0] if reached else None
    config = dict(models.spec(name).config, seed=seed)
    path = models.save_checkpoint(model, name, config, training, out or models.MODELS_DIR)
    return report, path


def is_current(name: str, seed: int, out: Path | str) -> bool:
    """Whether <out>/<name>.json already holds a checkpoint of this seed, config and recipe that met its target."""
    try:
        meta = models.read_checkpoint_meta(name, out)
    except models.CheckpointError:
        return False
    spec, training = models.spec(name), meta["training"]
    return (meta["config"] == dict(spec.config, seed=seed) and training.get("recipe") == asdict(spec.recipe)
            and training.get("meets_target") is True and (Path(out) / f"{name}.safetensors").is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.train", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=[*models.SPECS, "all"], help="a model, or all of them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for the checkpoint (default data/models)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip a model whose checkpoint in --out already has this seed, config and recipe")
    args = parser.parse_args(argv)
    out = Path(args.out or models.MODELS_DIR)
    missed = []
    for name in models.SPECS if args.name == "all" else [args.name]:
        if args.reuse and is_current(name, args.seed, out):
            print(f"{name}: {out / name}.safetensors is current (seed {args.seed}), not retrained")
            continue
        report, path = train_checkpoint(name, args.seed, out, progress=sys.stderr.isatty())
        ok = models.meets_target(name, report)
        print(f"{name}: {report}")
        print(f"saved {path} ({'meets' if ok else 'MISSES'} the target)")
        if not ok:
            missed.append(name)
    if missed:
        print(f"missed the target with seed {args.seed}: {', '.join(missed)} (fix the recipe in utils/models.py)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
