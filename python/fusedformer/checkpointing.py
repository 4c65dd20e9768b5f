"""Crash-safe files: every write goes to a temporary file in the same folder, is flushed and fsynced,
then renamed over the target (``os.replace`` is atomic on POSIX and Windows), and the folder is
fsynced. A process killed at any moment leaves either the previous file or the new one, never a
partial one.

The training state (``training_state.pt``) holds what ``train --resume`` needs to continue a run
exactly: model and optimizer state, the step, the batch generator's and torch's RNG states, the
loss history and the configuration."""

import contextlib
import os
import tempfile

import torch

STATE_NAME = "training_state.pt"


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover  (platforms without directory handles)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """``with atomic_open(path) as f: f.write(...)``: ``path`` appears complete or not at all."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_text(path, text):
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_torch_save(obj, path):
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_pretrained_atomic(model, directory, **kwargs):
    """``model.save_pretrained(directory, ...)`` with each file replaced atomically: the files are
    written into a temporary folder beside ``directory`` and renamed into it one by one."""
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".save-", dir=directory)
    try:
        model.save_pretrained(tmp, **kwargs)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb+") as f:
                os.fsync(f.fileno())
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        _fsync_dir(directory)
    finally:
        for name in os.listdir(tmp):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(tmp, name))
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


def remove_stale_temporaries(directory):
    """Temporary files a killed writer left behind in ``directory`` (never the real files)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        p = os.path.join(directory, name)
        if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(p):
            with contextlib.suppress(OSError):
                os.unlink(p)


def save_training_state(directory, state):
    """Write the training state dict atomically to ``directory/training_state.pt``."""
    atomic_torch_save(state, os.path.join(directory, STATE_NAME))


def load_training_state(directory):
    """The training state saved in ``directory``; FileNotFoundError when there is none, ValueError when
    the file cannot be read (it never is partial: writes are atomic)."""
    path = os.path.join(directory, STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training state in {directory} (expected {path})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors: not a training state file
        raise ValueError(f"cannot read the training state {path} ({type(e).__name__}: {e})") from None
