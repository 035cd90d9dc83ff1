"""LightningDataModule: prepare (encode + cache) once, then token-budget batches of cached codes.

Lightning wiring (checked against lightning 2.6):
- ``prepare_data`` runs on local rank 0 only, then every rank runs ``setup``, which calls
  ``prepare`` again: by then every clip is a cache hit, so it only re-reads metadata.
- The training sampler is already rank-aware: train with ``Trainer(use_distributed_sampler=False)``,
  or Lightning would try to re-instantiate the DataLoader around a DistributedSampler.
- Lightning's fit loop calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` at each epoch
  start; ``TokenBudgetBatchSampler.sampler`` is the sampler itself for that reason.
- ``state_dict`` is saved in every checkpoint under this class's name and ``load_state_dict`` is
  called on resume before ``train_dataloader``; the saved position is the number of batches the
  fit loop has finished, not what the sampler handed out (DataLoader workers prefetch ahead).
  Lightning still warns that the DataLoader "is not resumable" (it only looks for a stateful
  DataLoader); the resume is exact anyway.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from elise.config import conf_defaults
from elise.data.collate import collate
from elise.data.context import ContextBatchSampler, ContextPlanner, ContextSettings
from elise.data.dataset import CodesDataset, IndexDataset
from elise.data.items import PreparedData
from elise.data.sampler import TokenBudgetBatchSampler
from elise.data.shards import ClipIndex
from elise.text import build_tokenizer


def _get(cfg: Mapping[str, Any] | Any, key: str) -> Any:
    """``cfg[key]``, or the default of ``conf/data/default.yaml`` when missing or null."""
    value = cfg.get(key) if cfg is not None else None
    return conf_defaults("data/default").get(key) if value is None else value


class EliseDataModule(pl.LightningDataModule):
    """Train/val dataloaders over prepared examples.

    Args:
        data_cfg: the ``data`` config (dict or DictConfig): source keys for ``prepare`` plus
            ``max_tokens``, ``max_samples``, ``num_workers``, ``strict`` (defaults: conf/data/default.yaml),
            ``bucket_size`` (None: 32 * max_samples), ``pin_memory`` (None: when CUDA is available),
            ``context`` (``elise.data.context.ContextSettings``: p, max_segments, max_rows, loss_on;
            checked here, so a bad setting fails before any data or model is loaded).
        codec_cfg: keyword arguments of ``elise.codec.build_codec`` (``name`` included).
        tokenizer_spec: ``"bytes"`` or a tokenizer.json path (``elise.text.build_tokenizer``).
        seed: seed of the batch order (epoch ``e`` uses ``seed + e``).
    """

    def __init__(
        self,
        data_cfg: Mapping[str, Any] | Any,
        codec_cfg: Mapping[str, Any] | Any,
        tokenizer_spec: str = "bytes",
        seed: int = 0,
    ):
        super().__init__()
        self.data_cfg, self.codec_cfg, self.seed = data_cfg, codec_cfg, int(seed)
        self.tokenizer = build_tokenizer(tokenizer_spec)
        self.max_tokens = int(_get(data_cfg, "max_tokens"))
        self.max_samples = int(_get(data_cfg, "max_samples"))
        self.bucket_size = data_cfg.get("bucket_size") if data_cfg is not None else None
        self.num_workers = int(_get(data_cfg, "num_workers"))
        pin_memory = data_cfg.get("pin_memory") if data_cfg is not None else None
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.cache_ready = False  # prepare_data ran in this process (train.py calls it early)
        self.index_file: Path | None = None  # the clip index prepare_data wrote (shard store, data=codes)
        context = dict(conf_defaults("data/default").get("context") or {})
        context.update((data_cfg.get("context") if data_cfg is not None else None) or {})
        self.context = ContextSettings.from_cfg(context, self.max_tokens)
        self.prepared: PreparedData | None = None
        self.train_set: CodesDataset | None = None
        self.val_set: CodesDataset | None = None
        self.train_sampler: TokenBudgetBatchSampler | None = None
        self._pending_state: dict | None = None
        self._report: dict = {}

    # ---- preparation ---------------------------------------------------------------------

    def _codec(self) -> Any:
        """The codec, or None for pre-encoded data (``data=codes`` needs none)."""
        from elise.codec import build_codec  # lazy: Mimi pulls in moshi

        if self.data_cfg is not None and self.data_cfg.get("source") == "codes":
            return None
        codec_kwargs = dict(self.codec_cfg.items()) if self.codec_cfg is not None else {}
        return build_codec(**codec_kwargs)

    def _prepare(self, progress: bool) -> PreparedData:
        if self.data_cfg is not None and self.data_cfg.get("source") == "codes":
            from elise.data.codes import prepare_codes

            return prepare_codes(self.data_cfg, self.tokenizer, progress=progress)
        from elise.data.prepare import prepare

        strict = bool(_get(self.data_cfg, "strict"))
        return prepare(self.data_cfg, self._codec(), self.tokenizer, strict=strict, progress=progress)

    def _open_index(self) -> bool:
        """Shard store / pre-encoded data: open the clip index ``prepare_data`` wrote (memory-mapped:
        nothing per clip is read but the split and length columns). False for the npy store."""
        cfg = self.data_cfg if self.data_cfg is not None else {}
        if cfg.get("source") != "codes" and _get(cfg, "store") != "shards":
            return False
        path: Path | None
        if cfg.get("source") == "codes":
            from elise.data.codes import codes_index_path

            path = self.index_file or codes_index_path(cfg, self.tokenizer)
        else:
            from elise.data.prepare import find_index

            path = self.index_file or self._recall_index()
            path = path or find_index(self.data_cfg, self._codec(), self.tokenizer)
        assert path is not None
        if not path.with_suffix(".json").is_file():  # setup without prepare_data (tests, notebooks)
            path = self._prepare(progress=False).index
        assert path is not None
        index = ClipIndex(path)
        self.train_set, self.val_set = IndexDataset(index, "train"), IndexDataset(index, "val")
        self._report = dict(index.meta.get("report") or {})
        return True

    def _pointer(self) -> Path:
        from elise.data.prepare import index_pointer

        return index_pointer(self.data_cfg, dict(self.codec_cfg or {}), self.tokenizer)

    def _recall_index(self) -> Path | None:
        """The index this node's ``prepare_data`` wrote (named in ``index_pointer``), or None."""
        pointer = self._pointer()
        if not pointer.is_file():
            return None
        index = pointer.parent / json.loads(pointer.read_text(encoding="utf-8"))["index"]
        return index if index.with_suffix(".json").is_file() else None

    def prepare_data(self) -> None:
        """Encode and cache (once per process: a second call, Lightning's after train.py's, does nothing).
        State set here would not reach other ranks; ``setup`` reads the cache (the shard store's
        index through ``index_pointer``, so other ranks need not build the codec)."""
        if not self.cache_ready:
            prepared = self._prepare(progress=True)
            self.prepared = prepared if prepared.index is None else None  # setup reuses it (npy store)
            self._report = prepared.report
            self.index_file = prepared.index
            if prepared.index is not None and self.data_cfg.get("source") != "codes":
                from elise.data.report import write_json

                write_json(self._pointer(), {"index": prepared.index.name})
            if self.context.active:  # ContextError now, before the model is built
                self._planner(prepared.split("train"))
            self.cache_ready = True

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            if not self._open_index():
                if self.prepared is None:  # another rank: cache hits only after prepare_data
                    self._check_stream_store()
                    self.prepared = self._prepare(progress=False)
                self.train_set = CodesDataset(self.prepared.split("train"))
                self.val_set = CodesDataset(self.prepared.split("val"))
                self._report = self.prepared.report
            assert self.train_set is not None and self.val_set is not None
            if len(self.train_set) == 0 and stage in (None, "fit"):
                raise ValueError(f"no training examples left after preparation; report: {self._report}")
            if len(self.val_set) == 0 and stage in (None, "fit", "validate"):
                warnings.warn(
                    f"no validation clips ({len(self.train_set)} train): validation is skipped; hold some out "
                    "with data.val_fraction=<share, e.g. 0.05> or data.val_count=<clips>",
                    stacklevel=2,
                )

    @property
    def report(self) -> dict:
        """The preparation report (kept/skipped counts by reason), empty before preparation."""
        return self._report

    @property
    def speakers(self) -> dict[str, int]:
        """Speaker name -> id (the ``speaker=`` of synthesis), empty before preparation or when the
        source names no speakers (every clip is then speaker 0)."""
        return dict(self._report.get("speakers", {}))

    def _planner(self, examples: Any) -> ContextPlanner:
        planner = ContextPlanner(examples, self.context, seed=self.seed)
        planner.check()
        return planner

    # ---- loaders -------------------------------------------------------------------------

    def _check_stream_store(self) -> None:
        """A streamed source in the npy store keeps no index: each further rank would read the whole
        stream again (a full download per rank). Raises ValueError naming the fix."""
        cfg = dict(self.data_cfg or {})
        if cfg.get("streaming") and str(cfg.get("store") or "npy") == "npy" and self._world()[0] > 1:
            raise ValueError(
                "data.streaming=true on several ranks needs data.store=shards (with the npy store every rank "
                "would read the whole stream again)"
            )

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _sampler(self, dataset: CodesDataset, shuffle: bool) -> TokenBudgetBatchSampler:
        """Training (shuffle) with ``data.context.p > 0``: a ``ContextBatchSampler``."""
        replicas, rank = self._world()
        kwargs: dict[str, Any] = dict(
            max_tokens=self.max_tokens,
            max_samples=self.max_samples,
            shuffle=shuffle,
            seed=self.seed,
            bucket_size=self.bucket_size,
            num_replicas=replicas,
            rank=rank,
        )
        if shuffle and self.context.active:
            return ContextBatchSampler(dataset.lengths, self._planner(dataset), **kwargs)
        return TokenBudgetBatchSampler(dataset.lengths, **kwargs)

    def _loader(self, dataset: CodesDataset, sampler: TokenBudgetBatchSampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=functools.partial(collate, loss_on=self.context.loss_on),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        sampler = self._sampler(self.train_set, shuffle=True)
        if self.train_sampler is not None:  # a reloaded dataloader keeps its position
            sampler.load_state_dict(self.train_sampler.state_dict())
        if self._pending_state is not None:
            sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        self.train_sampler = sampler
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        if len(self.val_set) == 0:  # no val clips (warned in setup): Lightning skips validation
            return []
        return self._loader(self.val_set, self._sampler(self.val_set, shuffle=False))

    # ---- checkpoint state ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.train_sampler is None:
            return dict(self._pending_state or {})
        state = self.train_sampler.state_dict()
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn == "fit":
            # Batches the fit loop has trained on; the sampler itself may be ahead (prefetch).
            state["epoch"] = int(trainer.fit_loop.epoch_progress.current.processed)
            state["batches_yielded"] = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)
