"""The fine-tuning loop: what the textbooks teach, as one short loop.

    pick a pretrained model -> add a task layer -> set the optimizer and regularisation
    -> train, evaluating on dev each epoch, keep the best -> test -> save for deployment

``Trainer(model, tokenizer, dataset, TrainConfig(...), out).fit()`` does all of it:

    fit():  for each epoch:  _train_epoch (train_step per batch)  ->  _end_epoch (dev, checkpoints)
            then finish (test the best checkpoint, metrics.json, the plot)

Details that make runs reproducible and safe:

- Data order: epoch e shuffles with a generator seeded by (seed, e), then groups examples of
  similar length into batches (dynamic padding wastes little). It depends on nothing else, so a
  resumed run sees exactly the batches an uninterrupted one would. ``sampler="balanced"`` draws
  the epoch's n examples with replacement instead, example i with probability proportional to
  1 / (count of its class), so that each class is drawn n / C times on average; the same seeded
  generator makes the draw, so resuming is exact there too.
- Class weights (``class_weights``): class c's loss terms count w_c times; the global batch's loss
  is sum_i w_{y_i} l_i / sum_i w_{y_i}, F.cross_entropy(weight=w)'s mean over the whole batch.
- The loss is the model head's own (``problem_type``: single-label cross-entropy, multi-label
  binary cross-entropy, regression MSE; token tasks: cross-entropy over the scored tokens), asked
  for as a sum. Each micro-batch contributes sum(loss) / (examples or scored tokens in the whole
  global batch), so gradient accumulation and data-parallel ranks add up to exactly the gradient
  of one big batch.
- The run folder (minift/checkpoint.py): locked while the run writes; ``last/`` after every epoch
  (model, optimizer, schedule, RNG states, history) and ``best/`` when the dev score improves, each
  swapped in atomically; an earlier run in the folder is never silently replaced.
- A non-finite loss stops training with an error; the checkpoints written so far stay.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from . import data as D
from . import metrics as M
from . import optim
from .config import IGNORE_INDEX, TrainConfig
from .errors import UserError
from .ops import extension_available

__all__ = ["TrainConfig", "Trainer", "NonFiniteLoss", "encode_dataset", "predict_labels", "resolve_checkpoint"]

resolve_checkpoint = checkpoint.resolve_checkpoint


class NonFiniteLoss(RuntimeError):
    pass


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def length_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, weights=None) -> list[list[int]]:
    """Shuffle, sort by length inside windows of 50 batches, cut into batches, shuffle the batches.

    ``weights`` (one per example): instead of a permutation, draw len(lengths) examples with
    replacement, example i with probability weights[i] / sum(weights) (the balanced sampler)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weights is None:
        order = torch.randperm(len(lengths), generator=g).tolist()
    else:
        order = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), len(lengths), replacement=True,
                                  generator=g).tolist()
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def balanced_class_weights(labels: list[int], num_classes: int) -> list[float]:
    """w_c = n / (C n_c), sklearn's compute_class_weight("balanced"): every class weighs n / C in all."""
    counts = [0] * num_classes
    for y in labels:
        counts[y] += 1
    return [len(labels) / (num_classes * c) if c else 0.0 for c in counts]


def read_class_weights(path, classes: list[str]) -> list[float]:
    """A weights FILE: one 'class,weight' line per class (a 'class,weight' header, blank lines and
    '#' comments are skipped); every class of the training data once, each weight > 0."""
    weights: dict[str, float] = {}
    for n, line in enumerate(D.read_text(path).split("\n"), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [x.strip() for x in line.split(",")]
        if len(parts) != 2:
            raise UserError(f"{path}, line {n}: expected 'class,weight', got {line!r}")
        name, value = parts
        if n == 1 and (name, value) == ("class", "weight"):
            continue
        if name not in classes:
            raise UserError(f"{path}, line {n}: {name!r} is not a class of the training data "
                            f"(classes: {', '.join(classes)})")
        if name in weights:
            raise UserError(f"{path}, line {n}: a second weight for class {name!r}")
        try:
            w = float(value)
        except ValueError:
            w = math.nan
        if not (math.isfinite(w) and w > 0):
            raise UserError(f"{path}, line {n}: the weight of {name!r} must be a number > 0, got {value!r}")
        weights[name] = w
    missing = [c for c in classes if c not in weights]
    if missing:
        raise UserError(f"{path}: no weight for class(es) {', '.join(missing)}; give one 'class,weight' line "
                        f"for each of {', '.join(classes)}")
    return [weights[c] for c in classes]


def encode_dataset(tokenizer, dataset: D.Dataset, cfg: TrainConfig) -> dict[str, D.Encoded | None]:
    """Token ids of the train (the first ``max_train_examples``), dev and test splits; test None if empty."""
    train = dataset.train[:cfg.max_train_examples] if cfg.max_train_examples else dataset.train
    return {"train": D.encode(tokenizer, train, dataset, cfg.max_length),
            "dev": D.encode(tokenizer, dataset.dev, dataset, cfg.max_length),
            "test": D.encode(tokenizer, dataset.test, dataset, cfg.max_length) if dataset.test else None}


def cpu_bf16_speed() -> str:
    """How this CPU runs bfloat16 matrix multiplies: "amx" (AMX-BF16 tiles: about twice fp32's
    speed), "avx512" (AVX512-BF16 dot products: the gain depends on the CPU, see
    cpu_bf16_timing), or "emulated" (converted to fp32 and back: several times slower than fp32)."""
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512"
    return "emulated"


# bf16 is chosen on an AVX512-BF16 CPU when its matrix multiply is at least this much faster than
# fp32's: the rest of the step (casts, the elementwise kernels) gains less than the products do.
BF16_MIN_SPEEDUP = 1.3


@functools.lru_cache(maxsize=None)
def cpu_bf16_timing(n: int = 512, k: int = 384, m: int = 1536, rounds: int = 5) -> tuple[float, float]:
    """Milliseconds of one (n x k) @ (k x m) product (a BERT feed-forward layer's shape at 512
    tokens) on one thread, in fp32 and under bf16 autocast (the casts included, as in training):
    the fastest of ``rounds`` rounds taking turns, after a warm-up. Well under a second, once per
    process.

    A bf16 dot product instruction (vdpbf16ps) does twice the multiply-adds of an fp32 FMA; what
    that gives depends on the CPU (on one AMD EPYC: the product 3.3-3.8x faster, a fine-tuning step
    2.1-2.3x), so ``--precision auto`` times it rather than guess. One thread and the fastest round,
    because other work on the machine only ever adds time: timed on two threads while another job
    held both cores, bf16 came out slower than fp32 on that same CPU.

    The fp32 product is the one impl="fused" trains with: ``ops.linear``, minift's own matrix
    multiply where ``ops.gemm_backend`` chose it (on that AMD EPYC twice torch.mm's speed), so
    bf16 is weighed against the fp32 a run would otherwise get."""
    from . import ops
    ops.gemm_backend()                        # its own timing, on the threads the run will have
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)

        def once(bf16: bool) -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                t = time.perf_counter()
                ops.linear(x, w)
                return 1e3 * (time.perf_counter() - t)

        for bf16 in (False, True, False, True):
            once(bf16)
        f32, b16 = [], []
        for _ in range(rounds):
            f32.append(once(False))
            b16.append(once(True))
        return min(f32), min(b16)
    finally:
        torch.set_num_threads(threads)


def _cpu_auto() -> tuple[torch.dtype | None, str]:
    """--precision auto on this process's CPU (see choose_precision)."""
    speed = cpu_bf16_speed()
    if speed == "amx":
        return torch.bfloat16, "bf16 autocast (auto: this CPU has AMX-BF16)"
    if speed == "avx512":
        f32, b16 = cpu_bf16_timing()
        timed = (f"a bf16 matrix multiply of a BERT layer's shape took {b16:.2f} ms against fp32's "
                 f"{f32:.2f} ms on one thread, {f32 / b16:.3f}x")
        if f32 >= BF16_MIN_SPEEDUP * b16:
            return torch.bfloat16, f"bf16 autocast (auto: this CPU has AVX512-BF16, and {timed})"
        return None, (f"fp32 (auto: this CPU has AVX512-BF16 but no AMX-BF16, and {timed}, less than "
                      f"{BF16_MIN_SPEEDUP}x; --precision bf16 forces it)")
    return None, ("fp32 (auto: this CPU has neither AMX-BF16 nor AVX512-BF16, so bf16 would be slower; "
                  "--precision bf16 forces it)")


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    """"bfloat16" for torch.bfloat16, None for None (plain fp32): a dtype as stored and sent."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype_of(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _from_rank_0(choice: tuple[torch.dtype | None, str]) -> tuple[torch.dtype | None, str]:
    """In a multi-process run, rank 0's choice for every process (all must call this, whatever
    their CPU): processes of one run must not train in different precisions."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return choice
    shared = [_dtype_name(choice[0]), choice[1]]
    dist.broadcast_object_list(shared, src=0)
    return _dtype_of(shared[0]), shared[1]


def choose_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for ``--precision`` on ``device`` (None: plain fp32) and why, in words.

    auto: bf16 on a GPU that has it; on the CPU, bf16 where it has AMX-BF16, or AVX512-BF16 with a
    bf16 matrix multiply at least BF16_MIN_SPEEDUP times fp32's (timed once, cpu_bf16_timing;
    in a multi-process run rank 0's choice for all), else fp32. bf16 may be asked for on any CPU
    (the reason then warns where it is slow); fp16 needs a GPU (it needs loss scaling, which minift
    does with CUDA's GradScaler)."""
    device = torch.device(device)
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp32":
        return None, "fp32 (asked for)"
    if device.type == "cuda":
        if precision == "auto":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "bf16 autocast (auto: the GPU has bf16)"
            return None, "fp32 (auto: this GPU has no bf16)"
        return (torch.bfloat16 if precision == "bf16" else torch.float16), f"{precision} autocast (asked for)"
    if precision == "fp16":
        raise UserError("--precision fp16: fp16 needs a GPU (minift scales its loss with CUDA's GradScaler); "
                        "on the CPU use bf16 or fp32")
    if precision == "auto":
        return _from_rank_0(_cpu_auto() if is_main() else (None, ""))
    speed = cpu_bf16_speed()
    if speed == "emulated":
        return torch.bfloat16, ("bf16 autocast (asked for; warning: this CPU has neither AMX-BF16 nor "
                                "AVX512-BF16, so bf16 runs several times slower than fp32 here)")
    return torch.bfloat16, f"bf16 autocast (asked for; this CPU has {'AMX-BF16' if speed == 'amx' else 'AVX512-BF16'})"


def autocast_dtype(precision: str, device: torch.device):
    """The autocast dtype of ``precision`` on ``device`` (None: plain fp32); see choose_precision."""
    return choose_precision(precision, device)[0]


@dataclass
class History:
    steps: list[dict] = field(default_factory=list)    # {"step", "epoch", "loss", "lr"}
    epochs: list[dict] = field(default_factory=list)   # {"epoch", "train_loss", "dev_*", "seconds"}


class Trainer:
    def __init__(self, model, tokenizer, dataset: D.Dataset, config: TrainConfig, out: str | Path,
                 device: str | torch.device = "cpu", log=None, overwrite: bool = False,
                 encoded: dict[str, D.Encoded | None] | None = None):
        """``encoded``: the splits from ``encode_dataset`` (encoded here when not given).
        ``overwrite``: replace an earlier run in ``out`` (else fit refuses it). ``log``: a function
        that takes one line (default: the "minift" logger)."""
        config.check()
        self.model, self.tokenizer, self.dataset, self.cfg = model, tokenizer, dataset, config
        self.out, self.overwrite = Path(out), overwrite
        self.device = torch.device(device)
        self.log = (log or logging.getLogger("minift").info) if is_main() else (lambda *a, **k: None)
        splits = encoded or encode_dataset(tokenizer, dataset, config)
        self.train_set, self.dev_set, self.test_set = splits["train"], splits["dev"], splits["test"]
        self.truncated = {k: v.num_truncated for k, v in splits.items() if v is not None}
        if any(self.truncated.values()):
            self.log(f"warning: inputs longer than max_length={config.max_length} were truncated: {self.truncated}")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if config.batch_size % (self.world * config.grad_accum):
            raise UserError(f"--batch-size {config.batch_size} must be a multiple of the number of processes "
                            f"{self.world} x --grad-accum {config.grad_accum}")
        self.model.to(self.device)
        self.ddp = None
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # impl="fused": the compiled one-pass AdamW update too (the same arithmetic), where it has a kernel
        fused = self.model.config.impl == "fused" and extension_available()
        self.optimizer = optim.AdamW(self._param_groups(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)
        self.lengths = [len(x) for x in self.train_set.input_ids]
        self.class_weights = self._class_weights()        # w_c per class, or None
        self.class_weight = (None if self.class_weights is None else      # (C,) the loss's weight=
                             torch.tensor(self.class_weights, dtype=torch.float32, device=self.device))
        self.sample_weights = self._sample_weights()      # per training example, or None (shuffle)
        self.steps_per_epoch = math.ceil(len(self.lengths) / config.batch_size)
        self.total_steps = max(1, round(self.steps_per_epoch * config.epochs))
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)      # the last may be partial
        self.schedule = optim.LRSchedule(self.optimizer, optim.linear_warmup_decay(
            int(config.warmup_ratio * self.total_steps), self.total_steps))
        self.epoch = 0                      # epochs completed
        self.best_metric = -math.inf        # the best dev score so far (higher is better)
        self.best_dev = None                # dev results of the best epoch
        self.bad_epochs = 0
        self.history = History()
        self.resumed = False
        self.settings: dict = {}            # the caller's settings outside TrainConfig (stored in run.json)
        self.autocast_dtype, self.precision_note = choose_precision(config.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self._log_file = None
        self.thresholds: list[float] | None = None   # multi-label: per-class thresholds (None: 0.5)

    def _single_label(self, flag: str, value: str):
        if self.train_set.problem != D.SINGLE_LABEL:
            kind = "token tagging" if self.train_set.problem == "token" else self.train_set.problem.replace("_", " ")
            raise UserError(f"{flag} {value}: needs single-label classification; this task is {kind}")

    def _class_weights(self) -> list[float] | None:
        """The cross-entropy's class weights from --class-weights; None for "none"."""
        cw = self.cfg.class_weights
        if cw == "none":
            return None
        self._single_label("--class-weights", cw)
        classes = self.dataset.labels
        if cw == "balanced":
            w = balanced_class_weights(self.train_set.labels, len(classes))
            empty = [c for c, x in zip(classes, w) if x == 0]
            if empty:
                raise UserError(f"--class-weights balanced: class(es) {', '.join(empty)} have no training example")
        else:
            w = read_class_weights(cw, classes)
        self.log("class weights: " + ", ".join(f"{c} {x:.4f}" for c, x in zip(classes, w)))
        return w

    def _sample_weights(self):
        """--sampler balanced: example i drawn with probability proportional to 1 / n_{y_i}."""
        if self.cfg.sampler == "shuffle":
            return None
        self._single_label("--sampler", self.cfg.sampler)
        counts = {}
        for y in self.train_set.labels:
            counts[y] = counts.get(y, 0) + 1
        return [1.0 / counts[y] for y in self.train_set.labels]

    def _loss_terms(self, indices: list[int]) -> float:
        """The denominator of the global batch's mean loss: its examples, its scored tokens, its
        sentences (a CRF scores a sentence's whole tag path), or its examples' summed class weights."""
        if self.class_weight is not None:
            return sum(self.class_weights[self.train_set.labels[i]] for i in indices)
        if getattr(self.model, "loss_per_sentence", False):
            return max(1, len(indices))
        return max(1, self.train_set.scored(indices))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    # --- one optimizer step -------------------------------------------------------------------
    def _loss_sum(self, batch):
        """The sum over the micro-batch of the per-example (or per-scored-token) loss of the head."""
        model = self.ddp or self.model
        weighted = {} if self.class_weight is None else {"weight": self.class_weight}
        with self._autocast():
            return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                         labels=batch["labels"], reduction="sum", **weighted).loss

    def train_step(self, indices: list[int]) -> float:
        """One optimizer step on the global batch ``indices``; returns its mean loss."""
        cfg = self.cfg
        self.model.train()
        scored = self._loss_terms(indices)                             # loss terms in the global batch
        mine = indices[self.rank::self.world]                          # this rank's share
        micro = [mine[i::cfg.grad_accum] for i in range(cfg.grad_accum)]
        total = torch.zeros((), device=self.device)
        for k, part in enumerate(micro):
            if not part:
                continue
            batch = {n: t.to(self.device) for n, t in D.collate(self.train_set, part, self.tokenizer.pad_token_id).items()}
            sync_now = k == len(micro) - 1 or self.ddp is None
            ctx = self.ddp.no_sync() if (self.ddp is not None and not sync_now) else contextlib.nullcontext()
            with ctx:
                loss = self._loss_sum(batch) / scored * self.world      # DDP averages over ranks
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach() / self.world
        if self.world > 1:
            dist.all_reduce(total)
        if not torch.isfinite(total):
            raise NonFiniteLoss(f"the loss became {total.item()} at step {self.schedule.last_step + 1} "
                                f"(epoch {self.epoch + 1}); stopped. Checkpoints written so far are kept "
                                f"in {self.out}. Try a lower --lr.")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if cfg.clip > 0:
            optim.clip_grad_norm(self.model.parameters(), cfg.clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return total.item()

    # --- evaluation ---------------------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        """AdamW's groups: decay on weight matrices only (``optim.param_groups``); with ``crf_lr``, the
        CRF's scores in a group of their own, at that learning rate and without decay (they are
        scores that start at zero, not weights to shrink). The schedule scales every group alike."""
        groups = optim.param_groups(self.model, self.cfg.weight_decay)
        if not self.cfg.crf_lr:
            return groups
        crf = getattr(self.model, "crf", None)
        if crf is None:
            raise UserError(f"--crf-lr {self.cfg.crf_lr}: the model has no CRF head (add --crf)")
        mine = [p for p in crf.parameters() if p.requires_grad]
        ids = {id(p) for p in mine}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
        return [g for g in groups if g["params"]] + [{"params": mine, "lr": self.cfg.crf_lr, "weight_decay": 0.0}]

    def predict(self, encoded: D.Encoded, by_sentence: bool = False) -> tuple[list, list]:
        """Predicted and gold labels (class ids, per word for token tasks, one list per sentence
        with ``by_sentence``; label sets; numbers). In fp32 whatever the training precision: the
        scores in metrics.json are then those `minift evaluate` gives for the saved model, and
        multi-label thresholds are chosen on the logits predict will compare them with."""
        if encoded.problem in ("token", D.SINGLE_LABEL):
            token = encoded.problem == "token"
            out = predict_labels(self.model, encoded, self.tokenizer.pad_token_id, self.cfg.eval_batch_size,
                                 self.device, token, return_probs=token and by_sentence)
            return out[:2]
        return predict_values(self.model, encoded, self.tokenizer.pad_token_id, self.cfg.eval_batch_size,
                              self.device, self.thresholds if self.thresholds is not None else 0.5)

    def evaluate(self, encoded: D.Encoded) -> dict:
        """The metrics of the dataset's problem type; "report" (classification) is not a number."""
        if encoded.problem == "token":
            return M.token_scores(*self.predict(encoded, by_sentence=True), self.dataset.labels)
        pred, gold = self.predict(encoded)
        if encoded.problem == D.REGRESSION:
            return M.regression_scores(pred, gold)
        if encoded.problem == D.MULTI_LABEL:
            return M.multi_label_scores(pred, gold, len(self.dataset.labels))
        report = M.classification_report(pred, gold, self.dataset.labels)
        return {"accuracy": report["accuracy"], "macro_f1": report["macro avg"]["f1"], "report": report}

    def score(self, results: dict) -> float:
        """The one number that picks the best epoch (higher is better): entity F1 for BIO tags, as
        NER is scored, accuracy for other tags and classes, micro-F1 for label sets, -MSE."""
        if "entity_f1" in results:
            return results["entity_f1"]
        return {D.REGRESSION: lambda r: -r["mse"], D.MULTI_LABEL: lambda r: r["micro_f1"]}.get(
            self.train_set.problem, lambda r: r["accuracy"])(results)

    # --- checkpoints --------------------------------------------------------------------------
    def save_best(self):
        def write(tmp):
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        checkpoint.atomic_dir_write(self.out / "best", write)

    def load_best(self):
        """Put the weights of ``best/`` back into the model (LoRA: merged weights, adapters zeroed)."""
        from .pretrained import _match_prefix, read_state_dict
        state = _match_prefix(self.model, read_state_dict(self.out / "best"))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith(("lora_A", "lora_B")) for k in missing):
            raise ValueError(f"{self.out / 'best'}: does not fit the model (missing {missing}, unexpected {unexpected})")
        with torch.no_grad():
            for module in self.model.modules():
                if getattr(module, "lora_B", None) is not None:
                    module.lora_B.zero_()

    def run_info(self) -> dict:
        """What a resume must agree with (stored as last/run.json)."""
        return {"config": asdict(self.cfg), "labels": self.dataset.labels, "task": self.dataset.task,
                "problem": self.train_set.problem, "data": self.dataset.name, "epoch": self.epoch,
                "settings": self.settings}

    def save_last(self):
        state = {"epoch": self.epoch, "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "best_metric": self.best_metric,
                 "bad_epochs": self.bad_epochs, "history": asdict(self.history), "best_dev": self.best_dev,
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                 "config": asdict(self.cfg), "labels": self.dataset.labels,
                 "autocast": _dtype_name(self.autocast_dtype),
                 "precision": self.precision_note}
        checkpoint.save_last(self.out / "last", self.model.state_dict(), state, self.run_info())

    def resume(self, path: str | Path | None = None):
        """Continue the run saved in ``path`` (default OUT/last); it must have this config and these labels."""
        path, weights, state = checkpoint.load_last(Path(path) if path else self.out / "last")
        check_resumable(state, self.cfg, self.dataset.labels, path)
        self.model.load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.best_metric, self.bad_epochs = state["epoch"], state["best_metric"], state["bad_epochs"]
        self.best_dev = state.get("best_dev")
        self.history = History(**state["history"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.cfg.precision == "auto" and "autocast" in state:
            # auto chose once, when the run started (a timing, on the CPU): the run keeps that choice
            saved = _dtype_of(state["autocast"])
            if saved != self.autocast_dtype:
                self.log(f"--precision auto: keeping the run's {state['precision']}, not this start's "
                         f"{self.precision_note}")
            self.autocast_dtype, self.precision_note = saved, state["precision"]
        self.resumed = True
        self.log(f"resumed from {path} after epoch {self.epoch}")

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        if is_main():
            checkpoint.start_run(self.out, resume=self.resumed, overwrite=self.overwrite)
        t_start = time.time()
        self.log(f"precision: {self.precision_note}")
        try:
            self._open_log()
            while self.epoch < self.num_epochs:
                losses, seconds = self._train_epoch(self.epoch)
                if self._end_epoch(losses, seconds):
                    break
            return self.finish(time.time() - t_start)
        finally:
            if self._log_file:
                self._log_file.close()
                self._log_file = None
            if is_main():
                checkpoint.release_lock(self.out)

    def _open_log(self):
        """train_log.jsonl holds this run's history only: a resumed run's log restarts from its checkpoint."""
        if not is_main():
            return
        path = self.out / "train_log.jsonl"
        checkpoint.write_log(path, checkpoint.log_lines(self.history.steps, self.history.epochs, self.cfg.log_every))
        self._log_file = open(path, "a", encoding="utf-8")

    def _train_epoch(self, e: int) -> tuple[list[float], float]:
        """One pass (the last may be partial) over the training batches; the losses and the seconds."""
        cfg = self.cfg
        batches = length_batches(self.lengths, cfg.batch_size, cfg.seed, e, self.sample_weights)
        batches = batches[:self.total_steps - e * self.steps_per_epoch]     # a partial last epoch
        bar = _progress(batches, f"epoch {e + 1}/{self.num_epochs}", cfg.progress and is_main())
        t0, n_seen, losses = time.time(), 0, []
        for indices in bar:
            loss = self.train_step(indices)
            losses.append(loss)
            n_seen += len(indices)
            step = self.schedule.last_step
            rec = {"step": step, "epoch": e + 1, "loss": loss, "lr": self.schedule.get_last_lr()[0]}
            self.history.steps.append(rec)
            if self._log_file and step % cfg.log_every == 0:
                self._log_file.write(json.dumps(rec) + "\n")
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{n_seen / (time.time() - t0):.0f}")
        return losses, time.time() - t0

    def _end_epoch(self, losses: list[float], seconds: float) -> bool:
        """Evaluate on dev, log, write the checkpoints; True when early stopping says stop."""
        dev = self.evaluate(self.dev_set)
        self.epoch += 1
        rec = {"epoch": self.epoch,                               # passes begun; the last may be partial
               "epochs_trained": round(self.schedule.last_step / self.steps_per_epoch, 3),
               "train_loss": sum(losses) / len(losses),
               **{f"dev_{k}": v for k, v in _scalars(dev).items()}, "seconds": seconds}
        self.history.epochs.append(rec)
        score = self.score(dev)
        improved = score > self.best_metric
        shown = "  ".join(f"dev {k} {v:.4f}" for k, v in _scalars(dev).items())
        self.log(f"epoch {self.epoch}: train loss {rec['train_loss']:.4f}  {shown}  ({seconds:.0f} s)"
                 + ("  * best" if improved else ""))
        if self._log_file:
            self._log_file.write(json.dumps(rec) + "\n")
            self._log_file.flush()
        if improved:
            self.best_metric, self.bad_epochs, self.best_dev = score, 0, dev
            if is_main():
                self.save_best()
        else:
            self.bad_epochs += 1
        if is_main():
            self.save_last()
        if self.cfg.patience and self.bad_epochs >= self.cfg.patience:
            self.log(f"early stopping: no dev improvement for {self.cfg.patience} epoch(s)")
            return True
        return False

    def finish(self, seconds: float) -> dict:
        """Test the best checkpoint (when there is a test set); write metrics.json and the plot."""
        if (self.out / "best" / "model.safetensors").is_file():
            self.load_best()
        dev = self.best_dev or self.evaluate(self.dev_set)   # known unless resumed after the best epoch
        tuned = self.tune_thresholds() if self.train_set.problem == D.MULTI_LABEL else None
        test = self.evaluate(self.test_set) if self.test_set is not None else None
        metrics = {"task": self.dataset.name, "problem": self.train_set.problem,
                   **{f"dev_{k}": v for k, v in _scalars(dev).items()}}
        if tuned is not None:
            metrics.update({f"dev_tuned_{k}": v for k, v in _scalars(tuned).items()})
            metrics["thresholds"] = dict(zip(self.dataset.labels, self.thresholds))
        else:
            metrics.update({f"dev_{k}": dev[k] for k in ("report", "entity_report") if k in dev})
        if test is not None:
            metrics.update({f"test_{k}": v for k, v in _scalars(test).items()})
            metrics.update({f"test_{k}": test[k] for k in ("report", "entity_report") if k in test})
        metrics.update({"epochs_run": self.epoch, "train_seconds": seconds, "truncated": self.truncated,
                        "config": asdict(self.cfg), "impl": self.model.config.impl, "device": str(self.device),
                        "precision": self.precision_note, "world_size": self.world, "history": self.history.epochs})
        if is_main():
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
            plot_history(self.history, self.out / "training.png")
        return metrics


    def tune_thresholds(self) -> dict:
        """Multi-label: per class, the threshold with the best dev F1 (``metrics.choose_thresholds``),
        kept for the test and saved as best/thresholds.json for predict and evaluate. Returns the dev
        scores with them (optimistic: chosen on the same examples)."""
        logits, gold = predict_logits(self.model, self.dev_set, self.tokenizer.pad_token_id,
                                      self.cfg.eval_batch_size, self.device)          # fp32, as predict
        self.thresholds = M.choose_thresholds(torch.sigmoid(logits), gold)
        if is_main() and (self.out / "best").is_dir():
            write_thresholds(self.out / "best", self.dataset.labels, self.thresholds)
        return self.evaluate(self.dev_set)


THRESHOLDS = "thresholds.json"


def write_thresholds(folder: Path, labels: list[str], thresholds: list[float]) -> None:
    (Path(folder) / THRESHOLDS).write_text(json.dumps(
        {"thresholds": dict(zip(labels, thresholds)),
         "rule": "a class is predicted when its sigmoid probability > its threshold; each threshold is the one "
                 "with the best F1 of its class on the dev set"}, indent=2) + "\n", encoding="utf-8")


def read_thresholds(folder: Path, labels: list[str]) -> list[float] | None:
    """The per-class thresholds saved with a multi-label model (None: no file, 0.5 for all)."""
    path = Path(folder) / THRESHOLDS
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["thresholds"]
        return [float(saved[name]) for name in labels]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: expected a threshold for each class {labels} ({e!r})") from None


def check_resumable(state: dict, cfg: TrainConfig, labels: list[str], path) -> None:
    """A resumed run continues the saved one exactly: the same settings and the same classes."""
    saved_labels = state.get("labels")
    if saved_labels is not None and list(saved_labels) != list(labels):
        raise UserError(f"{path}: the run was trained on {len(saved_labels)} labels {saved_labels}, the data "
                        f"given now has {len(labels)} {labels}; resume with the run's data, or start a new run")
    saved = TrainConfig(**state["config"])
    changed = saved.differences(cfg)
    if changed:
        raise UserError(f"--resume continues {path} with the settings it was started with; these differ: "
                        f"{'; '.join(changed)}. Leave them out, or start a new run (--overwrite or another --out)")


def _scalars(results: dict) -> dict:
    return {k: v for k, v in results.items() if isinstance(v, (int, float))}


@torch.no_grad()
def _logits_in_order(model, encoded: D.Encoded, pad_id: int, batch_size: int, device):
    """(index, logits, gold labels) of every example, on the CPU; batches of similar lengths."""
    model.eval()
    n = len(encoded.input_ids)
    order = sorted(range(n), key=lambda i: len(encoded.input_ids[i]))   # similar lengths batch together
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = {k: t.to(device) for k, t in D.collate(encoded, idx, pad_id).items()}
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits.float()
        yield idx, logits.cpu(), batch["labels"].cpu()          # (B, C) or (B, T, C); (B,) (B, C) or (B, T)


def predict_labels(model, encoded: D.Encoded, pad_id: int, batch_size: int, device, token_task: bool,
                   return_probs: bool = False):
    """Predicted and gold class ids, per example or per scored token (first sub-word of each word),
    in the order of ``encoded``; with ``return_probs`` also the softmax probability of each prediction
    (None for a CRF's tags, which are decoded as a whole path by Viterbi)."""
    n = len(encoded.input_ids)
    pred, gold, prob = [None] * n, [None] * n, [None] * n
    crf_scores = None                 # BERT + CRF: the best tag path (Viterbi), not each token's argmax
    if token_task and getattr(model, "crf", None) is not None:
        crf_scores = tuple(t.detach().float().cpu() for t in model.crf.scores())     # A, start, end
    for idx, logits, labels in _logits_in_order(model, encoded, pad_id, batch_size, device):
        if crf_scores is not None:
            from .crf import compact, viterbi
            keep = labels != IGNORE_INDEX                                              # (B, T) first sub-words
            emissions, mask, _ = compact(logits, keep)                                 # (B, W, C)
            paths = viterbi(emissions, mask, *crf_scores)[0]
            for r, i in enumerate(idx):
                pred[i], gold[i], prob[i] = paths[r], labels[r][keep[r]].tolist(), [None] * len(paths[r])
            continue
        probs = torch.softmax(logits, -1)
        best, p = probs.argmax(-1), probs.max(-1).values
        for r, i in enumerate(idx):
            if token_task:
                keep = labels[r] != IGNORE_INDEX
                pred[i], gold[i], prob[i] = best[r][keep].tolist(), labels[r][keep].tolist(), p[r][keep].tolist()
            else:
                pred[i], gold[i], prob[i] = best[r].item(), labels[r].item(), p[r].item()
    if token_task and not return_probs:
        pred, gold = [x for s in pred for x in s], [x for s in gold for x in s]
    return (pred, gold, prob) if return_probs else (pred, gold)


@torch.no_grad()
def predict_logits(model, encoded: D.Encoded, pad_id: int, batch_size: int, device):
    """The logits (N, C) of every example in the order of ``encoded``, and the gold labels (N, ...)."""
    n = len(encoded.input_ids)
    logits_out, gold_out = [None] * n, [None] * n
    for idx, logits, labels in _logits_in_order(model, encoded, pad_id, batch_size, device):
        for r, i in enumerate(idx):
            logits_out[i], gold_out[i] = logits[r], labels[r]
    return torch.stack(logits_out), torch.stack(gold_out)


def predict_values(model, encoded: D.Encoded, pad_id: int, batch_size: int, device, threshold=0.5):
    """Multi-label: the predicted and gold sets of class ids (sigmoid > threshold, one number or one
    per class); regression: the numbers."""
    logits, labels = predict_logits(model, encoded, pad_id, batch_size, device)
    if encoded.problem == D.MULTI_LABEL:
        chosen = torch.sigmoid(logits) > torch.as_tensor(threshold, dtype=logits.dtype)     # (N, C)
        pred = [set(torch.nonzero(row).flatten().tolist()) for row in chosen]
        gold = [set(torch.nonzero(row > 0.5).flatten().tolist()) for row in labels]
        return pred, gold
    return logits.squeeze(-1).tolist(), labels.tolist()


def _progress(items, desc, enabled):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="batch", dynamic_ncols=True, leave=True)


def plot_history(history: History, path: Path) -> None:
    """Training loss per step and the first dev metric per epoch, one PNG. Drawn on a Figure of its
    own with the Agg canvas, not through pyplot: the process's backend (a notebook's inline one)
    and its open figures are left as they were."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 2)
    steps = [r["step"] for r in history.steps]
    ax[0].plot(steps, [r["loss"] for r in history.steps], lw=0.6, alpha=0.5, label="per step")
    if len(steps) >= 20:
        k = max(1, len(steps) // 50)
        smooth = [sum(r["loss"] for r in history.steps[max(0, i - k):i + 1]) / len(history.steps[max(0, i - k):i + 1])
                  for i in range(len(steps))]
        ax[0].plot(steps, smooth, lw=1.5, label=f"mean of {k + 1}")
    ax[0].set(xlabel="optimizer step", ylabel="training loss", title="training loss")
    ax[0].legend()
    # x: epochs trained (1.5 after a half pass), not the pass number, which would call it epoch 2
    ep = [r.get("epochs_trained", r["epoch"]) for r in history.epochs]
    key = next((k for k in (history.epochs[0] if history.epochs else {}) if k.startswith("dev_")), None)
    if key:
        ax[1].plot(ep, [r[key] for r in history.epochs], "o-")
        if "perplexity" in key:                 # pre-training: from about V at the start to tens
            ax[1].set_yscale("log")
    name = (key or "dev_accuracy")[4:].replace("_", " ")
    ax[1].set(xlabel="epochs trained", ylabel=f"dev {name}", title=f"dev {name}", xticks=ep)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
