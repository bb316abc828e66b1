"""BertConfig: the hyper-parameters of a BERT encoder, read from and written to Hugging Face's config.json."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

IMPLS = ("torch", "reference", "fused")


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
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown config option(s) {unknown}; expected some of {sorted(known)}")
        if "num_labels" in overrides and "id2label" not in overrides:
            d.pop("id2label", None)  # a new number of classes replaces the saved class names
        impl = overrides.pop("impl", "torch")
        config = cls.from_dict({**d, **overrides})
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
