"""BertConfig: the hyper-parameters of a BERT encoder, read from and written to Hugging Face's config.json."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .errors import UserError

IMPLS = ("torch", "reference", "fused")
IGNORE_INDEX = -100   # a label position that no loss scores and no metric counts (sub-words, padding)


@dataclass
class BertConfig:
    vocab_size: int = 30522              # WordPiece vocabulary size V
    hidden_size: int = 768               # H, the width of every token vector
    num_hidden_layers: int = 12          # number of BertLayer blocks
    num_attention_heads: int = 12        # nh; head dim D = H / nh
    intermediate_size: int = 3072        # width of the feed-forward layer (usually 4H)
    hidden_act: str = "gelu"             # exact erf GELU, as in the original BERT
    hidden_dropout_prob: float = 0.1     # dropout on embeddings and on each sub-layer output
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention probabilities
    max_position_embeddings: int = 512   # longest sequence the position table covers
    type_vocab_size: int = 2             # segment ids: 0 = sentence A, 1 = sentence B
    initializer_range: float = 0.02      # std of the normal init for fresh weights
    layer_norm_eps: float = 1e-12        # epsilon inside every LayerNorm
    pad_token_id: int = 0                # id of [PAD]
    num_labels: int = 2                  # C, classes of a classification head
    problem_type: str | None = None      # "single_label_classification" | "multi_label_classification" | "regression"
    classifier_dropout: float | None = None  # dropout before a classifier (None: hidden_dropout_prob)
    id2label: dict[int, str] | None = None   # class names, saved with a fine-tuned model
    # Not part of config.json: which implementation of the ops the model runs on.
    impl: str = field(default="torch", metadata={"serialize": False})
    # Not part of config.json: under impl="fused" on the CPU, run a padded batch on its real tokens
    # only (BertModel.forward); False computes every padded position too, as transformers does.
    pack_padding: bool = field(default=True, metadata={"serialize": False})

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})")
        if self.hidden_act not in ("gelu", "gelu_python"):
            raise ValueError(f"hidden_act: expected 'gelu' (exact erf GELU), got {self.hidden_act!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {self.impl!r}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def label2id(self) -> dict[str, int] | None:
        return None if self.id2label is None else {v: k for k, v in self.id2label.items()}

    # --- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        if d.get("model_type", "bert") not in ("bert",):
            raise ValueError(f"config.json: expected model_type 'bert', got {d.get('model_type')!r}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("config.json: only position_embedding_type 'absolute' is supported, got "
                             f"{d['position_embedding_type']!r}")
        names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("serialize", True)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "id2label" in d and "num_labels" not in d:
            kwargs["num_labels"] = len(d["id2label"])
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides) -> "BertConfig":
        """Read config.json; ``overrides`` (num_labels=3, impl="reference", ...) replace its values."""
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: expected a JSON object of config values, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown config option(s) {unknown}; expected some of {sorted(known)}")
        if "num_labels" in overrides and "id2label" not in overrides:
            d.pop("id2label", None)  # a new number of classes replaces the saved class names
        impl = overrides.pop("impl", "torch")
        try:
            config = cls.from_dict({**d, **overrides})
        except (ValueError, TypeError) as e:      # a bad value or key in the file: name the file
            raise UserError(f"{path}: {e}") from None
        config.impl = impl
        config.__post_init__()
        return config

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.metadata.get("serialize", True)}
        d.update(model_type="bert", position_embedding_type="absolute")
        if self.id2label is None:
            d.pop("id2label")
        else:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
            d["label2id"] = self.label2id
        for k in ("problem_type", "classifier_dropout"):
            if d[k] is None:
                d.pop(k)
        return d

    def save(self, directory: str | os.PathLike, architectures: list[str] | None = None) -> None:
        d = self.to_dict()
        if architectures:
            d["architectures"] = architectures
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, sort_keys=True)
            f.write("\n")


def _opt(default, help: str, **meta):
    """A TrainConfig field: its default and its help text, the one home of both (the CLI reads them)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Hyper-parameters of a fine-tuning run. ``minift finetune`` makes one flag of each field
    (``batch_size`` -> ``--batch-size``) with this default and this help text."""
    lr: float = _opt(1e-4, "peak learning rate eta (after warm-up)")
    epochs: float = _opt(1.5, "passes over the training data; a fraction trains part of the last one")
    batch_size: int = _opt(32, "global batch: all processes and accumulation steps together")
    grad_accum: int = _opt(1, "micro-batches per optimizer step (the batch is split, the step is the same)")
    max_length: int = _opt(128, "longer inputs are truncated (and counted); at most the model's "
                                "max_position_embeddings")
    warmup_ratio: float = _opt(0.1, "share of the steps with a linear warm-up, in [0, 1)")
    weight_decay: float = _opt(0.01, "decoupled weight decay, on weight matrices only")
    clip: float = _opt(1.0, "global gradient-norm clip (0: off)")
    seed: int = _opt(0, "seed of the data order and of every random number")
    patience: int = _opt(0, "early stopping: epochs without dev improvement (0: off)")
    precision: str = _opt("auto", "auto: bf16 autocast on a GPU that has it, a CPU with AMX-BF16, or one with "
                          "AVX512-BF16 where a timed bf16 matrix multiply is 1.3x fp32's; else fp32. "
                          "fp16 needs a GPU",
                          choices=("auto", "fp32", "bf16", "fp16"))
    eval_batch_size: int = _opt(128, "examples per batch when evaluating")
    max_train_examples: int = _opt(0, "use only the first N training examples (0: all)")
    log_every: int = _opt(10, "optimizer steps between lines of train_log.jsonl")
    class_weights: str = _opt("none", "single-label classes: none; balanced (w_c = n / (C n_c), as sklearn); or "
                                      "a FILE of 'class,weight' lines: the weight= of the cross-entropy")
    sampler: str = _opt("shuffle", "shuffle: each example once per epoch; balanced: n draws with replacement, "
                                   "every class equally likely (seeded per epoch)", choices=("shuffle", "balanced"))
    crf_lr: float = _opt(0.0, "with --crf: peak learning rate of the CRF's transition scores, which start at zero "
                              "(0: --lr)")
    progress: bool = _opt(True, "progress bars", resume=False)

    def check(self) -> None:
        """Every value in its range; a UserError names the flag, what it expects and what came."""
        import math
        rules = [  # (field, ok, expected)
            ("lr", lambda v: math.isfinite(v) and v > 0, "a positive number"),
            ("epochs", lambda v: math.isfinite(v) and v > 0, "a positive number"),
            ("batch_size", lambda v: v >= 1, "an integer >= 1"),
            ("grad_accum", lambda v: v >= 1, "an integer >= 1"),
            ("max_length", lambda v: v >= 2, "an integer >= 2 ([CLS] and [SEP] take two)"),
            ("warmup_ratio", lambda v: 0 <= v < 1, "a share in [0, 1)"),
            ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
            ("clip", lambda v: math.isfinite(v) and v >= 0, "a number >= 0 (0: off)"),
            ("patience", lambda v: v >= 0, "an integer >= 0 (0: off)"),
            ("eval_batch_size", lambda v: v >= 1, "an integer >= 1"),
            ("max_train_examples", lambda v: v >= 0, "an integer >= 0 (0: all)"),
            ("log_every", lambda v: v >= 1, "an integer >= 1"),
            ("crf_lr", lambda v: math.isfinite(v) and v >= 0, "a number >= 0 (0: --lr)"),
            ("precision", lambda v: v in ("auto", "fp32", "bf16", "fp16"), "auto, fp32, bf16 or fp16"),
            ("sampler", lambda v: v in ("shuffle", "balanced"), "shuffle or balanced"),
            ("class_weights", lambda v: v in ("none", "balanced") or os.path.isfile(v),
             "none, balanced or a file of 'class,weight' lines (no such file)"),
        ]
        for name, ok, expected in rules:
            value = getattr(self, name)
            if not ok(value):
                raise UserError(f"{flag(name)}: expected {expected}, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise UserError(f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}")

    def check_model(self, config: BertConfig) -> None:
        if self.max_length > config.max_position_embeddings:
            raise UserError(f"--max-length: the model reads at most {config.max_position_embeddings} tokens "
                            f"(max_position_embeddings in its config.json), got {self.max_length}")

    def differences(self, other: "TrainConfig") -> list[str]:
        """The fields that change a run (all but display ones) on which ``other`` differs, as flags."""
        return [f"{flag(f.name)} {getattr(other, f.name)} (the run has {getattr(self, f.name)})"
                for f in dataclasses.fields(self)
                if f.metadata.get("resume", True) and getattr(self, f.name) != getattr(other, f.name)]


def flag(name: str) -> str:
    """The command-line flag of a config field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------------------
# minift pretrain (minift.pretraining); here so that the command line reads them without torch
# ------------------------------------------------------------------------------------------

# Sizes of a model from scratch (``--config NAME``). "tiny" is BERT-Tiny of Turc et al. 2019 ("Well-Read
# Students Learn Better"): 2 layers, H = 128, 2 heads (head dim 64), FFN 512; 4.4 M parameters, 3.9 M
# of them the 30,522 x 128 word embeddings, which are also the decoder of the MLM head.
PRETRAIN_CONFIGS = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
}
# ``minift pretrain``'s own defaults for some training flags (the others are TrainConfig's): a model
# from scratch needs a larger learning rate and many more steps than a pre-trained one. Measured
# with --config tiny on the review snippets: lr 1e-3 brings the held-out perplexity from 30,544 to
# 560 in 10 epochs; with 3e-3 it is still at 1,198 after 3; MiniLM's new MLM head trains at 1e-4.
PRETRAIN_DEFAULTS = {"scratch": {"lr": 1e-3, "epochs": 10.0},     # --config
                     "continued": {"lr": 1e-4, "epochs": 1.0}}   # --model
