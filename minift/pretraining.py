r"""Masked-language-model pre-training: raw text in, a ``BertForMaskedLM`` checkpoint out.

    lines of text -> WordPiece ids, cut into pieces of at most max_length tokens, [CLS] ... [SEP]
    -> each epoch, BERT's masking rule drawn afresh (minift.masking, seeded by (seed, epoch))
    -> the Trainer's loop (minift.trainer): the masked-LM head's cross-entropy over the chosen tokens
    -> held-out loss and perplexity each epoch, on masks drawn once with a fixed seed

Shape legend: B pieces, T tokens, N masked positions, H hidden size, V vocabulary size.

**The objective.** Of the eligible tokens 15% are chosen; the model sees them as [MASK] (80%), a
random token (10%) or unchanged (10%), and is scored on recovering the original token:

.. math::

    \mathcal{L} = -\frac{1}{N} \sum_{n=1}^{N} \log p_\theta(x_{i_n} \mid \tilde{x}),
    \qquad \mathrm{perplexity} = e^{\mathcal{L}}

where :math:`i_1 \dots i_N` are the chosen positions and :math:`\tilde{x}` the corrupted input.
Only the N chosen hidden states reach the vocabulary projection (``BertForMaskedLM`` gathers them
first): with V = 30,522 that is the largest matrix of the whole step, and the loss over it is the
one place where the fused softmax-cross-entropy's large-C path matters (``impl="fused"``).
Perplexity is the effective number of tokens the model hesitates between: a model that knows
nothing gives about V, one that has learned the word frequencies a few hundred.

**Held-out numbers that compare.** Training masks change every epoch (dynamic masking); the
held-out masks are drawn once, from the seed ``EVAL_MASK_SEED`` and the per-token rule, whatever
the run's ``--seed`` or ``--whole-word-mask``: every epoch, and every run on the same text with
the same tokenizer, is scored on the same masked tokens.

**Long lines** (a document per line) are not truncated but cut into consecutive pieces of
``max_length - 2`` tokens, each wrapped in [CLS] ... [SEP], so no text is thrown away.

**What carries over.** A checkpoint with a pooler (MiniLM) keeps it unchanged in the output: MLM
never uses the pooler, and a classifier fine-tuned from the output then starts from the same
pooler as one fine-tuned from the original checkpoint. A model from scratch has no pooler (as
Hugging Face's BertForMaskedLM); a classifier loaded from it starts with a fresh one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from . import data as D
from . import masking
from .config import IGNORE_INDEX, PRETRAIN_CONFIGS, PRETRAIN_DEFAULTS, BertConfig
from .errors import UserError
from .model import BertForMaskedLM
from .pretrained import POOLER_KEYS, _match_prefix, read_state_dict, resolve, save_pretrained
from .trainer import Trainer

__all__ = ["Corpus", "corpus_from_task", "corpus_from_files", "read_lines", "TextIds", "encode_text",
           "mask_split", "mlm_metrics", "PretrainTrainer", "CONFIGS", "scratch_config", "load_for_pretraining",
           "new_mlm_head", "fill_mask", "EVAL_MASK_SEED", "TRAIN_DEFAULTS"]

EVAL_MASK_SEED = 20190524   # the held-out masks' seed (BERT's paper, v2): the same for every run
CHUNK = 1024                # pieces masked together: masks depend on the piece's index, not on batches
# The sizes of ``--config NAME`` and the command's training defaults (from scratch / continued) live
# in minift.config (the command line reads them without importing torch).
CONFIGS, TRAIN_DEFAULTS = PRETRAIN_CONFIGS, PRETRAIN_DEFAULTS



# ------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Lines of raw text: train, held out (dev: the loss and perplexity each epoch), test (may be empty)."""
    name: str
    train: list[str]
    dev: list[str]
    test: list[str]

    def sizes(self) -> str:
        return f"{len(self.train)} train / {len(self.dev)} held-out (dev) / {len(self.test)} test lines"


def corpus_from_task(name: str) -> Corpus:
    """The text of a bundled task's splits, labels unused (``sentiment``: the review snippets)."""
    from . import tasks
    ds = tasks.load_task(name)

    def texts(examples):
        return [ex.text if isinstance(ex.text, str) else " ".join(ex.text) for ex in examples]
    return Corpus(ds.name, texts(ds.train), texts(ds.dev), texts(ds.test))


def read_lines(path, encoding: str = "utf-8") -> list[str]:
    """The non-blank lines (spaces collapsed) of a text file, or of every .txt file in a folder and
    its sub-folders (in sorted order). One line is one example: a sentence or a whole document."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"{path}: the folder has no .txt files; expected text files, one document or "
                            f"sentence per line")
    elif path.exists():
        files = [path]
    else:
        raise UserError(f"{path}: no such file or folder")
    lines = []
    for f in files:
        lines += [" ".join(line.split()) for line in D.read_text(f, encoding).split("\n") if line.strip()]
    if not lines:
        raise UserError(f"{path}: no text (every line is blank)")
    return lines


def corpus_from_files(paths, dev=None, encoding: str = "utf-8") -> Corpus:
    """The lines of ``paths`` (files or folders); held out: the ``dev`` file's lines, or else the
    lines whose SHA-1 says "dev" (about 10%, as ``minift finetune`` holds out its dev part)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    train = [line for p in paths for line in read_lines(p, encoding)]
    if dev is not None:
        held = read_lines(dev, encoding)
    else:
        held = [t for t in train if D.split_of(t) == "dev"]
        if not held:
            raise UserError(f"{', '.join(map(str, paths))}: too few lines to hold out a part for the held-out "
                            f"loss (none hashed to dev); give a held-out file with --dev")
        train = [t for t in train if D.split_of(t) != "dev"]
    name = Path(paths[0]).stem if len(paths) == 1 else "text"
    return Corpus(name, train, held, [])


@dataclass
class TextIds:
    """WordPiece ids of one split, piece by piece: [CLS] ... [SEP], and each token's word index
    within its piece (-1 at [CLS] and [SEP]) for whole-word masking."""
    input_ids: list[list[int]]
    word_ids: list[list[int]]
    num_split: int = 0           # lines longer than max_length, cut into several pieces


def encode_text(tokenizer, texts: list[str], max_length: int) -> TextIds:
    """Token ids of every line; a line longer than ``max_length`` tokens becomes several pieces."""
    room = max_length - 2                                   # [CLS] and [SEP] take two
    if room < 1:
        raise UserError(f"--max-length: expected at least 3 for pre-training, got {max_length}")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids, words, n_split = [], [], 0
    for start in range(0, len(texts), 1024):
        for enc in tokenizer.backend.encode_batch(texts[start:start + 1024], add_special_tokens=False):
            tokens, wids = enc.ids, [-1 if w is None else w for w in enc.word_ids]
            n_split += len(tokens) > room
            for a in range(0, len(tokens), room):          # a line of only dropped characters: no piece
                piece, w = tokens[a:a + room], wids[a:a + room]
                w0 = min((x for x in w if x >= 0), default=0)
                ids.append([cls] + piece + [sep])
                words.append([-1] + [x - w0 if x >= 0 else -1 for x in w] + [-1])
    return TextIds(ids, words, n_split)


def mask_split(text: TextIds, tokenizer, vocab_size: int, generator: torch.Generator, prob: float = 0.15,
               whole_word: bool = False) -> D.Encoded:
    """BERT's masking rule over every piece of a split, in the pieces' order (CHUNK at a time, each
    padded to its longest), so that a piece's mask depends only on the generator and its index:
    not on the batches, their order, gradient accumulation or the number of processes.

    Returns the corrupted ids and the labels (the original id at the N chosen tokens, IGNORE_INDEX
    elsewhere) as an ``Encoded`` of problem ``MASKED_LM``, which ``data.collate`` pads."""
    corrupted, labels = [], []
    n = len(text.input_ids)
    for start in range(0, n, CHUNK):
        rows = range(start, min(n, start + CHUNK))
        T = max(len(text.input_ids[i]) for i in rows)
        ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)   # (B, T)
        words = torch.full((len(rows), T), -1, dtype=torch.long)                     # (B, T), -1 = no word
        for r, i in enumerate(rows):
            ids[r, :len(text.input_ids[i])] = torch.tensor(text.input_ids[i])
            words[r, :len(text.word_ids[i])] = torch.tensor(text.word_ids[i])
        special = masking.special_tokens_mask(ids, tokenizer)                        # [CLS] [SEP] [PAD]
        c, lab = masking.mask_tokens(ids, special, mask_token_id=tokenizer.mask_token_id, vocab_size=vocab_size,
                                     prob=prob, generator=generator, word_ids=words if whole_word else None)
        for r, i in enumerate(rows):
            L = len(text.input_ids[i])
            corrupted.append(c[r, :L].tolist())
            labels.append(lab[r, :L].tolist())
    return D.Encoded(corrupted, [[0] * len(x) for x in corrupted], labels, 0, D.MASKED_LM)


@torch.no_grad()
def mlm_metrics(model, encoded: D.Encoded, pad_id: int, batch_size: int, device) -> dict:
    """Held-out masked-LM numbers over every masked token of ``encoded``: perplexity e^loss, the mean
    loss, and the accuracy of the top-1 prediction (dropout off; batches of similar lengths)."""
    model.eval()
    order = sorted(range(len(encoded.input_ids)), key=lambda i: len(encoded.input_ids[i]))
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        batch = {k: t.to(device) for k, t in D.collate(encoded, order[start:start + batch_size], pad_id).items()}
        chosen = batch["labels"] != IGNORE_INDEX                                     # (B, T)
        if not chosen.any():
            continue
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                    labels=batch["labels"], reduction="sum")                         # logits (N, V)
        total += out.loss.float().item()
        correct += int((out.logits.argmax(-1) == batch["labels"][chosen]).sum())
        count += int(chosen.sum())
    if count == 0:
        raise UserError("the held-out text has no masked token (too little text); give more held-out lines")
    loss = total / count
    return {"perplexity": math.exp(loss), "mlm_loss": loss, "mlm_accuracy": correct / count}


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------


class PretrainTrainer(Trainer):
    """``Trainer`` (minift.trainer) on masked text: the same loop, checkpoints, resume, log and plot.

    What differs: the training split is re-masked at the start of every epoch (from
    ``epoch_generator(seed, epoch)``, so a resumed run draws the masks the interrupted one would
    have); evaluation is the held-out masked-LM loss and perplexity (``mlm_metrics``), the best
    epoch the lowest loss; before the first step the held-out numbers are recorded as epoch 0 (the "before" of the plot);
    ``best/`` is a Hugging Face BertForMaskedLM checkpoint with the tokenizer, plus ``keep_tensors``
    (a loaded pooler) unchanged. ``config`` is a ``minift.config.TrainConfig``.
    """

    def __init__(self, model: BertForMaskedLM, tokenizer, corpus: Corpus, config, out,
                 mlm_probability: float = 0.15, whole_word_mask: bool = False,
                 keep_tensors: dict[str, torch.Tensor] | None = None, device="cpu", log=None,
                 overwrite: bool = False):
        config.check()
        if tokenizer.mask_token_id is None:
            raise UserError("the vocabulary has no [MASK] token; masked-LM training needs a BERT vocabulary")
        if not 0.0 < mlm_probability < 1.0:
            raise UserError(f"--mlm-probability: expected a share in (0, 1), got {mlm_probability}")
        self.mlm_probability, self.whole_word_mask = mlm_probability, whole_word_mask
        self.keep_tensors = dict(keep_tensors or {})
        self.vocab_size = model.config.vocab_size
        train = corpus.train[:config.max_train_examples] if config.max_train_examples else corpus.train
        self.text = {name: encode_text(tokenizer, lines, config.max_length)
                     for name, lines in (("train", train), ("dev", corpus.dev), ("test", corpus.test)) if lines}
        for name in ("train", "dev"):
            if not self.text.get(name) or not self.text[name].input_ids:
                raise UserError(f"{corpus.name}: no {'training' if name == 'train' else 'held-out'} text")
        self.num_split = {name: t.num_split for name, t in self.text.items()}
        self._tokenizer, self.cfg = tokenizer, config      # (the Trainer sets them again)
        held_out = {name: self._mask(name, masking.epoch_generator(EVAL_MASK_SEED, 0), whole_word=False)
                    for name in ("dev", "test") if name in self.text}
        dataset = D.Dataset(corpus.name, D.MASKED_LM, [], [], [], labels=[])
        super().__init__(model, tokenizer, dataset, config, out, device=device, log=log, overwrite=overwrite,
                         encoded={"train": self.masked_train(0), "dev": held_out["dev"],
                                  "test": held_out.get("test")})

    # --- masking ------------------------------------------------------------------------------
    def _mask(self, split: str, generator, whole_word: bool) -> D.Encoded:
        return mask_split(self.text[split], self._tokenizer, self.vocab_size, generator, self.mlm_probability,
                          whole_word)

    def masked_train(self, epoch: int) -> D.Encoded:
        """The training pieces with epoch ``epoch``'s masks (dynamic masking)."""
        return self._mask("train", masking.epoch_generator(self.cfg.seed, epoch), self.whole_word_mask)

    def masking_settings(self) -> dict:
        return {"mlm_probability": self.mlm_probability, "whole_word_mask": self.whole_word_mask,
                "eval_mask_seed": EVAL_MASK_SEED}

    # --- the loop's hooks ---------------------------------------------------------------------
    def _train_epoch(self, e: int):
        if not self.history.epochs:                     # a fresh run: the held-out numbers before any step
            self._record_start()
        self.train_set = self.masked_train(e)
        return super()._train_epoch(e)

    def _record_start(self):
        dev = self.evaluate(self.dev_set)
        rec = {"epoch": 0, "epochs_trained": 0.0, **{f"dev_{k}": v for k, v in dev.items()}}
        self.history.epochs.append(rec)
        self.log("before training: " + "  ".join(f"dev {k} {v:.4f}" for k, v in dev.items()))
        if self._log_file:
            self._log_file.write(json.dumps(rec) + "\n")
            self._log_file.flush()

    def evaluate(self, encoded: D.Encoded) -> dict:
        """The held-out masked-LM loss and accuracy, in fp32 whatever the training precision (as
        Trainer.predict)."""
        return mlm_metrics(self.model, encoded, self.tokenizer.pad_token_id, self.cfg.eval_batch_size,
                           self.device)

    def score(self, results: dict) -> float:
        return -results["mlm_loss"]

    # --- checkpoints --------------------------------------------------------------------------
    def save_best(self):
        def write(tmp):
            save_pretrained(self.model, tmp, extra_tensors=self.keep_tensors)
            self.tokenizer.save_pretrained(tmp)
        checkpoint.atomic_dir_write(self.out / "best", write)

    def load_best(self):
        state = _match_prefix(self.model, read_state_dict(self.out / "best"))
        self.model.load_state_dict({k: v for k, v in state.items() if k not in self.keep_tensors}, strict=True)

    def run_info(self) -> dict:
        return {**super().run_info(), "masking": self.masking_settings()}

    def resume(self, path=None):
        """As ``Trainer.resume``; the masking settings must be the run's too."""
        info = checkpoint.read_run_info(Path(path) if path else self.out / "last")
        saved = info.get("masking")
        if saved is not None and saved != self.masking_settings():
            changed = [f"{k} {self.masking_settings()[k]} (the run has {v})" for k, v in saved.items()
                       if self.masking_settings().get(k) != v]
            raise UserError(f"--resume continues the run with the settings it was started with; these differ: "
                            f"{'; '.join(changed)}")
        super().resume(path)


# ------------------------------------------------------------------------------------------
# Models: from scratch, or continued from a checkpoint
# ------------------------------------------------------------------------------------------


def scratch_config(name_or_path, vocab_size: int = 30522, **sizes) -> BertConfig:
    """The config of a new model: a name in ``CONFIGS`` or a config.json (a file, or a folder with
    one), with ``sizes`` (num_hidden_layers, hidden_size, num_attention_heads, intermediate_size)
    replacing its values. The vocabulary is the tokenizer's: a config.json with another vocab_size
    is refused."""
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if str(name_or_path) in CONFIGS:
        values = {**CONFIGS[str(name_or_path)], **sizes, "vocab_size": vocab_size}
        try:
            return BertConfig(**values)
        except ValueError as e:
            raise UserError(f"--config {name_or_path}: {e}") from None
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--config: expected one of {sorted(CONFIGS)} or a config.json (file or folder), "
                        f"got {str(name_or_path)!r}")
    try:
        config = BertConfig.from_json_file(path, **sizes)
    except ValueError as e:
        raise UserError(str(e)) from None
    if config.vocab_size != vocab_size:
        raise UserError(f"{path}: vocab_size {config.vocab_size}, but the model learns the bundled MiniLM "
                        f"vocabulary of {vocab_size} WordPiece tokens; set vocab_size to {vocab_size} or leave it out")
    return config


def load_for_pretraining(name_or_path, impl: str = "torch") -> tuple[BertForMaskedLM, dict[str, torch.Tensor]]:
    """A ``BertForMaskedLM`` from a checkpoint (a missing MLM head is initialised and listed in
    ``model.load_report.missing_initialised``), and the checkpoint's pooler weights, which the
    output keeps unchanged."""
    model = BertForMaskedLM.from_pretrained(name_or_path, impl=impl)
    own = model.state_dict()
    state = _match_prefix(model, read_state_dict(resolve(name_or_path)))
    keep = {k: v for k, v in state.items() if k.endswith(POOLER_KEYS) and k not in own}
    return model, keep


def new_mlm_head(model: BertForMaskedLM) -> list[str]:
    """The MLM head weights that the loaded checkpoint did not have (initialised at random)."""
    report = getattr(model, "load_report", None)
    return [k for k in report.missing_initialised if k.startswith("cls.")] if report else []


# ------------------------------------------------------------------------------------------
# Fill in the blank
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def fill_mask(model: BertForMaskedLM, tokenizer, texts: list[str], top_k: int = 5,
              device="cpu") -> list[list[list[tuple[str, float]]]]:
    """For each text, for each [MASK] in it (left to right), the ``top_k`` most probable tokens and
    their probabilities p(token | text), highest first."""
    if tokenizer.mask_token_id is None:
        raise UserError("the tokenizer has no [MASK] token")
    if not 1 <= top_k <= model.config.vocab_size:
        raise UserError(f"--top-k: expected 1..{model.config.vocab_size}, got {top_k}")
    limit = model.config.max_position_embeddings
    enc = tokenizer(texts, max_length=limit)
    is_mask = enc["input_ids"] == tokenizer.mask_token_id                               # (B, T)
    for i, text in enumerate(texts):
        if not is_mask[i].any():
            where = (f"its [MASK] lies beyond the model's {limit} tokens" if "[MASK]" in text
                     else 'write [MASK] where a word is to be guessed, e.g. "the film was [MASK]."')
            raise UserError(f"text {i + 1} has no [MASK] to fill: {where}")
    model.eval().to(device)
    batch = {k: enc[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")}
    h = model.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
    word_embeddings = model.bert.embeddings.word_embeddings.weight                      # (V, H), the decoder
    logits = model.cls.predictions(h[is_mask.to(device)], word_embeddings).float()      # (N, V)
    p, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)                              # (N, k) each
    p, ids = p.cpu().tolist(), ids.cpu().tolist()
    out, n = [], 0
    for i in range(len(texts)):
        row = []
        for _ in range(int(is_mask[i].sum())):
            row.append([(tokenizer.backend.id_to_token(t), q) for t, q in zip(ids[n], p[n])])
            n += 1
        out.append(row)
    return out
