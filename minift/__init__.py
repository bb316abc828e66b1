"""minift: a from-scratch, educational BERT encoder and fine-tuning library.

``import minift`` loads the model, its config and the tokenizer; the other modules come on first
use, as ``torch.nn`` comes with ``torch``: ``minift.optim``, ``minift.ops``, ``minift.data``,
``minift.functional`` and the rest are attributes that import themselves when first touched, so
``import minift`` stays fast.
"""
import importlib

from .config import BertConfig
from .model import (BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
                    BertForTokenClassification, BertModel)
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["BertConfig", "BertModel", "BertForSequenceClassification", "BertForTokenClassification",
           "BertForMaskedLM", "BertForQuestionAnswering", "Tokenizer", "__version__"]

# Submodules reachable as attributes without an explicit import (PEP 562).
_LAZY = {"optim", "ops", "data", "functional", "metrics", "trainer", "peft", "pretrained", "selfcheck",
         "gradcheck", "backends", "tokenizer", "model", "config", "masking", "pretraining"}


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'minift' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY)
