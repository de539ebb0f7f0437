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
from pathlib import Path

import torch
from torch import Tensor
from transformer_lens import TransformerBridge, TransformerBridgeConfig

from utils import tasks

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "data" / "models"

_TOY = dict(n_heads=1, normalization_type=None)
CONFIGS: dict[str, dict] = {
    "bigram": dict(d_model=32, d_head=32, n_layers=0, n_ctx=tasks.BIGRAM_SEQ, d_vocab=tasks.BIGRAM_VOCAB,
                   normalization_type=None, init_mode="xavier_normal"),
    "max_of_list": dict(d_model=32, d_head=32, n_layers=1, n_ctx=6, d_vocab=tasks.MAX_OF_LIST_VOCAB,
                        attn_only=True, **_TOY),
    "addition": dict(d_model=128, d_head=128, n_layers=1, n_ctx=2, d_vocab=tasks.ADDITION_MAX + 1,
                     d_mlp=128, act_fn="relu", init_mode="xavier_normal", **_TOY),
    "fibonacci": dict(d_model=128, d_head=128, n_layers=1, n_ctx=tasks.FIBONACCI_LENGTH,
                      d_vocab=tasks.ADDITION_MAX + 1, d_mlp=128, act_fn="relu", init_mode="xavier_normal", **_TOY),
    "induction": dict(d_model=64, d_head=32, n_heads=2, n_layers=2, n_ctx=tasks.INDUCTION_SEQ,
                      d_vocab=tasks.INDUCTION_VOCAB, attn_only=True, normalization_type=None),
}

# accuracy targets from COURSE.md
MAX_OF_LIST_TARGET = 0.999
BIGRAM_KL_TARGET = 0.01  # nats, averaged over the chain's stationary distribution
# "induction loss on the repeat far below chance": at most 1 % of the chance loss ln(64) = 4.16 nats
# (trained models reach about 0.0005 nats and 99.99 % accuracy)
INDUCTION_LOSS_TARGET = 0.01  # fraction of the chance loss
INDUCTION_ACCURACY_TARGET = 0.999
INDUCTION_EVAL_SEQUENCES = 4096


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match its config."""


def rebuild_command(name: str) -> str:
    return f"python -m utils.train {name}"


def build_model(name: str, seed: int = 0) -> TransformerBridge:
    """A freshly initialised model for task `name`, biases frozen at zero.

    The zero-layer bigram model also has its positional embedding frozen at zero, so
    that its logits are exactly W_E W_U for every position.
    """
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**CONFIGS[name], seed=seed))
    freeze_biases(model)
    if CONFIGS[name]["n_layers"] == 0:
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


def bigram_kl(model: TransformerBridge, transitions: Tensor) -> float:
    """KL(true chain || model) in nats per step, averaged over the stationary distribution."""
    with torch.no_grad():
        log_model = bigram_table(model)
    log_true = transitions.log()
    kl_rows = (transitions * (log_true - log_model)).sum(-1)
    return (tasks.stationary_distribution(transitions) @ kl_rows).item()


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


def evaluate(model: TransformerBridge, name: str) -> dict:
    """The accuracy report for task `name` (the figures COURSE.md sets targets for)."""
    if name == "max_of_list":
        by_length = max_of_list_accuracy_by_length(model)
        return {"accuracy_by_length": by_length, "min_accuracy": min(by_length.values())}
    if name == "addition":
        return {"accuracy": accuracy(model, *tasks.addition_pairs())}
    if name == "fibonacci":
        return {"accuracy": accuracy(model, *tasks.fibonacci_sequences())}
    if name == "bigram":
        return {"kl": bigram_kl(model, tasks.bigram_transition_matrix())}
    if name == "induction":
        return induction_report(model)
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(CONFIGS)}")


def meets_target(name: str, report: dict) -> bool:
    """Whether an `evaluate` report reaches the target COURSE.md sets for `name`."""
    if name == "max_of_list":
        return report["min_accuracy"] >= MAX_OF_LIST_TARGET
    if name == "bigram":
        return report["kl"] <= BIGRAM_KL_TARGET
    if name == "induction":
        return (report["induction_loss"] <= INDUCTION_LOSS_TARGET * report["chance_loss"]
                and report["accuracy"] >= INDUCTION_ACCURACY_TARGET)
    return report["accuracy"] == 1.0


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
# nn.Linear stores weights as [out, in]. These state-dict entries read from the residual
# stream (d_model is their last axis) or write to it (d_model is their first axis).
_READS = ("embed.weight", "pos_embed.weight", "unembed.weight", "attn.q.weight", "attn.k.weight",
          "attn.v.weight", "mlp.in.weight")
_WRITES = ("attn.o.weight", "mlp.out.weight")
_WRITE_BIASES = ("attn.o.bias", "mlp.out.bias")


def rotate_residual_stream(state: dict[str, Tensor], R: Tensor) -> dict[str, Tensor]:
    """The state dict of the same model with its residual stream expressed in the basis x -> x @ R.

    R: orthogonal [d_model, d_model]. Embeddings and every matrix that reads the stream
    become W @ R; matrices that write to it become R.T @ W; their biases b @ R. The
    rotated model computes exactly the same logits.
    """
    rotated = {}
    for key, w in state.items():
        if key.endswith(_READS):
            rotated[key] = w @ R
        elif key.endswith(_WRITES):
            rotated[key] = R.T @ w
        elif key.endswith(_WRITE_BIASES):
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


def model_from_state(config: dict, state: dict[str, Tensor]) -> TransformerBridge:
    """A model built from TransformerBridgeConfig keyword arguments and a state dict (eval mode)."""
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**config))
    model.load_state_dict(state)
    return model.eval()
