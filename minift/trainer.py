"""The fine-tuning loop: what the textbooks teach, as one readable class.

    pick a pretrained model -> add a task layer -> set the optimizer and regularisation
    -> train, evaluating on dev each epoch, keep the best -> test -> save for deployment

``Trainer(model, tokenizer, dataset, TrainConfig(...)).fit()`` does all of it. Details that make
runs reproducible and safe:

- Data order: epoch e shuffles with a generator seeded by (seed, e), then groups examples of
  similar length into batches (dynamic padding wastes little). It depends on nothing else, so a
  resumed run sees exactly the batches an uninterrupted one would.
- Loss normalisation: each micro-batch contributes sum(loss) / (examples or scored tokens in the
  whole global batch). Gradient accumulation and data-parallel ranks then add up to exactly the
  gradient of one big batch.
- Checkpoints: ``last/`` after every epoch (model, optimizer, schedule, RNG states, epoch) and
  ``best/`` when the dev metric improves, each written to a temporary folder and renamed into
  place, so a crash mid-write leaves the previous one whole.
- A non-finite loss stops training with an error; the checkpoints written so far stay.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import data as D
from . import metrics as M
from . import optim
from .backends import get_ops
from .ops import extension_available


@dataclass
class TrainConfig:
    lr: float = 1e-4                     # peak learning rate eta
    epochs: float = 3                    # 1.5: one epoch, then the first half of the next
    batch_size: int = 32                 # global batch (all ranks, all accumulation steps)
    grad_accum: int = 1                  # micro-batches per optimizer step
    max_length: int = 128                # longer inputs are truncated (and counted)
    warmup_ratio: float = 0.1            # share of the steps with a linear warm-up
    weight_decay: float = 0.01           # decoupled, on weight matrices only
    clip: float = 1.0                    # global gradient-norm clip (0: off)
    seed: int = 0
    patience: int = 0                    # early stopping: epochs without dev improvement (0: off)
    precision: str = "auto"              # "auto" | "fp32" | "bf16" | "fp16" (autocast, GPU)
    eval_batch_size: int = 128
    max_train_examples: int = 0          # 0: all (a quick run uses fewer)
    log_every: int = 10                  # steps between log lines
    progress: bool = True                # tqdm progress bars


class NonFiniteLoss(RuntimeError):
    pass


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def length_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle, sort by length inside windows of 50 batches, cut into batches, shuffle the batches."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def atomic_dir_write(target: Path, write) -> None:
    """write(tmp_dir), then swap it in for ``target``: readers see the old or the new, never half."""
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: Path) -> Path:
    """``last/``, or ``last.old/`` when a crash came between the two renames of a swap."""
    if (path / "trainer_state.pt").is_file():
        return path
    old = path.with_name(path.name + ".old")
    if (old / "trainer_state.pt").is_file():
        return old
    raise FileNotFoundError(f"{path}: no checkpoint to resume from (expected trainer_state.pt)")


@dataclass
class History:
    steps: list[dict] = field(default_factory=list)    # {"step", "loss", "lr"}
    epochs: list[dict] = field(default_factory=list)   # {"epoch", "train_loss", "dev_*", "seconds"}


class Trainer:
    def __init__(self, model, tokenizer, dataset: D.Dataset, config: TrainConfig, out: str | Path,
                 device: str | torch.device = "cpu", log=print):
        self.model, self.tokenizer, self.dataset, self.cfg = model, tokenizer, dataset, config
        self.out = Path(out)
        self.device = torch.device(device)
        self.log = log if is_main() else (lambda *a, **k: None)
        self.token_task = dataset.task == "token"
        encode = D.encode_tokens if self.token_task else D.encode_classification
        train = dataset.train[:config.max_train_examples] if config.max_train_examples else dataset.train
        self.train_set = encode(tokenizer, train, dataset.labels, config.max_length)
        self.dev_set = encode(tokenizer, dataset.dev, dataset.labels, config.max_length)
        self.test_set = encode(tokenizer, dataset.test, dataset.labels, config.max_length)
        self.truncated = {"train": self.train_set.num_truncated, "dev": self.dev_set.num_truncated,
                          "test": self.test_set.num_truncated}
        if any(self.truncated.values()):
            self.log(f"warning: inputs longer than max_length={config.max_length} were truncated: {self.truncated}")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if config.batch_size % (self.world * config.grad_accum):
            raise ValueError(f"batch_size {config.batch_size} must be divisible by world size {self.world} "
                             f"x grad_accum {config.grad_accum}")
        self.model.to(self.device)
        self.ddp = None
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = optim.param_groups(self.model, config.weight_decay)
        # impl="fused": the compiled one-pass AdamW update too (the same arithmetic), where it has a kernel
        fused = self.model.config.impl == "fused" and extension_available()
        self.optimizer = optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
        lengths = [len(x) for x in self.train_set.input_ids]
        self.lengths = lengths
        self.steps_per_epoch = math.ceil(len(lengths) / config.batch_size)
        if not (config.epochs > 0 and math.isfinite(config.epochs)):
            raise ValueError(f"epochs: expected a positive number, got {config.epochs}")
        total = self.total_steps = max(1, round(self.steps_per_epoch * config.epochs))
        self.num_epochs = math.ceil(total / self.steps_per_epoch)      # the last one may be partial
        self.schedule = optim.LRSchedule(self.optimizer, optim.linear_warmup_decay(
            int(config.warmup_ratio * total), total))
        self.epoch = 0                      # epochs completed
        self.best_metric = -math.inf
        self.best_dev = None                # dev results of the best epoch
        self.bad_epochs = 0
        self.history = History()
        self.autocast_dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None

    # --- precision -------------------------------------------------------------------------
    def _autocast_dtype(self):
        p = self.cfg.precision
        if p == "auto":
            if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return None
        if p == "fp32":
            return None
        if p in ("bf16", "fp16"):
            if self.device.type != "cuda":
                raise ValueError(f"precision {p}: mixed precision needs a GPU; on the CPU use fp32")
            return torch.bfloat16 if p == "bf16" else torch.float16
        raise ValueError(f"precision: expected auto, fp32, bf16 or fp16, got {p!r}")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    # --- one optimizer step -------------------------------------------------------------------
    def _loss_sum(self, batch):
        """The sum over the micro-batch of the per-example (or per-scored-token) loss."""
        model = self.ddp or self.model
        with self._autocast():
            out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            logits = out.logits.float()
            C = logits.shape[-1]
            loss = get_ops(self.model.config.impl).cross_entropy(
                logits.reshape(-1, C), batch["labels"].reshape(-1), reduction="sum")
        return loss

    def _scored(self, indices) -> int:
        if self.token_task:
            return sum(sum(1 for t in self.train_set.labels[i] if t != -100) for i in indices)
        return len(indices)

    def train_step(self, indices: list[int]) -> float:
        """One optimizer step on the global batch ``indices``; returns its mean loss."""
        cfg = self.cfg
        self.model.train()
        scored = max(1, self._scored(indices))
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
    def predict(self, encoded: D.Encoded) -> tuple[list, list]:
        with self._autocast():
            return predict_labels(self.model, encoded, self.tokenizer.pad_token_id, self.cfg.eval_batch_size,
                                  self.device, self.token_task)

    def evaluate(self, encoded: D.Encoded) -> dict:
        pred, gold = self.predict(encoded)
        report = M.classification_report(pred, gold, self.dataset.labels)
        return {"accuracy": report["accuracy"], "macro_f1": report["macro avg"]["f1"], "report": report}

    # --- checkpoints --------------------------------------------------------------------------
    def save_best(self):
        def write(tmp):
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        atomic_dir_write(self.out / "best", write)

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

    def save_last(self):
        state = {"epoch": self.epoch, "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "best_metric": self.best_metric,
                 "bad_epochs": self.bad_epochs, "history": asdict(self.history), "best_dev": self.best_dev,
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                 "config": asdict(self.cfg)}

        def write(tmp):  # raw weights (LoRA adapters unmerged), so training continues exactly
            from safetensors.torch import save_file
            save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()},
                      str(tmp / "model.safetensors"))
            torch.save(state, tmp / "trainer_state.pt")
        atomic_dir_write(self.out / "last", write)

    def resume(self, path: str | Path | None = None):
        path = resolve_checkpoint(Path(path) if path else self.out / "last")
        from .pretrained import read_state_dict
        self.model.load_state_dict(read_state_dict(path), strict=True)
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.best_metric, self.bad_epochs = state["epoch"], state["best_metric"], state["bad_epochs"]
        self.best_dev = state.get("best_dev")
        self.history = History(**state["history"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.log(f"resumed from {path} after epoch {self.epoch}")

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        if is_main():
            self.out.mkdir(parents=True, exist_ok=True)
        log_file = open(self.out / "train_log.jsonl", "a", encoding="utf-8") if is_main() else None
        t_start = time.time()
        try:
            while self.epoch < self.num_epochs:
                e = self.epoch
                batches = length_batches(self.lengths, cfg.batch_size, cfg.seed, e)
                batches = batches[:self.total_steps - e * self.steps_per_epoch]   # a partial last epoch
                bar = _progress(batches, f"epoch {e + 1}/{self.num_epochs}", cfg.progress and is_main())
                t0, n_seen, losses = time.time(), 0, []
                for indices in bar:
                    loss = self.train_step(indices)
                    losses.append(loss)
                    n_seen += len(indices)
                    step = self.schedule.last_step
                    rec = {"step": step, "epoch": e + 1, "loss": loss, "lr": self.schedule.get_last_lr()[0]}
                    self.history.steps.append(rec)
                    if log_file and step % cfg.log_every == 0:
                        log_file.write(json.dumps(rec) + "\n")
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{n_seen / (time.time() - t0):.0f}")
                dev = self.evaluate(self.dev_set)
                self.epoch = e + 1
                rec = {"epoch": self.epoch,                       # passes begun; the last may be partial
                       "epochs_trained": round(self.schedule.last_step / self.steps_per_epoch, 3),
                       "train_loss": sum(losses) / len(losses),
                       "dev_accuracy": dev["accuracy"], "dev_macro_f1": dev["macro_f1"],
                       "seconds": time.time() - t0}
                self.history.epochs.append(rec)
                improved = dev["accuracy"] > self.best_metric
                self.log(f"epoch {self.epoch}: train loss {rec['train_loss']:.4f}  dev accuracy "
                         f"{dev['accuracy']:.4f}  dev macro-F1 {dev['macro_f1']:.4f}  ({rec['seconds']:.0f} s)"
                         + ("  * best" if improved else ""))
                if log_file:
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                if improved:
                    self.best_metric, self.bad_epochs = dev["accuracy"], 0
                    self.best_dev = dev
                    if is_main():
                        self.save_best()
                else:
                    self.bad_epochs += 1
                if is_main():
                    self.save_last()
                if cfg.patience and self.bad_epochs >= cfg.patience:
                    self.log(f"early stopping: no dev improvement for {cfg.patience} epoch(s)")
                    break
        finally:
            if log_file:
                log_file.close()
        return self.finish(time.time() - t_start)

    def finish(self, seconds: float) -> dict:
        """Test the best checkpoint; write metrics.json and the plot."""
        if (self.out / "best" / "model.safetensors").is_file():
            self.load_best()
        dev = self.best_dev or self.evaluate(self.dev_set)   # known unless resumed after the best epoch
        test = self.evaluate(self.test_set)
        metrics = {"task": self.dataset.name, "dev_accuracy": dev["accuracy"], "test_accuracy": test["accuracy"],
                   "dev_macro_f1": dev["macro_f1"], "test_macro_f1": test["macro_f1"],
                   "test_report": test["report"], "epochs_run": self.epoch, "train_seconds": seconds,
                   "truncated": self.truncated, "config": asdict(self.cfg),
                   "impl": self.model.config.impl, "device": str(self.device), "world_size": self.world,
                   "history": self.history.epochs}
        if is_main():
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
            plot_history(self.history, self.out / "training.png")
        return metrics


@torch.no_grad()
def predict_labels(model, encoded: D.Encoded, pad_id: int, batch_size: int, device, token_task: bool,
                   return_probs: bool = False):
    """Predicted and gold labels, per example or per scored token (first sub-word of each word),
    in the order of ``encoded``; with ``return_probs`` also the softmax probability of each prediction."""
    model.eval()
    n = len(encoded.input_ids)
    order = sorted(range(n), key=lambda i: len(encoded.input_ids[i]))   # similar lengths batch together
    pred, gold, prob = [None] * n, [None] * n, [None] * n
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = {k: t.to(device) for k, t in D.collate(encoded, idx, pad_id).items()}
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits.float()
        probs = torch.softmax(logits, -1)
        best, p = probs.argmax(-1).cpu(), probs.max(-1).values.cpu()
        labels = batch["labels"].cpu()
        for r, i in enumerate(idx):
            if token_task:
                keep = labels[r] != -100
                pred[i], gold[i], prob[i] = best[r][keep].tolist(), labels[r][keep].tolist(), p[r][keep].tolist()
            else:
                pred[i], gold[i], prob[i] = best[r].item(), labels[r].item(), p[r].item()
    if token_task and not return_probs:
        pred, gold = [x for s in pred for x in s], [x for s in gold for x in s]
    return (pred, gold, prob) if return_probs else (pred, gold)


def _progress(items, desc, enabled):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="batch", dynamic_ncols=True, leave=True)


def plot_history(history: History, path: Path) -> None:
    """Training loss per step and dev accuracy per epoch, one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
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
    ax[1].plot(ep, [r["dev_accuracy"] for r in history.epochs], "o-")
    ax[1].set(xlabel="epochs trained", ylabel="dev accuracy", title="dev accuracy", xticks=ep)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
