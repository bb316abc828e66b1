"""minift: a from-scratch, educational BERT encoder and fine-tuning library."""
from .config import BertConfig
from .model import (BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
                    BertForTokenClassification, BertModel)
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["BertConfig", "BertModel", "BertForSequenceClassification", "BertForTokenClassification",
           "BertForMaskedLM", "BertForQuestionAnswering", "Tokenizer", "__version__"]
