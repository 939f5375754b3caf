"""Atomic files, checkpoints, RNG state and the shared cache of pretrained baselines."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, keep_previous: bool = False) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.

    With `keep_previous` the file being replaced survives as `<path>.prev` until the new one is
    complete on disk. A failed write (disk full, read-only location) removes its temporary file and
    raises a UserError naming the path and the fix."""
    from dpm.errors import UserError

    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should read like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        raise UserError(f"cannot write {path}: {err.strerror or err}: free space there or point output_root / "
                        f"cache_dir at a writable location") from err
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def previous_path(path: str | os.PathLike) -> Path:
    """Where a checkpoint's predecessor is kept while (and after) the next one is written."""
    return Path(f"{path}.prev")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


# A checkpoint file: this magic, the SHA-256 of the payload, then the torch.save payload.
_MAGIC = b"DPMCKPT1"


def atomic_torch_save(obj: Any, path: str | os.PathLike, keep_previous: bool = True) -> None:
    """torch.save with a checksum, through a temporary file and a rename; the file it replaces is
    kept as `<path>.prev` so a corrupt latest checkpoint can fall back to it."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(path, _MAGIC + hashlib.sha256(payload).digest() + payload, keep_previous=keep_previous)


class CorruptCheckpoint(Exception):
    """A checkpoint whose checksum does not match its content (truncated or overwritten)."""


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """True when `path` or its kept predecessor exists (a kill between the two renames leaves only the latter)."""
    return Path(path).exists() or previous_path(path).exists()


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint this suite wrote (checksum verified) or a plain torch file (e.g. a state_dict).

    A missing, truncated or corrupt latest checkpoint falls back to `<path>.prev` with a warning;
    when neither is usable a UserError names the file."""
    from dpm.errors import UserError

    path = Path(path)
    errors = []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            state = _read_checkpoint(candidate)
        except Exception as err:  # torch.load raises many kinds (pickle, zip, EOF) for a damaged file
            errors.append(f"{candidate}: {err}")
            log.warning("checkpoint %s is unusable (%s)%s", candidate, err,
                        "; falling back to the previous one" if candidate == path else "")
            continue
        if candidate != path:
            log.warning("resuming from the previous checkpoint %s", candidate)
        return state
    if not errors:
        raise UserError(f"{path} does not exist")
    raise UserError(f"no usable checkpoint at {path} ({'; '.join(errors)}): delete it to start that stage again")


def _read_checkpoint(path: Path) -> Any:
    import io

    data = path.read_bytes()
    if data.startswith(_MAGIC):
        digest, payload = data[len(_MAGIC):len(_MAGIC) + 32], data[len(_MAGIC) + 32:]
        if hashlib.sha256(payload).digest() != digest:
            raise CorruptCheckpoint("checksum mismatch (truncated or corrupt)")
        data = payload
    # Our own checkpoints hold RNG states and plain containers: weights_only=False is needed, and
    # only files this suite wrote (or the user named) are loaded this way.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock (flock) held for the duration of the block; waits if taken."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: another run holds it", path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def config_key(obj: Any) -> str:
    """A short stable hash of a JSON-able object (the identity of a pretrained baseline)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageCache:
    """Results of the stages that base / +SP / +SR of one seed share (the pretrained baseline keyed
    by model, dataset, seed and recipe; sparse learning keyed by that plus its own recipe), shared
    by every run on a machine.

    `cache_dir/pretrained/<key>/` holds `model.pt` (published by an atomic rename, so a reader sees
    all or nothing), `key.json` (what the key stands for) and, while a pretrain is in progress,
    `last.pt` (its per-epoch checkpoint, so a killed pretrain continues where it stopped).
    """

    def __init__(self, cache_dir: str | os.PathLike, key_fields: dict):
        self.key = config_key(key_fields)
        self.key_fields = key_fields
        self.dir = Path(cache_dir) / "pretrained" / self.key

    @property
    def model_path(self) -> Path:
        return self.dir / "model.pt"

    @property
    def progress_path(self) -> Path:
        return self.dir / "last.pt"

    def lock(self):
        """Held while pretraining: a second run with the same key waits, then reuses the result."""
        return file_lock(self.dir.parent / f"{self.key}.lock")

    def load(self) -> dict | None:
        return load_checkpoint(self.model_path) if self.model_path.exists() else None

    def publish(self, entry: dict) -> None:
        atomic_write_json(self.dir / "key.json", self.key_fields)
        atomic_torch_save(entry, self.model_path, keep_previous=False)
        for stale in (self.progress_path, previous_path(self.progress_path)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
