"""``python -m elise.prepare data=sample codec=mimi_random``: encode a data source into the code cache.

Large sets: ``data.store=shards`` (Arrow shards + a clip index), ``prepare.num_workers=N`` decoding
processes, ``torchrun --nproc-per-node=K -m elise.prepare ...`` or ``prepare.shard=i
prepare.num_shards=n`` for disjoint slices (the last slice to finish writes the index);
``data=codes data.path=...`` indexes pre-encoded codes instead (no codec); ``data.streaming=true``
prepares a hub audio dataset (or parquet files) from the stream, without a full download.

Prints the bad-data report (also written to ``<cache_dir>/prepare_report.json``) and the cache
folder. Training reuses the cache, so running this first is optional but lets a long encoding job
run (and resume) on its own. A wrong path, an unavailable dataset or codec exits with code 2 and
one line on stderr.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from elise.codec import CodecUnavailable, build_codec
from elise.config import to_dict
from elise.data.items import PreparedData
from elise.data.prepare import prepare
from elise.data.sources import DataUnavailable
from elise.errors import exit_with
from elise.text import build_tokenizer

# What a user can cause and fix (paths, access, options); anything else is a bug and keeps its traceback.
USER_ERRORS = (DataUnavailable, CodecUnavailable, OSError, ValueError, ImportError, OmegaConfBaseException)


def slice_of(opts: dict) -> tuple[int, int]:
    """(shard, num_shards): ``prepare.shard``/``num_shards``, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    shard, num = opts.get("shard"), opts.get("num_shards")
    if num is None:
        num = int(os.environ.get("WORLD_SIZE", "1"))
        shard = int(os.environ.get("RANK", "0")) if shard is None else shard
    return int(shard or 0), int(num)


def run(cfg: DictConfig) -> PreparedData:
    """Build the tokenizer and codec named by ``cfg`` and prepare ``cfg.data`` (this run's slice)."""
    tokenizer = build_tokenizer(cfg.get("tokenizer"))
    opts = to_dict(cfg.prepare) if cfg.get("prepare") else {}
    shard, num_shards = slice_of(opts)
    if cfg.data.get("source") == "codes":
        from elise.data.codes import prepare_codes

        data = prepare_codes(cfg.data, tokenizer, progress=True)
        print(f"index of the pre-encoded codes: {data.index}")
        return data
    codec = build_codec(**to_dict(cfg.codec))
    workers = int(opts.get("num_workers") or 0)
    data = prepare(
        cfg.data, codec, tokenizer, progress=True, num_workers=workers, shard=shard, num_shards=num_shards
    )
    if data.examples or num_shards == 1:
        where = f"index: {data.index}" if data.index else f"report: {data.cache_dir}/prepare_report.json"
        print(f"codes cached in {data.cache_dir} ({where})")
    return data


def main(cfg: DictConfig) -> None:
    """``python -m elise.prepare``'s body: a user error is one line and exit code 2."""
    try:
        run(cfg)
    except USER_ERRORS as err:
        exit_with(err)


if __name__ == "__main__":
    from elise.cli import main as cli_main

    cli_main("prepare")
