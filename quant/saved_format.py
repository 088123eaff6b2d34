"""Our own fp8 file: safetensors with `<layer>.weight` (fp8) + `<layer>.weight_scale` (fp32) and a
versioned header. Saved atomically: a temp file in the target directory, fsync, os.replace."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Mapping

import torch

from .errors import QuantFileError, SavedFormatVersionError, SaveError
from .formats import QuantConfig
from .safetensors_io import open_safetensors, read_tensor, write_safetensors

FORMAT_KEY = "lowvram.format"
FORMAT_NAME = "fp8-scaled"
VERSION_KEY = "lowvram.format_version"
# Bump when the meaning of the tensors changes; files of another version are refused, not guessed at.
FORMAT_VERSION = "1"
CONFIG_KEY = "lowvram.config"
SOURCE_KEY = "lowvram.source"


def source_fingerprint(path: str) -> str:
    """JSON naming a source file by name, size and mtime, so a cache can tell it changed."""
    st = os.stat(path)
    return json.dumps({"name": os.path.basename(path), "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns})


def build_metadata(cfg: QuantConfig, source: str) -> dict[str, str]:
    return {
        FORMAT_KEY: FORMAT_NAME,
        VERSION_KEY: FORMAT_VERSION,
        CONFIG_KEY: cfg.to_json(),
        SOURCE_KEY: source,
    }


def is_saved_format(metadata: Mapping[str, str] | None) -> bool:
    return bool(metadata) and FORMAT_KEY in metadata


def check_metadata(metadata: Mapping[str, str] | None, path: str) -> QuantConfig:
    """The config recorded in one of our files; refuses another format or format version."""
    if not is_saved_format(metadata) or metadata[FORMAT_KEY] != FORMAT_NAME:
        found = (metadata or {}).get(FORMAT_KEY)
        raise QuantFileError(f"{path} is not a LowVRAM Kit {FORMAT_NAME} file (format marker: {found!r})")
    version = metadata.get(VERSION_KEY)
    if version != FORMAT_VERSION:
        raise SavedFormatVersionError(
            f"{path} was written in LowVRAM Kit fp8 format version {version!r}; this version reads "
            f"version {FORMAT_VERSION!r} only. Delete the file and re-create it from the original model file."
        )
    return QuantConfig.from_json(metadata.get(CONFIG_KEY, "{}"), source=path)


def saved_source(path: str) -> str | None:
    """The `source` string recorded in one of our files (None: missing, unreadable, not ours or of another
    format version): what a cache compares with the source it would be made from now."""
    try:
        with open_safetensors(path) as f:
            metadata = dict(f.metadata() or {})
        check_metadata(metadata, path)
    except (OSError, QuantFileError):
        return None
    return metadata.get(SOURCE_KEY)


def load_saved(path: str) -> tuple[dict[str, torch.Tensor], QuantConfig, dict[str, str]]:
    """(state_dict, config, metadata) of one of our files, tensor by tensor from the memory map."""
    with open_safetensors(path) as f:
        metadata = dict(f.metadata() or {})
        cfg = check_metadata(metadata, path)
        sd = {k: read_tensor(f, k, path) for k in f.keys()}
    return sd, cfg, metadata


def _explain(e: OSError, path: str, nbytes: int) -> str:
    if e.errno == errno.ENOSPC:
        return (
            f"not enough free disk space to save {path} (needs about {nbytes / 2**30:.2f} GiB); "
            "free some space or choose another folder. No partial file was left."
        )
    return f"could not save {path} ({e}); no partial file was left."


def save_atomic(state_dict: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str]) -> None:
    """Write `state_dict` to `path` so that `path` is either the complete new file or untouched.

    The data goes to a hidden temp file in the same directory (os.replace is atomic only within one
    file system), is fsynced (so a crash cannot leave a renamed but empty file), then replaces `path`.
    Any failure, a full disk (ENOSPC) included, removes the temp file and raises SaveError.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    # Not tempfile.mkstemp: it creates mode 0600, and the renamed file would keep it. O_EXCL with a
    # random name gives the usual 0666-minus-umask and never clobbers another writer's temp file.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise SaveError(e.errno, _explain(e, path, nbytes)) from e
    done = False
    try:
        with os.fdopen(fd, "wb") as fh:
            write_safetensors(fh, state_dict, metadata)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        done = True
    except OSError as e:
        raise SaveError(e.errno, _explain(e, path, nbytes)) from e
    finally:
        if not done:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    # The file is complete and in place; failing to persist the rename only matters on a power cut.
    with contextlib.suppress(OSError):
        _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Persist the rename itself (POSIX); Windows cannot open a directory, and NTFS journals renames."""
    if os.name != "posix":
        return
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_quantized(state_dict: Mapping[str, torch.Tensor], path: str, cfg: QuantConfig, source: str) -> None:
    """save_atomic with our versioned metadata; `source` is e.g. `source_fingerprint(original_path)`."""
    save_atomic(state_dict, path, build_metadata(cfg, source))
