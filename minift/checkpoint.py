"""The run folder: what a training run writes, written so that nothing is lost.

    OUT/
      .lock              the pid of the run writing here (an OS lock: released when it ends, even killed)
      best/              the best checkpoint so far, Hugging Face format (model + tokenizer)
      last/              the checkpoint after the last epoch: raw weights, trainer_state.pt, run.json
      train_log.jsonl    this run's history, one JSON object a line (steps, then each epoch's summary)
      metrics.json       the final dev (and test) metrics
      training.png       loss and dev metric curves

Rules:
- A folder that holds an earlier run is never silently reused: a new run refuses, unless it is
  told to replace it (``overwrite``) or to continue it (``resume``).
- One run at a time: a second run into a locked folder stops at once, naming the first one's pid.
- Checkpoints are written into a fresh temporary folder (a unique name, so two writers never meet)
  and renamed into place: a crash leaves the old checkpoint or the new one, never half of one.
- Files a user put into the folder, or into best/ or last/, are never deleted: when a checkpoint
  is replaced they move into the new one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

# What a run writes at the top of its folder, and the files of its checkpoints.
RUN_OUTPUTS = ("best", "last", "last.old", "metrics.json", "train_log.jsonl", "training.png")
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "vocab.txt", "trainer_state.pt", "run.json", "thresholds.json")
LOCK = ".lock"

_held: dict[Path, int] = {}   # lock file -> open descriptor, for the locks this process holds


# ------------------------------------------------------------------------------------------
# The lock
# ------------------------------------------------------------------------------------------


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def acquire_lock(out: str | Path) -> None:
    """Take OUT/.lock for this process (again: a no-op). Another live run holding it: a UserError.

    ``fcntl.flock`` belongs to the open file, and the OS drops it when the process ends however it
    ends, so a lock file left by a killed run is simply taken over: no stale locks.
    """
    import fcntl
    path = (Path(out) / LOCK).resolve()
    if path in _held:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        raise UserError(f"{out}: cannot write there (permission denied)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{out}: another minift run (pid {_lock_holder(path)}) is writing to this folder; "
                        f"wait for it to finish or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[path] = fd


def release_lock(out: str | Path) -> None:
    path = (Path(out) / LOCK).resolve()
    fd = _held.pop(path, None)
    if fd is not None:
        path.unlink(missing_ok=True)
        os.close(fd)                                       # closing drops the flock


# ------------------------------------------------------------------------------------------
# Starting a run
# ------------------------------------------------------------------------------------------


def check_out(out: str | Path) -> Path:
    """OUT as a folder we can write in (created if missing), or a UserError saying why not."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write there (permission denied)")
    return out


def earlier_run(out: str | Path) -> list[str]:
    """The outputs of an earlier run found in OUT (empty: none)."""
    return [name for name in RUN_OUTPUTS if (Path(out) / name).exists()]


def start_run(out: str | Path, resume: bool = False, overwrite: bool = False, clear: bool = True) -> Path:
    """Check OUT and lock it for a new run or a resumed one. An earlier run in OUT: refused, unless
    ``overwrite`` (then, with ``clear``, its outputs are removed now) or ``resume``."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: choose one")
    out = check_out(out)
    acquire_lock(out)
    try:
        found = earlier_run(out)
        if resume:
            resolve_checkpoint(out / "last")
        elif found and not overwrite:
            raise UserError(f"--out {out} holds an earlier run ({', '.join(found)}); add --overwrite to replace "
                            f"it, --resume to continue it, or choose another --out")
    except BaseException:
        release_lock(out)
        raise
    if found and overwrite and clear:
        clear_run(out)
    return out


def clear_run(out: Path) -> None:
    """Remove what a run wrote (its checkpoints' files, logs, metrics); keep everything else."""
    for name in ("metrics.json", "train_log.jsonl", "training.png"):
        (out / name).unlink(missing_ok=True)
    for name in ("best", "last", "last.old"):
        folder = out / name
        if folder.is_dir():
            for f in CHECKPOINT_FILES:
                (folder / f).unlink(missing_ok=True)
            if not any(folder.iterdir()):
                folder.rmdir()


# ------------------------------------------------------------------------------------------
# Writing and finding checkpoints
# ------------------------------------------------------------------------------------------


def atomic_dir_write(target: Path, write) -> None:
    """write(tmp_dir), then swap it in for ``target``: readers see the old or the new, never half.

    The temporary folder has a unique name. Files of the old ``target`` that ``write`` did not
    produce (a user's notes, say) move into the new one.
    """
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = target.with_name(target.name + ".old")
    try:
        write(tmp)
        if target.is_dir():
            for f in target.iterdir():
                if not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name) if f.is_file() else shutil.copytree(f, tmp / f.name)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)             # gone unless the write failed
    shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """``last/``, or ``last.old/`` when a crash came between the two renames of a swap."""
    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        return path
    old = path.with_name(path.name + ".old")
    if (old / "trainer_state.pt").is_file():
        return old
    raise UserError(f"{path}: no checkpoint to resume from (expected trainer_state.pt; a run writes it "
                    f"at the end of each epoch)")


def read_run_info(path: str | Path) -> dict:
    """run.json of a ``last/`` checkpoint: the TrainConfig, the class names, the epoch (small, readable)."""
    path = resolve_checkpoint(path)
    try:
        return json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path / 'run.json'}: cannot read the run's settings ({e})") from None


def save_last(path: Path, state_dict: dict, trainer_state: dict, run_info: dict) -> None:
    """Raw weights (LoRA adapters unmerged, so training continues exactly), the trainer's state
    (optimizer, schedule, RNG, history) and run.json, swapped in atomically."""
    import torch
    from safetensors.torch import save_file

    def write(tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "run.json").write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")
    atomic_dir_write(path, write)


def load_last(path: str | Path) -> tuple[Path, dict, dict]:
    """(the folder used, its raw weights, its trainer state)."""
    import torch

    from .pretrained import read_state_dict
    path = resolve_checkpoint(path)
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    return path, read_state_dict(path), state


# ------------------------------------------------------------------------------------------
# train_log.jsonl
# ------------------------------------------------------------------------------------------


def log_lines(steps: list[dict], epochs: list[dict], log_every: int) -> list[dict]:
    """The lines of train_log.jsonl for a history: every ``log_every``-th step, then its epoch's summary."""
    lines = []
    for e in epochs:
        lines += [s for s in steps if s["epoch"] == e["epoch"] and s["step"] % log_every == 0]
        lines.append(e)
    return lines


def write_log(path: Path, lines: list[dict]) -> None:
    """Replace train_log.jsonl with these lines (a resumed run's log starts as its history so far)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    os.replace(tmp, path)
