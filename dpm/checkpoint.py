"""Atomic files, checkpoints, RNG state and the shared cache of pretrained baselines."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dpm.errors import UserError
from dpm.models import build_model

log = logging.getLogger(__name__)
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, keep_previous: bool = False) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.

    With `keep_previous` the file being replaced survives as `<path>.prev` until the new one is
    complete on disk. A failed write (disk full, read-only location) removes its temporary file and
    raises a UserError naming the path and the fix."""
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
        raise UserError(
            f"cannot write {path}: {err.strerror or err}: free space there or point output_root / "
            f"cache_dir at a writable location"
        ) from err
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
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(path, _MAGIC + hashlib.sha256(payload).digest() + payload, keep_previous=keep_previous)


class CorruptCheckpoint(Exception):
    """A checkpoint whose checksum does not match its content (truncated or overwritten)."""


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """True when `path` or its kept predecessor exists (a kill between the two renames leaves only the latter)."""
    return Path(path).exists() or previous_path(path).exists()


class UnsafeCheckpoint(Exception):
    """A file that holds pickled Python objects beyond tensors and plain data: loading it would
    have to run code that the file names, so it is never loaded."""


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint this suite wrote (checksum verified) or a plain torch file (e.g. a state_dict).

    Loading runs no code: ``torch.load(weights_only=True)``, so a file may hold tensors and plain
    containers only. One that holds other pickled objects (a checkpoint written before this rule,
    a pickled ``nn.Module``, a crafted file) is refused with a UserError that says how to go on.
    A missing, truncated or corrupt latest checkpoint falls back to `<path>.prev` with a warning;
    when neither is usable a UserError names the file."""
    path = Path(path)
    errors = []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            state = _read_checkpoint(candidate)
        except UnsafeCheckpoint as err:
            # Not damage that the predecessor could make good (it was written the same way): stop.
            raise UserError(
                f"{candidate} is not loaded: it holds pickled Python objects ({err}), not only tensors and plain "
                f"data, and unpickling them could run code; a checkpoint that dpm wrote before it loaded with "
                f"weights_only=True: delete it (or its run dir) and rerun that stage; weights from elsewhere: save "
                f"them as torch.save(model.state_dict(), path)"
            ) from None
        except Exception as err:  # torch.load raises many kinds (pickle, zip, EOF) for a damaged file
            errors.append(f"{candidate}: {err}")
            log.warning(
                "checkpoint %s is unusable (%s)%s",
                candidate,
                err,
                "; falling back to the previous one" if candidate == path else "",
            )
            continue
        if candidate != path:
            log.warning("resuming from the previous checkpoint %s", candidate)
        return state
    if not errors:
        raise UserError(f"{path} does not exist")
    raise UserError(f"no usable checkpoint at {path} ({'; '.join(errors)}): delete it to start that stage again")


def _read_checkpoint(path: Path) -> Any:
    data = path.read_bytes()
    if data.startswith(_MAGIC):
        digest, payload = data[len(_MAGIC) : len(_MAGIC) + 32], data[len(_MAGIC) + 32 :]
        if hashlib.sha256(payload).digest() != digest:
            raise CorruptCheckpoint("checksum mismatch (truncated or corrupt)")
        data = payload
    # weights_only: unpickling builds tensors and plain containers only, never an object the file
    # names, so loading a checkpoint (ours, or one a user points at) cannot run code.
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Refused for what it holds (a class or function it names), not for damage such as garbage
        # bytes, which stays an ordinary load error (and falls back to the predecessor).
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if named is None:
            raise
        raise UnsafeCheckpoint(f"it names {named.group(1)}") from None


def rng_state() -> dict:
    """The torch / numpy / python RNG states as tensors and plain containers (loadable with
    weights_only=True, unlike numpy's own state tuple, which holds an ndarray)."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": int(version), "internal": [int(i) for i in internal], "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: What a pruned model's file says it is (:func:`save_pruned_model`).
PRUNED_MODEL_FORMAT = "dpm-pruned-model/1"


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(_plain(v) for v in value)


def save_pruned_model(path: str | os.PathLike, model: torch.nn.Module, build: dict, **extra: Any) -> None:
    """Save a physically pruned model as its weights plus its structure, never as a pickled module.

    ``build`` is what rebuilds the unpruned network: ``dpm.models.build_model(**build)`` (``name``,
    ``num_classes``, ``in_channels`` and the model's options, plain values). The structure is every
    module's plain attributes (the channel counts Torch-Pruning rewrote: ``in_channels``,
    ``out_channels``, ``num_features``, ...); the weights carry the pruned shapes. ``extra`` (plain
    data) is stored beside them. :func:`load_pruned_model` reads it back with ``weights_only=True``."""
    structure = {
        name: {k: v for k, v in vars(m).items() if not k.startswith("_") and _plain(v)}
        for name, m in model.named_modules()
    }
    frozen = [n for n, q in model.named_parameters() if not q.requires_grad]
    atomic_torch_save(
        {
            "format": PRUNED_MODEL_FORMAT,
            "build": dict(build),
            "structure": structure,
            "weights": model.state_dict(),
            "frozen": frozen,
            "training": model.training,
            **extra,
        },
        path,
        keep_previous=False,
    )


def load_pruned_model(path: str | os.PathLike) -> torch.nn.Module:
    """The model :func:`save_pruned_model` saved: built fresh from its ``build`` spec, given the
    saved structure, and its parameters and buffers replaced by the saved (pruned-shape) ones.
    ``load_checkpoint(path)`` gives the raw record (``extra`` included)."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != PRUNED_MODEL_FORMAT:
        raise UserError(
            f"{path} is not a pruned model saved by dpm.checkpoint.save_pruned_model: load it with "
            f"dpm.checkpoint.load_checkpoint"
        )
    build = dict(state["build"])
    model = build_model(build.pop("name"), build.pop("num_classes"), build.pop("in_channels", 3), **build)
    modules = dict(model.named_modules())
    missing = sorted(set(state["structure"]) - set(modules))
    if missing:
        raise UserError(
            f"{path}: modules {missing[:5]} are not in a fresh {state['build']['name']}: the file was "
            f"saved from another model (or another dpm version); rerun the stage that wrote it"
        )
    for name, attrs in state["structure"].items():
        for key, value in attrs.items():
            setattr(modules[name], key, value)
    frozen = set(state["frozen"])
    # Replace (not copy into) each parameter and buffer: the fresh ones have the unpruned shapes.
    # setattr on a registered name re-registers it; _parameters / _buffers say which kind it is.
    for full, tensor in state["weights"].items():
        owner, _, attr = full.rpartition(".")
        module = modules.get(owner)
        if module is not None and attr in module._parameters:
            setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=full not in frozen))
        elif module is not None and attr in module._buffers:
            setattr(module, attr, tensor)
        else:
            raise UserError(
                f"{path}: weight {full!r} has no place in a fresh {state['build']['name']}: rerun the "
                f"stage that wrote it"
            )
    if set(model.state_dict()) != set(state["weights"]):
        raise UserError(
            f"{path}: the weights do not cover a fresh {state['build']['name']}: rerun the stage that wrote it"
        )
    return model.train(state["training"])


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
