"""The course's models: configs, building, evaluation, and the checkpoint format.

A checkpoint is two files in data/models/: ``<name>.safetensors`` (the state dict) and
``<name>.json`` = ``{"config": {...}, "training": {...}}``, where ``config`` holds the
keyword arguments of ``TransformerBridgeConfig``. It is restored exactly by

    TransformerBridge.boot_native(TransformerBridgeConfig(**cfg["config"]))
    model.load_state_dict(safetensors.torch.load_file(path))
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from utils import runtime  # noqa: F401  (one torch thread; freed memory back after every cell)
import torch
from torch import Tensor
from transformer_lens import TransformerBridge, TransformerBridgeConfig

from utils import mysteries, tasks

ROOT = Path(__file__).resolve().parent.parent
# CIRCUITS_MODELS_DIR points the course at another set of checkpoints (make test-seeds
# retrains every model with another seed into a scratch folder and runs the chapters on it)
def models_dir(environ=os.environ) -> Path:
    """Where the checkpoints are read from: $CIRCUITS_MODELS_DIR if set, else data/models."""
    return Path(environ.get("CIRCUITS_MODELS_DIR") or ROOT / "data" / "models")


MODELS_DIR = models_dir()

Batches = Callable[[], tuple[Tensor, Tensor]]

# accuracy targets (the README's table of models)
MAX_OF_LIST_TARGET = 0.999
BIGRAM_KL_TARGET = 0.01  # nats, averaged over the chain's stationary distribution
# "induction loss on the repeat far below chance": at most 1 % of the chance loss ln(64) = 4.16 nats
# (trained models reach about 0.0005 nats and 99.99 % accuracy)
INDUCTION_LOSS_TARGET = 0.01  # fraction of the chance loss
INDUCTION_ACCURACY_TARGET = 0.999
INDUCTION_EVAL_SEQUENCES = 4096


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: AdamW for `steps` steps, linear warm-up then cosine decay to lr / 20."""

    steps: int
    lr: float
    batch_size: int  # 0 means the whole data set every step
    weight_decay: float = 0.0
    warmup: int = 0
    # python -m utils.train evaluates every check_every steps and stops at the first evaluation that
    # meets the target (0: never, train all the steps); if the target is still missed after `steps`,
    # it goes on at the final learning rate for up to extra_steps more
    check_every: int = 0
    extra_steps: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """Everything the course knows about one model, in one place.

    config:        TransformerBridgeConfig keyword arguments (without the seed)
    recipe:        the training recipe `python -m utils.train <name>` uses
    batches:       batches(batch_size, generator) -> a function returning one training batch (tokens, targets)
    evaluate:      evaluate(model) -> the report the target is about (exhaustive where feasible)
    meets_target:  meets_target(report) -> whether the report reaches the target
    target:        the target, in words
    summary:       summary(report) -> the report in one short line
    bench_seconds: the benchmark's limit on seconds of training until the target is first met
    padded:        rows are sequences of different lengths padded to n_ctx; training skips the padding
    timed:         whether the benchmark retrains it (the split models share their twin's recipe; the
                   benchmark reports their held-out accuracy from the checkpoints instead)
    milestone:     milestone(report) -> whether a report reaches a level whose first step the training record
                   notes as steps_to_milestone (evaluated every milestone_every steps; training does not stop)
    """

    name: str
    task: str
    config: dict
    recipe: Recipe
    batches: Callable[[int, torch.Generator], Batches]
    evaluate: Callable[[torch.nn.Module], dict]
    meets_target: Callable[[dict], bool]
    target: str
    summary: Callable[[dict], str] = field(default=lambda report: f"acc {report['accuracy']:.5f}")
    bench_seconds: float | None = None
    padded: bool = False
    timed: bool = True
    milestone: Callable[[dict], bool] | None = None
    milestone_every: int = 100


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match its config."""


def rebuild_command(name: str) -> str:
    return f"python -m utils.train {name}"


def spec(name: str) -> ModelSpec:
    """The record of model `name`, or a ValueError listing the course's models."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(SPECS)}") from None


def build_model(name: str, seed: int = 0) -> TransformerBridge:
    """A freshly initialised model for task `name`, biases frozen at zero.

    The zero-layer bigram model also has its positional embedding frozen at zero, so
    that its logits are exactly W_E W_U for every position.
    """
    config = spec(name).config
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**config, seed=seed))
    freeze_biases(model)
    if config["n_layers"] == 0:
        model.W_pos.data.zero_()
        model.W_pos.requires_grad_(False)
    return model


def freeze_biases(model: torch.nn.Module) -> None:
    """Set every bias to zero and stop it from training (TransformerLens 4 cannot switch them off)."""
    for pname, p in model.named_parameters():
        if pname.endswith("bias"):
            p.data.zero_()
            p.requires_grad_(False)


# --------------------------------------------------------------------- evaluation
@torch.no_grad()
def predictions(model: torch.nn.Module, tokens: Tensor, batch_size: int = 8192) -> Tensor:
    """The model's argmax prediction at every position, [batch, seq]."""
    return torch.cat([model(chunk).argmax(-1) for chunk in tokens.split(batch_size)])


def accuracy(model: torch.nn.Module, tokens: Tensor, targets: Tensor) -> float:
    """Fraction of target positions (targets != IGNORE) the model gets right."""
    keep = targets != tasks.IGNORE
    return (predictions(model, tokens)[keep] == targets[keep]).float().mean().item()


def accuracy_by_position(model: torch.nn.Module, tokens: Tensor, targets: Tensor) -> dict[int, float]:
    """Accuracy at every position that has at least one target, {position: fraction right}."""
    predicted = predictions(model, tokens)
    keep = targets != tasks.IGNORE
    return {q: (predicted[keep[:, q], q] == targets[keep[:, q], q]).float().mean().item()
            for q in range(tokens.shape[1]) if keep[:, q].any()}


def accuracy_by_sum(predicted: Tensor, tokens: Tensor, max_sum: int = tasks.ADDITION_MAX) -> Tensor:
    """Share of the pairs [a, b] of each sum a + b = 0..max_sum whose predicted answer is right, [max_sum + 1].

    `predicted` holds the model's answer for each row of `tokens` (the prediction at position 1),
    [n_pairs]; a sum no pair has gets NaN.
    """
    sums = tokens.sum(-1)
    right = (predicted == sums).float()
    return torch.zeros(max_sum + 1).index_add_(0, sums, right) / torch.bincount(sums, minlength=max_sum + 1)


def agreement_by_position(model_a: torch.nn.Module, model_b: torch.nn.Module, tokens: Tensor) -> Tensor:
    """Share of the lists on which the two models predict the same token, at every position, [seq]."""
    return (predictions(model_a, tokens) == predictions(model_b, tokens)).float().mean(0)


def max_of_list_accuracy_by_length(model: torch.nn.Module, samples: int = 100_000, seed: int = 1234) -> dict[int, float]:
    """Accuracy on the last position of lists of each length 2-6.

    Lengths 2 and 3 are exhaustive (4,096 and 262,144 lists); longer lengths use
    `samples` random lists from a fixed seed.
    """
    g = torch.Generator().manual_seed(seed)
    result = {}
    for length in tasks.MAX_OF_LIST_LENGTHS:
        if length <= 3:
            tokens = tasks.all_lists(length)
        else:
            tokens = torch.randint(0, tasks.MAX_OF_LIST_VOCAB, (samples, length), generator=g)
        pred = predictions(model, tokens)[:, -1]
        result[length] = (pred == tokens.max(-1).values).float().mean().item()
    return result


def bigram_table(model: TransformerBridge) -> Tensor:
    """The zero-layer model's log transition table log_softmax(W_E W_U + b_U), [vocab (current), vocab (next)]."""
    return torch.log_softmax(model.W_E @ model.W_U + model.b_U, dim=-1)


def kl_to_chain(log_model: Tensor, transitions: Tensor, pi: Tensor) -> Tensor:
    """KL(true chain || model) in nats per step, a scalar tensor.

    The KL of each row (current state) of the true table `transitions` [vocab, vocab] from the
    log-probabilities `log_model` [vocab, vocab], weighted by how often the chain visits the
    state, its stationary distribution `pi` [vocab].
    """
    return pi @ (transitions * (transitions.log() - log_model)).sum(-1)


def bigram_kl(model: TransformerBridge, transitions: Tensor) -> float:
    """KL(true chain || model) in nats per step, averaged over the stationary distribution."""
    with torch.no_grad():
        log_model = bigram_table(model)
    return kl_to_chain(log_model, transitions, tasks.stationary_distribution(transitions)).item()


@torch.no_grad()
def induction_report(model: torch.nn.Module, sequences: int = INDUCTION_EVAL_SEQUENCES, seed: int = 1234) -> dict:
    """Mean cross-entropy (nats) and accuracy on the repeat of `sequences` induction_batch sequences from a fixed seed.

    Only the positions induction can predict count (half .. 2 * half - 2). Also returns the
    chance loss ln(vocab), what a model that ignores the first copy would get.
    """
    tokens, targets = tasks.induction_batch(sequences, generator=torch.Generator().manual_seed(seed))
    # 1,024 sequences at a time: 4,096 at once would add some 300 MB to the peak RSS
    logits = torch.cat([model(chunk) for chunk in tokens.split(1024)])  # [batch, seq, vocab]
    keep = targets != tasks.IGNORE
    loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep]).item()
    correct = (logits[keep].argmax(-1) == targets[keep]).float().mean().item()
    return {"induction_loss": loss, "chance_loss": math.log(tasks.INDUCTION_VOCAB), "accuracy": correct}


def evaluate(model: torch.nn.Module, name: str) -> dict:
    """The accuracy report for model `name` (the figures its target is about)."""
    return spec(name).evaluate(model)


def meets_target(name: str, report: dict) -> bool:
    """Whether an `evaluate` report reaches the target of model `name`."""
    return spec(name).meets_target(report)


# --------------------------------------------------------------------- checkpoints
def save_checkpoint(model: TransformerBridge, name: str, config: dict, training: dict,
                    models_dir: Path | str = MODELS_DIR) -> Path:
    """Write <models_dir>/<name>.safetensors and <name>.json; returns the safetensors path."""
    from safetensors.torch import save_file

    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / f"{name}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    meta = {"config": config, "training": training}
    (models_dir / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_checkpoint_meta(name: str, models_dir: Path | str = MODELS_DIR) -> dict:
    """The checkpoint's JSON ({"config", "training"}), or a CheckpointError naming the file."""
    path = Path(models_dir) / f"{name}.json"
    fix = f"Rebuild it with: {rebuild_command(name)}"
    if not path.exists():
        raise CheckpointError(f"checkpoint metadata {path} is missing. {fix}")
    try:
        meta = json.loads(path.read_text())
        meta["config"], meta["training"]
    except (ValueError, KeyError, TypeError) as err:  # ValueError covers JSON and Unicode errors
        raise CheckpointError(f"checkpoint metadata {path} is not valid ({err}). {fix}") from None
    return meta


def load_model(name: str, models_dir: Path | str = MODELS_DIR) -> TransformerBridge:
    """The trained model shipped in data/models/<name>, restored exactly (eval mode).

    Raises CheckpointError, naming the file and the command that rebuilds it, when a
    file is missing, corrupt, or does not match its config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(name, models_dir)
    path = Path(models_dir) / f"{name}.safetensors"
    fix = f"Rebuild it with: {rebuild_command(name)}"
    if not path.exists():
        raise CheckpointError(f"checkpoint weights {path} are missing. {fix}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint weights {path} are corrupt ({err}). {fix}") from None
    try:
        model = TransformerBridge.boot_native(TransformerBridgeConfig(**meta["config"]))
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, ZeroDivisionError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match its config in {path.with_suffix('.json')} "
                              f"({first_line}). {fix}") from None
    return model.eval()


# --------------------------------------------------------------------- basis changes
# nn.Linear stores weights as [out, in]. The state-dict entries that touch the residual stream,
# grouped by which axis is d_model (which is what decides how they rotate):
# - d_model last: the embeddings (rows are tokens or positions; they WRITE to the stream) and the
#   matrices that READ it (unembed, the head's q/k/v, the MLP's input);
# - d_model first: the matrices that WRITE to it (the head's output, the MLP's output);
# - the biases of those writers, which are added to the stream like any residual vector.
_D_MODEL_LAST = ("embed.weight", "pos_embed.weight", "unembed.weight", "attn.q.weight", "attn.k.weight",
                 "attn.v.weight", "mlp.in.weight")
_D_MODEL_FIRST = ("attn.o.weight", "mlp.out.weight")
_STREAM_BIASES = ("attn.o.bias", "mlp.out.bias")


def rotate_residual_stream(state: dict[str, Tensor], R: Tensor) -> dict[str, Tensor]:
    """The state dict of the same model with its residual stream expressed in the basis x -> x @ R.

    R: orthogonal [d_model, d_model]. Every weight whose last axis is d_model (the embeddings,
    which write, and the matrices that read the stream) becomes W @ R; the writers whose first
    axis is d_model become R.T @ W; their biases b @ R. The
    rotated model computes exactly the same logits.
    """
    rotated = {}
    for key, w in state.items():
        if key.endswith(_D_MODEL_LAST):
            rotated[key] = w @ R
        elif key.endswith(_D_MODEL_FIRST):
            rotated[key] = R.T @ w
        elif key.endswith(_STREAM_BIASES):
            rotated[key] = w @ R
        else:
            rotated[key] = w.clone()
    return rotated


def rotate_neurons(state: dict[str, Tensor], R: Tensor) -> dict[str, Tensor]:
    """The state dict with every MLP's neurons mixed by R [d_mlp, d_mlp] (pre-activations x -> x @ R).

    Without the ReLU this would change nothing; with it, the logits change: the neuron
    basis is privileged.
    """
    rotated = {key: w.clone() for key, w in state.items()}
    for key, w in state.items():
        if key.endswith("mlp.in.weight"):
            rotated[key] = R.T @ w
        elif key.endswith("mlp.in.bias"):
            rotated[key] = w @ R
        elif key.endswith("mlp.out.weight"):
            rotated[key] = w @ R
    return rotated


def noised_copy(model, task: str, scale: float, seed: int | None = None) -> TransformerBridge:
    """A copy of `model` (a model of `task`) with Gaussian noise on every weight: `scale` times the weight's own
    standard deviation (1 for a single number); `seed` fixes the noise."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    state = {key: w + scale * (w.std() if w.numel() > 1 else 1.0) * torch.randn(w.shape, generator=generator)
             for key, w in model.state_dict().items()}
    return model_from_state(dict(spec(task).config), state)


def moved_to_token_embeddings(model, task: str, vector: Tensor) -> TransformerBridge:
    """A copy of `model` (a model of `task`) with `vector` [d_model] added to every token embedding (W_E) and
    subtracted from every positional embedding (W_pos).

    Every residual stream W_E[token] + W_pos[pos] is unchanged, so is every score and every logit: only how what
    every input shares is divided between W_E and W_pos differs.
    """
    state = dict(model.state_dict())
    state["embed.weight"] = state["embed.weight"] + vector
    state["pos_embed.weight"] = state["pos_embed.weight"] - vector
    return model_from_state(dict(spec(task).config), state)


def model_from_state(config: dict, state: dict[str, Tensor]) -> TransformerBridge:
    """A model built from TransformerBridgeConfig keyword arguments and a state dict (eval mode)."""
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**config))
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------- the course's models
def dataset_batches(data: Callable[[], tuple[Tensor, Tensor]]) -> Callable[[int, torch.Generator], Batches]:
    """A `batches` factory for a fixed data set: random rows (with replacement), or all of it for batch_size 0."""
    def batches(batch_size: int, generator: torch.Generator) -> Batches:
        tokens, targets = data()
        if batch_size == 0 or batch_size >= len(tokens):
            return lambda: (tokens, targets)

        def sample() -> tuple[Tensor, Tensor]:
            idx = torch.randint(0, len(tokens), (batch_size,), generator=generator)
            return tokens[idx], targets[idx]
        return sample
    return batches


def weighted_batches(tokens: Tensor, targets: Tensor, weights: Tensor) -> Callable[[int, torch.Generator], Batches]:
    """A `batches` factory (for train.train's `batches`) that draws rows of a fixed data set with these weights.

    Rows are drawn with replacement, row i with probability weights[i] / weights.sum().
    """
    if weights.shape != (len(tokens),) or not (weights >= 0).all() or not weights.sum() > 0:
        raise ValueError(f"weights must be {len(tokens)} non-negative numbers, not all zero; got shape "
                         f"{tuple(weights.shape)}")

    def batches(batch_size: int, generator: torch.Generator) -> Batches:
        def sample() -> tuple[Tensor, Tensor]:
            idx = torch.multinomial(weights.double(), batch_size, replacement=True, generator=generator)
            return tokens[idx], targets[idx]
        return sample
    return batches


def split_report(model: torch.nn.Module, data: tuple[Tensor, Tensor]) -> dict:
    """Accuracy on the fixed 80 % a split model trains on and on the held-out 20 % (tasks.split)."""
    trained_on, held_out = tasks.split(*data)
    return {"accuracy": accuracy(model, *trained_on), "held_out_accuracy": accuracy(model, *held_out)}


def _bigram_batches(batch_size: int, generator: torch.Generator) -> Batches:
    transitions = tasks.bigram_transition_matrix()
    return lambda: tasks.bigram_batch(transitions, batch_size, generator=generator)


def _max_of_list_report(model: torch.nn.Module) -> dict:
    by_length = max_of_list_accuracy_by_length(model)
    return {"accuracy_by_length": by_length, "min_accuracy": min(by_length.values())}


def _all_lengths_right(report: dict) -> bool:
    """max_of_list's target: at least MAX_OF_LIST_TARGET at every list length."""
    return report["min_accuracy"] >= MAX_OF_LIST_TARGET


def _all_right(report: dict) -> bool:
    return report["accuracy"] == 1.0


def _induction_meets_target(report: dict) -> bool:
    return (report["induction_loss"] <= INDUCTION_LOSS_TARGET * report["chance_loss"]
            and report["accuracy"] >= INDUCTION_ACCURACY_TARGET)


def split_summary(report: dict) -> str:
    return f"acc {report['accuracy']:.5f} on the 80 %, held-out {report['held_out_accuracy']:.4f}"


_TOY = dict(n_heads=1, normalization_type=None)


def _fresh_batches(mystery: str) -> Callable[[int, torch.Generator], Batches]:
    """Training batches of a chapter-10 mystery: fresh inputs at every step."""
    return lambda batch_size, g: lambda: mysteries.fresh_inputs(mystery, batch_size, g)


def _fresh_accuracy(mystery: str) -> Callable[[torch.nn.Module], dict]:
    """A mystery model's report: its accuracy on 20,000 fixed fresh inputs (mystery c: all 4,096 pairs)."""
    return lambda model: {"accuracy": accuracy(model, *mysteries.fresh_inputs(mystery, 20_000,
                                                                               torch.Generator().manual_seed(1234)))}
_ADDER = dict(d_model=128, d_head=128, n_layers=1, d_vocab=tasks.ADDITION_MAX + 1, d_mlp=128, act_fn="relu",
              init_mode="xavier_normal", **_TOY)
_ADDITION = dict(_ADDER, n_ctx=2)
_MAX_OF_LIST = dict(d_model=32, d_head=32, n_layers=1, n_ctx=6, d_vocab=tasks.MAX_OF_LIST_VOCAB, attn_only=True, **_TOY)
_MAX_OF_LIST_RECIPE = Recipe(steps=1200, lr=3e-3, batch_size=1024, weight_decay=0.01, warmup=100)
# chapter 09 retrains max_of_list with other widths of the residual stream (the shipped model has 32 dimensions)
WIDTHS = (2, 4, 8, 16, 64)
_FIBONACCI = dict(_ADDER, n_ctx=tasks.FIBONACCI_LENGTH)
# addition: full-batch at lr 1e-3 oscillates; minibatches, a larger lr, xavier init and a
# cosine decay reach 100 % on all 8,256 pairs for most seeds. Seed 3 ended 1,600 steps with 2 pairs of
# 8,256 wrong, so a model that misses at step 1,600 goes on for up to 1,600 more at the final rate (the one
# check at step 1,600 leaves every model that met the target there exactly as it was)
_ADDITION_RECIPE = Recipe(steps=1600, lr=1e-2, batch_size=1024, weight_decay=0.01, warmup=100, check_every=1600,
                          extra_steps=1600)
# fibonacci: 512 rows a step at lr 2e-2 (bs 256 at 1.5e-2 took 800-1200 steps). A 1000-step schedule left
# seed 1 at 2 errors in 14,400 and a longer one slows every seed down, so: 1000 steps, then up to 500
# more at the final rate, stopping at the first check that meets the target. Seeds 0-3 stopped after
# 750, 950, 750 and 750 steps (the 80 % split models after 700, 650, 700 and 750)
_FIBONACCI_RECIPE = Recipe(steps=1000, lr=2e-2, batch_size=512, weight_decay=0.01, warmup=100, check_every=50,
                           extra_steps=500)

SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in [
    ModelSpec(
        "bigram", "next state of a 16-state Markov chain",
        dict(d_model=32, d_head=32, n_layers=0, n_ctx=tasks.BIGRAM_SEQ, d_vocab=tasks.BIGRAM_VOCAB,
             normalization_type=None, init_mode="xavier_normal"),
        Recipe(steps=600, lr=1e-2, batch_size=256),
        _bigram_batches,
        lambda model: {"kl": bigram_kl(model, tasks.bigram_transition_matrix())},
        lambda report: report["kl"] <= BIGRAM_KL_TARGET,
        f"KL to the true table <= {BIGRAM_KL_TARGET} nats",
        summary=lambda report: f"KL {report['kl']:.4f} nats"),
    ModelSpec(
        "max_of_list", "running max of lists of 0-63, lengths 2-6",
        _MAX_OF_LIST, _MAX_OF_LIST_RECIPE,
        lambda batch_size, g: lambda: tasks.max_of_list_batch(batch_size, generator=g),
        _max_of_list_report,
        _all_lengths_right, f">= {MAX_OF_LIST_TARGET:.1%} at every length",
        summary=lambda report: f"min acc {report['min_accuracy']:.4f}", bench_seconds=20.0, milestone=_all_lengths_right),
    *[ModelSpec(
        f"max_of_list_d{width}", f"max_of_list with a {width}-dimensional residual stream (chapter 09's width sweep)",
        dict(_MAX_OF_LIST, d_model=width, d_head=width), _MAX_OF_LIST_RECIPE,
        lambda batch_size, g: lambda: tasks.max_of_list_batch(batch_size, generator=g),
        _max_of_list_report, lambda report: True, "none: its accuracy at every length is what chapter 09 measures",
        summary=lambda report: f"min acc {report['min_accuracy']:.4f}", timed=False, milestone=_all_lengths_right)
      for width in WIDTHS],
    ModelSpec(
        "addition", "[a, b] -> a + b, a + b <= 127", _ADDITION, _ADDITION_RECIPE,
        dataset_batches(tasks.addition_pairs),
        lambda model: {"accuracy": accuracy(model, *tasks.addition_pairs())},
        _all_right, "100 % of 8,256 pairs", bench_seconds=60.0),
    ModelSpec(
        "addition_split", "addition, trained on a fixed 80 % of the pairs", _ADDITION, _ADDITION_RECIPE,
        dataset_batches(lambda: tasks.split(*tasks.addition_pairs())[0]),
        lambda model: split_report(model, tasks.addition_pairs()),
        _all_right, "100 % of the pairs it trains on; held-out accuracy reported", summary=split_summary, timed=False),
    ModelSpec(
        "fibonacci", "any Fibonacci sequence of 2-5 values <= 127 -> next element", _FIBONACCI, _FIBONACCI_RECIPE,
        dataset_batches(tasks.fibonacci_sequences),
        lambda model: {"accuracy": accuracy(model, *tasks.fibonacci_sequences())},
        _all_right, "100 % of the 14,400 targets of the 8,256 start pairs", bench_seconds=45.0, padded=True),
    ModelSpec(
        "fibonacci_split", "Fibonacci, trained on a fixed 80 % of the start pairs", _FIBONACCI, _FIBONACCI_RECIPE,
        dataset_batches(lambda: tasks.split(*tasks.fibonacci_sequences())[0]),
        lambda model: split_report(model, tasks.fibonacci_sequences()),
        _all_right, "100 % of the targets it trains on; held-out accuracy reported", summary=split_summary,
        padded=True, timed=False),
    # chapter 10's mystery models (utils/mysteries.py holds their tasks)
    ModelSpec(
        "mystery_a", "chapter 10's first mystery model",
        dict(d_model=32, d_head=32, n_layers=1, n_ctx=mysteries.LENGTH_A, d_vocab=mysteries.VOCAB_A, attn_only=True,
             **_TOY),
        Recipe(steps=1000, lr=3e-3, batch_size=512, weight_decay=0.01, warmup=50, check_every=250, extra_steps=1000),
        _fresh_batches("mystery_a"), _fresh_accuracy("mystery_a"),
        lambda report: report["accuracy"] >= 0.999, ">= 99.9 % of 20,000 fresh lists", timed=False),
    ModelSpec(
        "mystery_b", "chapter 10's second mystery model",
        dict(d_model=64, d_head=64, n_layers=1, n_ctx=2 * mysteries.SORT_LENGTH, d_vocab=mysteries.SORT_VOCAB + 1,
             attn_only=True, **_TOY),
        Recipe(steps=1500, lr=3e-3, batch_size=512, weight_decay=0.01, warmup=100, check_every=250, extra_steps=1500),
        _fresh_batches("mystery_b"), _fresh_accuracy("mystery_b"),
        lambda report: report["accuracy"] >= 0.999, ">= 99.9 % of the predictions on 20,000 fresh lists", timed=False),
    ModelSpec(
        "mystery_c", "chapter 10's third mystery model",
        dict(_ADDER, d_model=64, d_head=64, n_ctx=2, d_vocab=mysteries.VOCAB_C),
        Recipe(steps=1500, lr=1e-2, batch_size=512, weight_decay=0.01, warmup=100, check_every=500, extra_steps=4500),
        dataset_batches(mysteries.mystery_c_data), _fresh_accuracy("mystery_c"),
        _all_right, "100 % of the 4,096 pairs", timed=False),
    ModelSpec(
        "induction", "random tokens with a stretch repeated; predict the repeat",
        dict(d_model=64, d_head=32, n_heads=2, n_layers=2, n_ctx=tasks.INDUCTION_SEQ, d_vocab=tasks.INDUCTION_VOCAB,
             attn_only=True, normalization_type=None),
        # the loss is near zero after ~500 steps; the rest sharpens the previous-token and induction
        # heads to ~0.99 attention. No weight decay: with 0.05 the heads are a little blunter
        # (induction 0.93) and the K-composition scores barely move
        Recipe(steps=1000, lr=1e-2, batch_size=128, warmup=100),
        lambda batch_size, g: lambda: tasks.induction_training_batch(batch_size, generator=g),
        induction_report, _induction_meets_target,
        f"loss on the repeat <= {INDUCTION_LOSS_TARGET:.0%} of chance (ln 64), accuracy >= {INDUCTION_ACCURACY_TARGET:.1%}",
        summary=lambda report: (f"loss {report['induction_loss']:.4f} (chance {report['chance_loss']:.2f}), "
                                f"acc {report['accuracy']:.4f}"),
        bench_seconds=30.0),
]}
