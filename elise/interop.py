"""elise <-> transformers "csm" directories (``CsmForConditionalGeneration.save_pretrained`` layout).

A directory holds ``config.json`` + ``model.safetensors`` (or a sharded index) + tokenizer files,
as Marvis TTS and Sesame CSM are published. Loading ignores the codec weights in it; exporting
writes the backbone/decoder/embedding/head weights under transformers' names so that
``CsmForConditionalGeneration.from_pretrained`` finds every one of them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from elise.checkpoint_error import CheckpointError
from elise.model import CSM, CSMConfig, TransformerConfig, build_model
from elise.text import ByteTokenizer, HFTokenizer, Tokenizer

log = logging.getLogger(__name__)

# (elise prefix, transformers prefix); block internals share names (layers.{i}.self_attn.q_proj ...)
KEY_MAP = [
    ("text_embeddings.", "embed_text_tokens."),
    ("audio_embeddings.", "backbone_model.embed_tokens.embed_audio_tokens."),
    ("backbone.", "backbone_model."),
    ("codebook0_head.", "lm_head."),
    ("projection.", "depth_decoder.model.inputs_embeds_projector."),
    ("decoder.", "depth_decoder.model."),
    ("audio_head", "depth_decoder.codebooks_head.weight"),
]
TIED_DECODER_EMBEDDINGS = "depth_decoder.model.embed_tokens.weight"
ELISE_JSON = "elise.json"  # what elise records beside the transformers files: codec, speakers
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def to_transformers_key(key: str) -> str:
    for ours, theirs in KEY_MAP:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(key)


def from_transformers_key(key: str) -> str | None:
    """elise name of a transformers key; None for keys elise does not hold (codec, tied copies)."""
    if key.startswith("codec_model."):
        return None
    if key == TIED_DECODER_EMBEDDINGS:  # saved instead of the (tied) backbone table by save_pretrained
        return "audio_embeddings.weight"
    for ours, theirs in sorted(KEY_MAP, key=lambda kv: -len(kv[1])):  # longest prefix first
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


# ---- config ---------------------------------------------------------------------------------------
def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, float] | None]:
    """(theta, llama3 scaling) from either transformers 5 ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 500_000.0)))
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type") == "llama3" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        return theta, {k: float(scaling[k]) for k in LLAMA3_KEYS}
    return theta, None


def _stack(cfg: dict[str, Any]) -> TransformerConfig:
    theta, scaling = _rope(cfg)
    heads = cfg["num_attention_heads"]
    return TransformerConfig(
        num_layers=cfg["num_hidden_layers"],
        dim=cfg["hidden_size"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        mlp_hidden=cfg["intermediate_size"],
        max_seq_len=cfg["max_position_embeddings"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_base=theta,
        rope_scaling=scaling,
    )


def config_from_transformers(cfg: dict[str, Any]) -> CSMConfig:
    if cfg.get("model_type") != "csm":
        raise CheckpointError(f"config.json has model_type {cfg.get('model_type')!r}, expected 'csm'")
    return CSMConfig(
        backbone=_stack(cfg),
        decoder=_stack(cfg["depth_decoder_config"]),
        text_vocab_size=cfg["text_vocab_size"],
        audio_vocab_size=cfg.get("vocab_size", 2051),
        num_codebooks=cfg.get("num_codebooks", 32),
    )


def _stack_to_transformers(t: TransformerConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": t.rope_base}
    if t.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": t.rope_base, **t.rope_scaling}
    return {
        "num_hidden_layers": t.num_layers,
        "hidden_size": t.dim,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "intermediate_size": t.mlp_hidden,
        "max_position_embeddings": t.max_seq_len,
        "rms_norm_eps": t.norm_eps,
        "rope_parameters": rope,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def config_to_transformers(
    cfg: CSMConfig, tokenizer: Tokenizer | None = None, codec_config=None
) -> dict[str, Any]:
    """A ``CsmConfig`` dict for ``cfg`` (via transformers when installed, so defaults are filled in)."""
    from transformers import CsmConfig

    bos = getattr(tokenizer, "bos_id", None)
    backbone = _stack_to_transformers(cfg.backbone)
    decoder = {
        **_stack_to_transformers(cfg.decoder),
        "num_codebooks": cfg.num_codebooks,
        "backbone_hidden_size": cfg.backbone.dim,
        "vocab_size": cfg.audio_vocab_size,
    }
    kwargs: dict[str, Any] = dict(
        **backbone,
        num_codebooks=cfg.num_codebooks,
        vocab_size=cfg.audio_vocab_size,
        text_vocab_size=cfg.text_vocab_size,
        depth_decoder_config=decoder,
        tie_codebooks_embeddings=True,
    )
    if codec_config is not None:
        kwargs["codec_config"] = codec_config
    if bos is not None:
        kwargs["bos_token_id"] = bos
    kwargs.update(_text_token_ids(tokenizer))
    out = CsmConfig(**kwargs).to_dict()
    if codec_config is None:  # CsmConfig fills in a random Mimi: a model of another codec gets none
        out.pop("codec_config", None)
    out["architectures"] = ["CsmForConditionalGeneration"]
    return out


def _text_token_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    """pad/eos/audio token ids of the text vocabulary: CsmConfig's defaults are Llama-3 ids (128002...),
    out of range for a smaller vocabulary (transformers then warns on every load)."""
    ids: dict[str, int | None] = {}  # no eos_token_id: CSM's generate stops on the codebook EOS frame
    if isinstance(tokenizer, HFTokenizer):
        pad = tokenizer.token_to_id("<|finetune_right_pad_id|>")
        ids["pad_token_id"] = pad if pad is not None else tokenizer.token_to_id("<pad>")
        ids["audio_token_id"] = tokenizer.token_to_id("<|AUDIO|>")
        ids["audio_eos_token_id"] = tokenizer.token_to_id("<|audio_eos|>")
    else:  # the byte tokenizer: no audio placeholder tokens
        ids.update(pad_token_id=ByteTokenizer.pad_id, audio_token_id=None, audio_eos_token_id=None)
    return ids


# ---- weights --------------------------------------------------------------------------------------
def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(single)
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_file(path / f))
            return state
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(
            f"unreadable weights in {path}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    raise CheckpointError(f"{path} has config.json but no model.safetensors (or index)")


def _check_tied(raw: dict[str, Any], weights: dict[str, torch.Tensor], path: Path) -> None:
    """elise has one audio embedding table for the backbone and the depth decoder: refuse two different ones."""
    backbone = weights.get("backbone_model.embed_tokens.embed_audio_tokens.weight")
    decoder = weights.get(TIED_DECODER_EMBEDDINGS)
    if backbone is None or decoder is None:
        return  # one table saved: tied (save_pretrained drops the copy)
    if backbone.shape != decoder.shape or not torch.equal(backbone, decoder):
        tied = raw.get("tie_codebooks_embeddings", True)
        raise CheckpointError(
            f"{path}: the backbone and depth-decoder audio embedding tables differ "
            f"(tie_codebooks_embeddings={tied}); elise shares one table and will not pick one"
        )


def read_transformers_dir(path: str | Path) -> tuple[CSM, HFTokenizer | None, dict[str, Any], dict[str, Any]]:
    """(model, tokenizer or None when the directory has no tokenizer.json, config.json, elise.json record).

    Codec weights in the directory are not read (elise's codecs are built by name).
    """
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable {path / 'config.json'}: {e}") from e
    cfg = config_from_transformers(raw)
    model = build_model(cfg)
    weights = _read_weights(path)
    _check_tied(raw, weights, path)
    state = {}
    for key, value in weights.items():
        ours = from_transformers_key(key)
        if ours is not None:
            state[ours] = value.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = HFTokenizer(path / "tokenizer.json", raw.get("bos_token_id"), raw.get("eos_token_id"))
    record: dict[str, Any] = {}
    if (path / ELISE_JSON).is_file():
        try:
            record = dict(json.loads((path / ELISE_JSON).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"unreadable {path / ELISE_JSON}: {type(e).__name__}") from e
    return model, tokenizer, raw, record


def export_transformers_dir(
    model: CSM,
    tokenizer: Tokenizer,
    out: str | Path,
    codec_config: dict[str, Any] | None = None,
    codec_state: dict[str, torch.Tensor] | None = None,
    record: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``model`` as a transformers "csm" directory; returns the files written.

    Always: config.json, model.safetensors, tokenizer.json, elise.json (``record``: codec identity and
    speakers). With ``codec_state`` (a transformers ``MimiModel`` state dict, ``mimi_to_transformers``)
    the codec weights go in as ``codec_model.*`` and the processor files are written, so that
    ``AutoProcessor.from_pretrained(out)`` and ``generate(..., output_audio=True)`` work. Every file
    gets the mode a plain ``open()`` gives (``0o666 & ~umask``); other files in ``out`` are left alone.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".export-{os.getpid()}"  # the files written, apart from any already in ``out``
    stage.mkdir(exist_ok=True)
    try:
        _write_dir(model, tokenizer, stage, codec_config, codec_state, record)
        mode = 0o666 & ~_umask()  # what a plain open() gives; safetensors writes 0600
        files = []
        for written in sorted(p for p in stage.iterdir() if p.is_file()):
            os.chmod(written, mode)
            files.append(out / written.name)
            os.replace(written, files[-1])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_dir(
    model: CSM,
    tokenizer: Tokenizer,
    out: Path,
    codec_config: dict[str, Any] | None,
    codec_state: dict[str, torch.Tensor] | None,
    record: dict[str, Any] | None,
) -> None:
    state = {to_transformers_key(k): v.detach().float().contiguous() for k, v in model.state_dict().items()}
    state[TIED_DECODER_EMBEDDINGS] = state["backbone_model.embed_tokens.embed_audio_tokens.weight"].clone()
    for key, value in (codec_state or {}).items():
        state["codec_model." + key] = value.detach().float().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = config_to_transformers(model.cfg, tokenizer, codec_config)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tok_json = tokenizer.json if isinstance(tokenizer, HFTokenizer) else byte_tokenizer_json()
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    (out / ELISE_JSON).write_text(json.dumps(record or {}, indent=2, sort_keys=True), encoding="utf-8")
    if codec_state is not None:
        _write_processor(out, tokenizer)


def _write_processor(out: Path, tokenizer: Tokenizer) -> None:
    """preprocessor_config.json, processor and tokenizer configs: what ``AutoProcessor`` reads."""
    from transformers import CsmProcessor, EncodecFeatureExtractor, PreTrainedTokenizerFast

    specials = {}
    ids = {"bos": getattr(tokenizer, "bos_id", None), "eos": getattr(tokenizer, "eos_id", None)}
    ids["pad"] = _text_token_ids(tokenizer)["pad_token_id"]
    for role in ("bos", "eos", "pad"):
        token_id = ids[role]
        if token_id is not None:
            specials[f"{role}_token"] = _token(tokenizer, token_id)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), **specials)
    features = EncodecFeatureExtractor(feature_size=1, sampling_rate=24_000)
    CsmProcessor(features, fast).save_pretrained(out)
    features.save_pretrained(out)  # preprocessor_config.json, for readers of the feature extractor alone


def _token(tokenizer: Tokenizer, token_id: int) -> str:
    if isinstance(tokenizer, HFTokenizer):
        return str(tokenizer.id_to_token(token_id))
    return {ByteTokenizer.bos_id: "<s>", ByteTokenizer.eos_id: "</s>", ByteTokenizer.pad_id: "<pad>"}[
        token_id
    ]


def byte_tokenizer_json() -> str:
    """The byte-level tokenizer as an HF ``tokenizer.json`` (same ids: 1 BOS, 2 EOS, byte b -> b + 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {
        "<pad>": 0,
        "<s>": 1,
        "</s>": 2,
        **{byte_to_char[b]: b + ByteTokenizer.offset for b in range(256)},
    }
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    return tok.to_str()


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenization produces)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


# ---- the Mimi codec (moshi layout -> transformers MimiModel layout) -------------------------------
# substring renames, applied in order (moshi's names on the left, transformers' on the right)
MIMI_RENAMES = [
    ("conv.conv.conv", "conv"),
    ("convtr.convtr.convtr", "conv"),
    ("conv.conv", "conv"),
    ("convtr.convtr", "conv"),
    ("quantizer.rvq_first.vq", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_first", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_rest.vq", "quantizer.acoustic_residual_vector_quantizer"),
    ("quantizer.rvq_rest", "quantizer.acoustic_residual_vector_quantizer"),
    ("_codebook", "codebook"),
    ("_initialized", "initialized"),
    ("embedding_sum", "embed_sum"),
    ("encoder.model", "encoder.layers"),
    ("decoder.model", "decoder.layers"),
    ("encoder_transformer.transformer", "encoder_transformer"),
    ("decoder_transformer.transformer", "decoder_transformer"),
    ("linear1", "mlp.fc1"),
    ("linear2", "mlp.fc2"),
    ("self_attn.out_proj", "self_attn.o_proj"),
    ("self_attn.o_projs.0", "self_attn.o_proj"),  # moshi >= 0.2 keeps one projection per context
    ("self_attn.in_projs.0.weight", "self_attn.in_proj_weight"),
    ("norm1", "input_layernorm"),
    ("norm2", "post_attention_layernorm"),
    ("layer_scale_1", "self_attn_layer_scale"),
    ("layer_scale_2", "mlp_layer_scale"),
]
# then transformers >= 5 nests the parts under encoder./decoder. (prefix renames)
MIMI_PREFIXES = [
    ("encoder.layers.", "encoder.encoder_seanet.layers."),
    ("decoder.layers.", "decoder.decoder_seanet.layers."),
    ("encoder_transformer.", "encoder.encoder_transformer."),
    ("decoder_transformer.", "decoder.decoder_transformer."),
    ("downsample.", "encoder.downsample."),
    ("upsample.", "decoder.upsample."),
]


def mimi_to_transformers(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A moshi ``MimiModel`` state dict under transformers' ``MimiModel`` names.

    moshi's fused ``in_proj_weight`` is split into q/k/v, and q/k rows are permuted from moshi's
    interleaved rotary layout to transformers' rotate-half layout.
    """
    head_dim = config.head_dim
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        for old, new in MIMI_RENAMES:
            name = name.replace(old, new)
        name = next((new + name[len(old) :] for old, new in MIMI_PREFIXES if name.startswith(old)), name)
        if "in_proj_weight" not in name:
            out[name] = value
            continue
        q, k, v = value.chunk(3)  # [H * Dh, dim] each (Mimi's transformers have as many kv as q heads)
        out[name.replace("in_proj_weight", "q_proj.weight")] = _rotate_half_rows(q, head_dim)
        out[name.replace("in_proj_weight", "k_proj.weight")] = _rotate_half_rows(k, head_dim)
        out[name.replace("in_proj_weight", "v_proj.weight")] = v
    return out


def _rotate_half_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head reordered from interleaved pairs (x0, x1), (x2, x3)... to halves."""
    rows, cols = w.shape
    heads = rows // head_dim
    return w.view(heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
