"""BERT WordPiece tokenization through the `tokenizers` library.

``Tokenizer.from_pretrained(path_or_alias)`` reads the checkpoint's tokenizer.json, or builds the
standard BERT pipeline (clean text, split CJK characters, lowercase and strip accents when the
vocabulary is uncased, split on whitespace and punctuation, WordPiece) from vocab.txt.
Calling the tokenizer returns padded tensors; ``word_ids`` maps each token back to its word, which
is how word-level labels (part of speech, entities) are put on the first sub-word of each word.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from .pretrained import resolve


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, model_max_length: int = 512):
        self.backend = backend
        self.model_max_length = model_max_length
        self.backend.no_padding()
        self.backend.no_truncation()
        vocab = backend.get_vocab()
        for tok in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"):
            if tok not in vocab:
                raise ValueError(f"vocabulary has no {tok} token; expected a BERT WordPiece vocabulary")
        self.pad_token_id = vocab["[PAD]"]
        self.cls_token_id, self.sep_token_id = vocab["[CLS]"], vocab["[SEP]"]
        self.mask_token_id = vocab.get("[MASK]")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        path = resolve(name_or_path)
        settings = {}
        if (path / "tokenizer_config.json").is_file():
            settings = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        max_len = int(settings.get("model_max_length", 512))
        if max_len > 100_000:  # "no limit" sentinel some configs carry
            max_len = 512
        if (path / "tokenizer.json").is_file():
            return cls(_HFTokenizer.from_file(str(path / "tokenizer.json")), max_len)
        if (path / "vocab.txt").is_file():
            return cls.from_vocab(path / "vocab.txt", lowercase=settings.get("do_lower_case", True),
                                  strip_accents=settings.get("strip_accents"), model_max_length=max_len)
        raise FileNotFoundError(f"{path}: expected tokenizer.json or vocab.txt")

    @classmethod
    def from_vocab(cls, vocab_file, lowercase: bool = True, strip_accents: bool | None = None,
                   model_max_length: int = 512) -> "Tokenizer":
        """The BERT pipeline from a vocab.txt: one token per line, its id is the line number."""
        vocab = {}
        with open(vocab_file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                vocab[line.rstrip("\n")] = i
        tok = _HFTokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        tok.decoder = decoders.WordPiece(prefix="##")
        # Special tokens are matched before normalisation, as in Hugging Face's tokenizer.json: a
        # "[MASK]" in the text stays one token instead of being lowercased into "[", "mask", "]".
        tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
        return cls(tok, model_max_length)

    # --- encoding ---------------------------------------------------------------------------
    def __call__(self, texts, pairs=None, max_length: int | None = None, is_split_into_words: bool = False,
                 return_offsets: bool = False) -> dict:
        """Encode a batch; pad to the longest sequence in it.

        texts: list of strings (or, with ``is_split_into_words``, list of word lists).
        pairs: optional second segments (token_type_ids 1). Sequences longer than ``max_length``
        (default: the model's limit) are truncated, the longer segment first.
        Returns input_ids, token_type_ids, attention_mask as (B, T) long tensors, plus
        ``num_truncated``, and with ``return_offsets`` ``offset_mapping`` (B, T, 2) and ``word_ids``.
        """
        if isinstance(texts, str) or (is_split_into_words and texts and isinstance(texts[0], str)):
            texts = [texts]
            pairs = [pairs] if pairs is not None else None
        texts = list(texts)
        if pairs is not None:
            pairs = list(pairs)
            if len(pairs) != len(texts):
                raise ValueError(f"pairs: expected {len(texts)} second segments, got {len(pairs)}")
        max_length = self.model_max_length if max_length is None else int(max_length)
        if max_length < (4 if pairs is not None else 3):
            raise ValueError(f"max_length: expected room for the special tokens, got {max_length}")
        self.backend.enable_truncation(max_length, strategy="longest_first")
        self.backend.enable_padding(pad_id=self.pad_token_id, pad_token="[PAD]")
        try:
            inputs = texts if pairs is None else list(zip(texts, pairs))
            enc = self.backend.encode_batch(inputs, is_pretokenized=is_split_into_words)
        finally:
            self.backend.no_truncation()
            self.backend.no_padding()
        out = {
            "input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in enc], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long),
            "num_truncated": sum(1 for e in enc if e.overflowing),
        }
        if return_offsets or is_split_into_words:
            out["offset_mapping"] = torch.tensor([e.offsets for e in enc], dtype=torch.long)
            out["word_ids"] = [e.word_ids for e in enc]
        return out

    def tokenize(self, text: str) -> list[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory) -> None:
        """Write tokenizer.json, vocab.txt and tokenizer_config.json beside a saved model."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        vocab = sorted(self.backend.get_vocab().items(), key=lambda kv: kv[1])
        (directory / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
        norm = json.loads(self.backend.to_str()).get("normalizer") or {}
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": bool(norm.get("lowercase", True)),
               "model_max_length": self.model_max_length, "unk_token": "[UNK]", "sep_token": "[SEP]",
               "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
