"""Codec tests: shapes and frame counts, seeded determinism, identities, streaming == full decode,
invalid ids, and Mimi's real hub loading path exercised offline through a fake HF cache."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from elise.codec import CodecUnavailable, build_codec
from elise.codec import mimi as mimi_mod
from elise.codec.tiny import TinyCodec

CONF = Path(__file__).resolve().parents[2] / "elise" / "conf" / "codec"
SPF = 1920
REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"


def audio(batch: int, num_samples: int, seed: int = 0) -> torch.Tensor:
    """[B, 1, N] of varied test audio: noise plus a per-item chirp, seeded."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples) / 24_000  # [N]
    chirp = torch.stack([0.3 * torch.sin(2 * torch.pi * (110 + 90 * i) * t * (1 + t)) for i in range(batch)])
    return (chirp + 0.05 * torch.randn(batch, num_samples, generator=gen))[:, None]  # [B, 1, N]


def from_yaml(name: str, **overrides: object) -> object:
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), overrides)
    return build_codec(**OmegaConf.to_container(cfg))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core CI box, OpenMP threads under oversubscription spin and
    make Mimi 10x slower; one thread keeps these tests steady. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> TinyCodec:
    return from_yaml("tiny")


@pytest.fixture(scope="module")
def mimi_random():
    return from_yaml("mimi_random", batch_size=2)


@pytest.fixture(scope="module")
def wav6() -> torch.Tensor:
    return audio(2, 6 * SPF - 100, seed=1)  # [2, 1, 11420]: 6 frames, the last one partial


# ---------------------------------------------------------------- shapes and lengths, both codecs
@pytest.mark.parametrize("codec_name", ["tiny", "mimi_random"])
def test_shapes_and_frames(codec_name: str, request: pytest.FixtureRequest, wav6: torch.Tensor) -> None:
    codec = request.getfixturevalue(codec_name)
    codes, frames = codec.encode(wav6, torch.tensor([wav6.shape[-1], SPF + 1]))
    assert codes.shape == (2, 32, 6) and codes.dtype == torch.long
    assert frames.tolist() == [6, 2]  # ceil(11420 / 1920), ceil(1921 / 1920)
    assert int(codes.min()) >= 0 and int(codes.max()) < 2048
    assert codec.decode(codes).shape == (2, 1, 6 * SPF)
    assert codec.encode(wav6)[1].tolist() == [6, 6]  # lengths=None: the whole padded width
    assert codec.frames_for(SPF) == 1 and codec.frames_for(SPF + 1) == 2


@pytest.mark.parametrize(
    ("num_samples", "lengths", "t", "frames"),
    [(1, [1], 1, [1]), (SPF, [SPF], 1, [1]), (3 * SPF, [0, 2 * SPF], 3, [0, 2])],
)
def test_tiny_frame_counts(
    tiny: TinyCodec, num_samples: int, lengths: list[int], t: int, frames: list[int]
) -> None:
    codes, got = tiny.encode(torch.zeros(len(lengths), 1, num_samples), torch.tensor(lengths))
    assert codes.shape == (len(lengths), 32, t) and got.tolist() == frames


def test_bad_inputs_rejected(tiny: TinyCodec) -> None:
    with pytest.raises(ValueError, match=r"\[B, 1, N\]"):
        tiny.encode(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="lengths"):
        tiny.encode(torch.zeros(1, 1, 100), torch.tensor([101]))
    with pytest.raises(ValueError, match="unknown codec"):
        build_codec("nope")
    with pytest.raises(ValueError, match="unknown option"):
        build_codec("tiny", sead=1)


@pytest.mark.parametrize("codec_name", ["tiny", "mimi_random"])
def test_invalid_ids_rejected(codec_name: str, request: pytest.FixtureRequest) -> None:
    codec = request.getfixturevalue(codec_name)
    codes = torch.zeros(1, 32, 2, dtype=torch.long)
    for bad in (2048, 2050, -1):
        codes[0, 5, 1] = bad
        with pytest.raises(ValueError, match="valid ids are 0..2047"):
            codec.decode(codes)
        with pytest.raises(ValueError, match="valid ids"), codec.streaming_decoder(1) as step:
            step(codes)
    with pytest.raises(ValueError, match=r"\[B, 32, T\]"):
        codec.decode(torch.zeros(1, 31, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        codec.decode(torch.zeros(1, 32, 2))


# ---------------------------------------------------------------- tiny
def test_tiny_deterministic_and_seeded(tiny: TinyCodec, wav6: torch.Tensor) -> None:
    codes = tiny.encode(wav6)[0]
    assert torch.equal(TinyCodec(seed=0).encode(wav6)[0], codes)
    assert not torch.equal(TinyCodec(seed=1).encode(wav6)[0], codes)
    # a golden value pins the weights across processes and torch versions
    assert codes[0, :4, 0].tolist() == GOLDEN_TINY


def test_tiny_codes_vary(tiny: TinyCodec) -> None:
    wav = audio(1, 10 * 24_000)  # [1, 1, 240000]: 10 s
    codes, frames = tiny.encode(wav)
    assert codes.shape == (1, 32, 125) and frames.tolist() == [125]
    assert all(codes[0, k].unique().numel() > 20 for k in range(32))  # every level splits the frames


def test_tiny_streaming_matches_full(tiny: TinyCodec, wav6: torch.Tensor) -> None:
    codes = tiny.encode(wav6)[0]  # [2, 32, 6]
    with tiny.streaming_decoder(2) as step:
        streamed = torch.cat([step(codes[..., i : i + 2]) for i in range(0, 6, 2)], -1)  # [2, 1, 11520]
    torch.testing.assert_close(streamed, tiny.decode(codes))


def test_identities_differ() -> None:
    ids = {TinyCodec(seed=0).identity, TinyCodec(seed=1).identity, TinyCodec(dim=8).identity}
    assert len(ids) == 3 and TinyCodec(seed=0).identity == TinyCodec(seed=0).identity


# ---------------------------------------------------------------- mimi_random
def test_mimi_random_codes_vary_and_batching(mimi_random, wav6: torch.Tensor) -> None:
    assert mimi_random.random_weights and mimi_random.identity.startswith("mimi_random(v1,moshi=")
    assert mimi_random.identity.endswith(",seed=0,nq=32)")
    wav = audio(3, 20 * SPF, seed=2)  # [3, 1, 38400]; batch_size=2 -> two encode calls
    codes = mimi_random.encode(wav)[0]  # [3, 32, 20]
    assert codes[:, 0].unique().numel() > 5 and codes.unique().numel() > 200
    one_by_one = torch.cat([mimi_random.encode(wav[i : i + 1])[0] for i in range(3)])
    assert torch.equal(codes, one_by_one)
    # causal: right padding does not change the valid frames
    padded = mimi_random.encode(torch.nn.functional.pad(wav[:1], (0, 3 * SPF)))[0]  # [1, 32, 23]
    assert torch.equal(padded[..., :20], codes[:1])


def test_mimi_random_deterministic_and_warns(
    mimi_random, wav6: torch.Tensor, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mimi_mod, "_WARNED_RANDOM", False)
    with caplog.at_level(logging.WARNING, logger="elise.codec.mimi"):
        again = build_codec("mimi_random", seed=0)
        other = build_codec("mimi_random", seed=1)
    assert [r.message for r in caplog.records if "NOISE" in r.message] == [caplog.records[0].message]
    codes = mimi_random.encode(wav6)[0]
    assert torch.equal(again.encode(wav6)[0], codes)
    assert codes[0, :4, 0].tolist() == GOLDEN_MIMI_RANDOM  # same seed, same codes in any process
    assert not torch.equal(other.encode(wav6)[0], codes)
    assert other.identity != mimi_random.identity


def test_mimi_random_streaming_matches_full(mimi_random, wav6: torch.Tensor) -> None:
    codes = mimi_random.encode(wav6)[0]  # [2, 32, 6]
    full = mimi_random.decode(codes)  # [2, 1, 11520]
    for chunk in (1, 2):
        with mimi_random.streaming_decoder(2) as step:
            streamed = torch.cat([step(codes[..., i : i + chunk]) for i in range(0, 6, chunk)], -1)
        torch.testing.assert_close(streamed, full, atol=1e-5, rtol=1e-4)
    assert full.abs().max() > 1e-3  # not trivially equal because silent


# ---------------------------------------------------------------- mimi: the real loading path, offline
@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_mimi_loads_from_offline_hub_cache(mimi_random, hub_cache: Path, wav6: torch.Tensor) -> None:
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hub_cache / f"models--{REPO.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snap = repo_dir / "snapshots" / revision
    snap.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in mimi_random.model.state_dict().items()}  # moshi's real key names
    save_file(state, str(snap / MIMI_NAME))

    codec = from_yaml("mimi")  # weights: null -> hf_hub_download(repo, MIMI_NAME), resolved from the cache
    assert not codec.random_weights and MIMI_NAME in codec.identity and "sha256=" in codec.identity
    torch.testing.assert_close(codec.encode(wav6)[0], mimi_random.encode(wav6)[0], rtol=0, atol=0)
    assert codec.identity != mimi_random.identity
    # a local file with the same content has the same identity: cached codes stay valid
    assert build_codec("mimi", weights=str(snap / MIMI_NAME)).identity == codec.identity


def test_mimi_offline_empty_cache_is_clear_error(hub_cache: Path) -> None:
    with pytest.raises(CodecUnavailable) as err:
        build_codec("mimi")
    msg = str(err.value)
    assert "\n" not in msg and REPO in msg and MIMI_NAME in msg
    assert "codec.weights=" in msg and "codec=mimi_random" in msg


def test_mimi_bad_local_file(tmp_path: Path) -> None:
    with pytest.raises(CodecUnavailable, match="does not exist"):
        build_codec("mimi", weights=str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CodecUnavailable, match="cannot load Mimi weights") as err:
        build_codec("mimi", weights=str(bad))
    assert "\n" not in str(err.value)


def test_weights_hash_follows_content(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 10)
    first = mimi_mod.file_sha256(f)
    assert mimi_mod.file_sha256(f) == first
    f.write_bytes(b"b" * 11)  # new size (and mtime): the cached hash must not be reused
    assert mimi_mod.file_sha256(f) != first


GOLDEN_TINY = [984, 1975, 878, 1712]  # TinyCodec(seed=0), audio(2, 11420, seed=1), item 0, frame 0
GOLDEN_MIMI_RANDOM = [347, 1582, 1242, 1225]  # build_codec("mimi_random", seed=0), same audio


def test_mimi_encodes_while_its_streaming_decoder_is_open(mimi_random, wav6: torch.Tensor) -> None:
    """A server keeps the streaming decoder open for its life and encodes uploaded voices meanwhile:
    only the decoding side streams, so encoding an odd length gives the same codes as when closed."""
    odd = wav6[:1, :, :5000]  # not a multiple of Mimi's 1920-sample frame
    closed = mimi_random.encode(odd)[0]  # [1, 32, 3]
    with mimi_random.streaming_decoder(4) as step:
        assert torch.equal(mimi_random.encode(odd)[0], closed)
        assert step(closed.repeat(4, 1, 1)[..., :2]).shape == (4, 1, 2 * 1920)


def test_mimi_row_decoder_gives_each_row_its_solo_stream(mimi_random, wav6: torch.Tensor) -> None:
    """A server's rows: each row decodes only when it has frames, in its own chunks, and a reset row starts
    afresh; every row's audio equals its own streaming decode (batch 1), so idle rows cost nothing."""
    codes = mimi_random.encode(wav6)[0]  # [2, 32, 6]
    full = mimi_random.decode(codes)  # [2, 1, 6 * 1920]
    solo = []
    for b in range(2):
        with mimi_random.streaming_decoder(1) as step:
            solo.append(step(codes[b : b + 1])[0, 0])  # [6 * 1920]
    with mimi_random.row_decoder(3) as rows:
        rows.decode({2: codes[0, :, :2]})  # row 2 speaks first, then is reset for a new stream
        rows.reset(2)
        out = {0: [rows.decode({0: codes[0, :, :1]})[0]], 2: []}  # row 1 never decodes
        for start, stop in ((1, 3), (3, 6)):
            got = rows.decode({0: codes[0, :, start:stop], 2: codes[1, :, start - 1 : stop - 1]})
            out[0].append(got[0])
            out[2].append(got[2])
        out[2].append(rows.decode({2: codes[1, :, 5:]})[2])
        torch.testing.assert_close(mimi_random.decode(codes), full)  # a plain decode stays plain meanwhile
    torch.testing.assert_close(torch.cat(out[0]), solo[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(out[2]), solo[1], atol=1e-5, rtol=1e-4)
