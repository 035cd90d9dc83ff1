"""The one checkpoint reader/writer: elise Lightning ``.ckpt`` files and transformers "csm" directories.

Reading: every file goes through ``torch_load_checked`` (``torch.load(weights_only=True)``, or
safetensors): no pickled code is ever executed, and a bad file gets one line saying what it is
(empty, truncated or corrupt, not a checkpoint, contains pickled code). Writing:
``atomic_torch_save`` (tmp file + fsync + rename; ``AtomicCheckpointIO`` is Lightning's plugin for
it). ``open_resume`` turns ``ckpt_path=last`` into the newest readable file of a run, opened once.

An elise checkpoint holds, besides Lightning's own keys:

- ``hyper_parameters["model"]``: the CSMConfig as a dict of primitives (rebuilds the network);
- ``hyper_parameters["tokenizer"]``: ``"bytes"`` or the HF tokenizer spec it was trained with;
- ``hyper_parameters["codec"]``: the codec it was trained on (``elise.codec.codec_identity``);
- ``hyper_parameters["speakers"]``: speaker name -> id of its training data;
- ``elise_tokenizer_json`` (optional): the full ``tokenizer.json`` text of an HF tokenizer;
- ``state_dict``: the LightningModule's, with the CSM under the ``model.`` prefix.

A LoRA checkpoint (``lora=...``, ``elise.model.lora``) holds only the adapters in its ``state_dict``,
``hyper_parameters["lora"]`` (rank, alpha, dropout, targets) and ``hyper_parameters["lora_base"]``:
the path and sha256 (``weights_sha256``) of the weights it was trained on. ``load_model`` loads that
base (or ``base=``), refuses one whose hash differs, and returns the merged model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from elise.checkpoint_error import CheckpointError
from elise.interop import read_transformers_dir
from elise.model import CSM, build_model
from elise.text import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."


@dataclass
class Loaded:
    model: CSM
    tokenizer: Tokenizer
    source: str  # "elise" | "transformers"
    meta: dict[str, Any] = field(default_factory=dict)
    # The codec the model was trained on: {"name", "config", "weights_sha256"}; None when not recorded.
    codec: dict[str, Any] | None = None
    speakers: dict[str, int] = field(default_factory=dict)  # speaker name -> id, as trained


# ---- reading files --------------------------------------------------------------------------------
def torch_load_checked(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; ``CheckpointError`` with one line saying what the file is."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory without config.json + model.safetensors")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted save or copy")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head.startswith(b"PK")
    if not is_zip and not head.startswith(b"\x80"):  # torch files are zips (new) or pickles (legacy)
        raise CheckpointError(f"{path} is not a checkpoint (neither a torch zip file nor a pickle)")
    if is_zip and not _zip_complete(path):
        raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes; an interrupted save or copy?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found or not is_zip:
            what = found.group(1) if found else "objects that are not plain data"
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled code ({what}); elise reads only plain "
                "tensors and data"
            ) from err
        raise CheckpointError(f"{path} is truncated or corrupt (unpickling failed)") from err
    except Exception as err:  # truncated/garbage files raise many types (RuntimeError, EOFError, KeyError)
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__})") from err


def _zip_complete(path: Path) -> bool:
    """The zip's central directory is there and every member is inside the file."""
    try:
        with zipfile.ZipFile(path) as z:
            size = path.stat().st_size
            return all(i.header_offset + i.compress_size <= size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict (weights loaded); one-line ``CheckpointError`` for the usual failures."""
    ckpt = torch_load_checked(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an elise checkpoint (no state_dict)")
    return ckpt


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Open a training checkpoint memory-mapped (weights not read) and check it is Lightning's."""
    ckpt = torch_load_checked(path, mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no state_dict / global_step)")
    return ckpt


def resolve_ckpt_path(spec: str | None, run_dir: Path) -> str | None:
    """``None``, a checkpoint file, or ``"last"``: the newest readable ``.ckpt`` under the run dir."""
    found = open_resume(spec, run_dir)
    return found[0] if found else None


def open_resume(spec: str | None, run_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """``ckpt_path``'s file and its checkpoint, opened once (memory-mapped: weights are read when used).

    ``spec``: ``None``, a checkpoint file, or ``"last"``: the newest readable ``.ckpt`` under the run
    dir. Every candidate is opened with ``weights_only=True`` before Lightning sees it (a file holding
    pickled code is refused with ``CheckpointError``). With ``last``, a truncated or corrupt newest
    file is reported in one warning line and the previous one is used; temporary files of an
    interrupted save (``.<name>.<pid>.tmp``) never match ``*.ckpt``. ``AtomicCheckpointIO.hold`` hands
    the opened checkpoint to Lightning, so a resume reads the file once.
    """
    if spec is None:
        return None
    if str(spec) == "last":
        found = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        if not found:
            raise CheckpointError(
                f"ckpt_path=last: no checkpoint under {run_dir} (set hydra.run.dir to the run to resume)"
            )
        for newer, path in enumerate(found):
            try:
                return str(path), inspect_checkpoint(path)
            except CheckpointError as err:
                if newer + 1 < len(found):
                    log.warning("ckpt_path=last: skipping %s (%s)", path, err)
                    continue
                raise CheckpointError(
                    f"ckpt_path=last: no readable checkpoint under {run_dir} ({err})"
                ) from err
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={spec}: no such checkpoint file")
    return str(path), inspect_checkpoint(path)


# ---- writing files --------------------------------------------------------------------------------
def atomic_torch_save(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``.<name>.<pid>.tmp`` next to ``path``, fsync, rename, fsync the directory.

    A crash, a kill or a full disk leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass


def _atomic_checkpoint_io() -> type:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Local checkpoints saved with ``atomic_torch_save``.

        Lightning's own save (``_atomic_save``) goes through an fsspec transaction whose temporary
        file lives in the system temp dir: on another filesystem the final "rename" is a copy (a
        kill mid-copy leaves a partial ``.ckpt``), nothing is fsynced, and the whole checkpoint
        must fit in /tmp. Remote paths (``s3://``...) keep Lightning's behaviour.
        """

        held: tuple[str, dict[str, Any]] | None = None  # ``hold``: a checkpoint opened already

        def save_checkpoint(
            self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
        ) -> None:
            if storage_options is not None or "://" in str(path):
                super().save_checkpoint(checkpoint, path, storage_options)
                return
            atomic_torch_save(checkpoint, path)

        def hold(self, path: str, checkpoint: dict[str, Any]) -> None:
            """Give Lightning ``checkpoint`` (``open_resume``'s) when it loads ``path``, once: no second read."""
            self.held = (str(path), checkpoint)

        def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
            held, self.held = self.held, None
            if held is not None and held[0] == str(path):
                return held[1]
            return super().load_checkpoint(path, *args, **kwargs)

    return AtomicCheckpointIO


def __getattr__(name: str) -> Any:
    """``AtomicCheckpointIO`` is built on first use: it needs Lightning, which synthesis never imports."""
    if name == "AtomicCheckpointIO":
        cls = _atomic_checkpoint_io()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- models ---------------------------------------------------------------------------------------
def tokenizer_from_checkpoint(ckpt: dict[str, Any]) -> Tokenizer:
    if ckpt.get("elise_tokenizer_json"):
        return HFTokenizer.from_json(ckpt["elise_tokenizer_json"])
    spec = ckpt.get("hyper_parameters", {}).get("tokenizer", "bytes")
    return build_tokenizer(spec)


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file, or of a transformers directory's config.json + *.safetensors (names
    and contents, sorted): what a LoRA checkpoint records of its base.

    Cached by path, size, modification time, inode and change time of every file hashed, in memory
    and in ``<ELISE_CACHE_DIR>/weights_sha256.json``: a base of a few GB is read once, not at every
    load of one of its LoRA checkpoints."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted([path / "config.json", *path.glob("*.safetensors")])
    stamp = json.dumps([[str(f), *_stat(f)] for f in files])
    cached = _SHA_CACHE.get(stamp) or _sha_file_cache().get(stamp)
    if cached:
        _SHA_CACHE[stamp] = cached
        return cached
    digest = hashlib.sha256()
    for f in files:
        if path.is_dir():
            digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    _SHA_CACHE[stamp] = digest.hexdigest()
    _remember_sha(stamp, digest.hexdigest())
    return digest.hexdigest()


_SHA_CACHE: dict[
    str, str
] = {}  # json [[file, size, mtime_ns, dev, ino, ctime_ns], ...] -> sha256, this process
SHA_CACHE_ENTRIES = 64  # the on-disk cache keeps the newest ones


def _stat(path: Path) -> list[int]:
    # size + mtime alone match a different base of the same architecture copied over the path with its
    # mtime kept (cp -p, rsync -a, tar x); the inode and ctime change with any such replacement
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns]


def sha_cache_file() -> Path:
    """``weights_sha256.json`` next to the kernel timings (``$ELISE_CACHE_DIR``, else ``~/.cache/elise``)."""
    from elise.model.kernels import cache_file

    return cache_file().with_name("weights_sha256.json")


def _sha_file_cache() -> dict[str, str]:
    try:
        found = json.loads(sha_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, unreadable or half-written: hash again
        return {}
    return found if isinstance(found, dict) else {}


def _remember_sha(stamp: str, sha: str) -> None:
    entries = {k: v for k, v in _sha_file_cache().items() if k != stamp}
    entries = dict(list(entries.items())[-(SHA_CACHE_ENTRIES - 1) :]) | {stamp: sha}
    path = sha_cache_file()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:  # a read-only home: the in-memory cache still serves this process
        log.debug("cannot write %s: %s", path, err)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _lora_base(path: str | Path, hp: dict[str, Any], base: str | Path | None, map_location: Any) -> Loaded:
    """The base a LoRA checkpoint adapts: ``base`` or the recorded path, whose sha256 must match the record."""
    record = hp.get("lora_base") or {}
    named = str(base or record.get("path") or "")
    base_path = Path(named).expanduser()
    if not named or not base_path.exists():
        raise CheckpointError(
            f"{path} is a LoRA checkpoint whose base {record.get('path')} is not found: pass base=<its base "
            "checkpoint or transformers directory>"
        )
    found = weights_sha256(base_path)
    if record.get("sha256") and found != record["sha256"]:
        raise CheckpointError(
            f"base {base_path} has sha256 {found[:12]}..., but {path} was trained on {record.get('path')} "
            f"(sha256 {record['sha256'][:12]}...): pass base=<that base>"
        )
    loaded = load_model(base_path, map_location)
    loaded.meta["lora"] = {"base": str(base_path), "sha256": found, "config": hp["lora"]}
    return loaded


def load_elise_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", base: str | Path | None = None
) -> Loaded:
    """An elise checkpoint. A LoRA one (``hyper_parameters["lora"]``) holds the adapters only: they go
    onto its base (``_lora_base``) and are merged; every other key must match exactly."""
    from elise.model.lora import LoRAConfig, add_lora, is_lora_key, merge_lora

    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") or {}
    if "model" not in hp:
        raise CheckpointError(f"{path} has no model config in hyper_parameters: not an elise checkpoint")
    lora = hp.get("lora")
    under = _lora_base(path, hp, base, map_location) if lora else None
    if under is not None:
        model = add_lora(under.model, LoRAConfig.from_dict(hp["lora"]))
    else:
        model = build_model(dict(hp["model"]))
    state = {k[len(MODEL_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if lora:  # the base weights come from the base, not the file
        missing = [k for k in missing if is_lora_key(k)]
    if missing or unexpected:
        what = (
            f"adapters do not match lora={lora} on this base"
            if lora
            else "weights do not match the model config"
        )
        raise CheckpointError(f"{path}: {what} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    meta = {"global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"), "hyper_parameters": hp}
    if under is not None:
        merge_lora(model)
        meta["lora"] = under.meta["lora"]
    codec = hp.get("codec") or (under.codec if under else None)
    speakers = hp.get("speakers") or (under.speakers if under else {})
    own_tokenizer = under is None or ckpt.get("elise_tokenizer_json")
    return Loaded(
        model.to(map_location).eval(),
        tokenizer_from_checkpoint(ckpt) if own_tokenizer or under is None else under.tokenizer,
        "elise",
        meta,
        codec=dict(codec) if codec else None,
        speakers={str(k): int(v) for k, v in dict(speakers).items()},
    )


def load_transformers_dir(path: str | Path, map_location: str | torch.device = "cpu") -> Loaded:
    """A transformers "csm" directory (translated by ``elise.interop``) with its ``elise.json`` record."""
    path = Path(path)
    model, hf_tokenizer, config, record = read_transformers_dir(path)
    tokenizer: ByteTokenizer | HFTokenizer
    if hf_tokenizer is not None:
        tokenizer = hf_tokenizer
    else:
        if model.cfg.text_vocab_size != ByteTokenizer.vocab_size:
            raise CheckpointError(
                f"{path} has no tokenizer.json and its text table has {model.cfg.text_vocab_size} ids "
                f"(not the {ByteTokenizer.vocab_size}-id byte tokenizer's): pass tokenizer=<tokenizer.json>"
            )
        tokenizer = ByteTokenizer()
    codec = record.get("codec")
    return Loaded(
        model.to(map_location).eval(),
        tokenizer,
        "transformers",
        {"config": config, "path": str(path)},
        codec=dict(codec) if codec else None,
        speakers={str(k): int(v) for k, v in (record.get("speakers") or {}).items()},
    )


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", base: str | Path | None = None
) -> Loaded:
    """Load an elise ``.ckpt`` file or a transformers "csm" directory (config.json + model.safetensors).

    A LoRA checkpoint comes back merged into its base: ``base``, else the path it records."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return load_transformers_dir(path, map_location)
    return load_elise_checkpoint(path, map_location, base)


__all__ = [
    "CheckpointError",
    "Loaded",
    "atomic_torch_save",
    "inspect_checkpoint",
    "load_model",
    "open_resume",
    "read_checkpoint",
    "resolve_ckpt_path",
    "torch_load_checked",
    "weights_sha256",
]
