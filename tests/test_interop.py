"""elise == transformers CsmForConditionalGeneration on the same weights (the numerical reference)."""

from __future__ import annotations

import json

import pytest
import torch

from elise.checkpoints import CheckpointError, load_model, load_transformers_dir
from elise.generate import SamplingConfig, generate
from elise.interop import byte_tokenizer_json, export_transformers_dir
from elise.layout import NUM_CODEBOOKS, pad_rows, segment_rows
from elise.model.loss import csm_loss
from elise.text import ByteTokenizer, HFTokenizer

transformers = pytest.importorskip("transformers")
ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SPARE = [2048, 2049, 2050]


def tiny_csm_config():
    mimi = transformers.MimiConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=64,
        num_filters=8,
        codebook_dim=16,
        num_quantizers=32,
        vector_quantization_hidden_dimension=16,
        upsample_groups=64,
    )
    decoder = dict(
        num_hidden_layers=2,
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        backbone_hidden_size=64,
        rope_parameters=ROPE,
        num_codebooks=32,
        vocab_size=2051,
    )
    return transformers.CsmConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        text_vocab_size=259,
        rope_parameters=ROPE,
        depth_decoder_config=decoder,
        codec_config=mimi.to_dict(),
        bos_token_id=1,
        pad_token_id=0,
        audio_token_id=3,
        audio_eos_token_id=4,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A seeded tiny random transformers CSM saved as a directory, and elise's load of it."""
    torch.manual_seed(0)
    ref = transformers.CsmForConditionalGeneration(tiny_csm_config()).eval()
    with torch.no_grad():  # larger heads than the 0.02 init so argmaxes are well separated
        ref.lm_head.weight.normal_(std=1.0)
        ref.depth_decoder.codebooks_head.weight.normal_(std=1.0)
    path = tmp_path_factory.mktemp("csm")
    ref.save_pretrained(path)
    (path / "tokenizer.json").write_text(byte_tokenizer_json())
    return ref, path, load_model(path)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for frames, text in ((6, 5), (3, 8)):
        codes = torch.randint(1, 2048, (NUM_CODEBOOKS, frames), generator=g)
        rows.append(segment_rows(torch.randint(3, 259, (text,), generator=g).tolist(), codes))
    return pad_rows(rows)


def reference_embeddings(ref, tokens, mask):
    """transformers' own embedding modules: text rows -> embed_text_tokens, audio rows -> summed codebooks."""
    text = ref.embed_text_tokens(tokens[..., 32])
    audio = ref.backbone_model.embed_tokens(tokens[..., :32])
    is_audio = mask[..., :32].any(-1, keepdim=True)
    is_text = mask[..., 32:33]
    return torch.where(is_audio, audio, torch.where(is_text, text, torch.zeros_like(text)))


def test_directory_loads_with_tokenizer(reference):
    _, _, loaded = reference
    assert loaded.source == "transformers"
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert loaded.model.cfg.backbone.rope_scaling["factor"] == 32.0


def test_logits_and_loss_equal_transformers(reference):
    ref, _, loaded = reference
    model = loaded.model
    tokens, mask = batch()
    with torch.no_grad():
        emb = reference_embeddings(ref, tokens, mask)
        torch.testing.assert_close(model.embed_rows(tokens, mask), emb, atol=1e-5, rtol=1e-5)
        h_ref = ref.backbone_model(inputs_embeds=emb).last_hidden_state
        h = model.backbone_hidden(tokens, mask)
        real = mask.any(-1)  # compare real rows (pad rows differ only by masking convention)
        torch.testing.assert_close(
            model.codebook0_head(h)[real], ref.lm_head(h_ref)[real], atol=1e-4, rtol=1e-4
        )

        codes = tokens[0, 6:12, :32]  # frames; decoder input [h, c0..c30]
        ids = torch.nn.functional.pad(codes[:, :-1], (1, 0))
        dd = ref.depth_decoder(input_ids=ids, backbone_last_hidden_state=h_ref[0, 5:11]).logits
        torch.testing.assert_close(model.decoder_logits(h[0, 5:11], codes), dd, atol=1e-4, rtol=1e-4)

        labels = torch.where(mask[:, :, :32], tokens[:, :, :32], torch.full_like(tokens[:, :, :32], -100))
        out = ref(inputs_embeds=emb, labels=labels)
        ours = csm_loss(model, tokens, mask, decoder_fraction=1.0)
    torch.testing.assert_close(ours.backbone_loss, out.backbone_loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.decoder_loss, out.depth_decoder_loss, atol=1e-4, rtol=1e-5)


def reference_greedy(ref, text_ids, frames):
    out = ref.generate(
        input_ids=torch.tensor([text_ids]),
        max_new_tokens=frames,
        do_sample=False,
        depth_decoder_do_sample=False,
        suppress_tokens=SPARE,
        depth_decoder_suppress_tokens=SPARE,
    )
    return out[0].t()  # [32, F]


def test_greedy_generation_equals_transformers(reference):
    ref, path, loaded = reference
    text_ids = loaded.tokenizer.encode("[0]Hello there, how are you?")
    assert text_ids == ByteTokenizer().encode("[0]Hello there, how are you?")
    tokens, mask = segment_rows(text_ids, None, eos=False)
    codes, _ = generate(loaded.model, tokens[None], mask[None], 10, SamplingConfig(1.0, 1), stop_on_eos=False)
    expected = reference_greedy(ref, text_ids, 10)
    assert expected.shape[1] >= 8
    torch.testing.assert_close(codes[0, :, : expected.shape[1]], expected)


def test_export_roundtrip_loads_in_transformers(reference, tmp_path):
    ref, _, loaded = reference
    out = tmp_path / "exported"
    export_transformers_dir(loaded.model, loaded.tokenizer, out, ref.config.codec_config.to_dict())
    back, info = transformers.CsmForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    not_codec = lambda keys: [k for k in keys if not k.startswith("codec_model.")]  # noqa: E731
    assert not_codec(info["missing_keys"]) == [] and not_codec(info["unexpected_keys"]) == []
    text_ids = ByteTokenizer().encode("[0]A second sentence.")
    torch.testing.assert_close(reference_greedy(back.eval(), text_ids, 8), reference_greedy(ref, text_ids, 8))
    again = load_transformers_dir(out)
    for (k, a), b in zip(loaded.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    assert json.loads((out / "config.json").read_text())["model_type"] == "csm"


def test_byte_tokenizer_json_matches_byte_tokenizer():
    hf = HFTokenizer.from_json(byte_tokenizer_json())
    for text in ["[0]Hello <laughs> there!", "naïve café ☕ 日本語", ""]:
        assert hf.encode(text) == ByteTokenizer().encode(text)
        assert hf.decode(hf.encode(text)) == text


def test_untied_different_audio_tables_are_refused(reference, tmp_path):
    """Issue 18.1: two different audio embedding tables are refused in one line, never one picked."""
    ref, _, _ = reference
    config = tiny_csm_config()
    config.tie_codebooks_embeddings = False
    torch.manual_seed(1)
    untied = transformers.CsmForConditionalGeneration(config).eval()
    table = untied.backbone_model.embed_tokens.embed_audio_tokens.weight
    untied.depth_decoder.model.embed_tokens.weight = torch.nn.Parameter(torch.randn_like(table))
    untied.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    assert not torch.equal(  # the situation of the issue: two different tables in the file
        saved["depth_decoder.model.embed_tokens.weight"],
        saved["backbone_model.embed_tokens.embed_audio_tokens.weight"],
    )
    (tmp_path / "tokenizer.json").write_text(byte_tokenizer_json())
    with pytest.raises(CheckpointError, match="audio embedding tables differ .*will not pick one") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_directory_without_tokenizer_json(reference, tmp_path):
    """Issue 18.2: no tokenizer.json is an error unless the text table is the 259-id byte one."""
    import shutil

    _, path, _ = reference
    shutil.copytree(path, tmp_path / "bytes")
    (tmp_path / "bytes" / "tokenizer.json").unlink()
    assert isinstance(load_model(tmp_path / "bytes").tokenizer, ByteTokenizer)  # text_vocab_size 259
    big = tiny_csm_config()
    big.text_vocab_size = 49_152
    transformers.CsmForConditionalGeneration(big).save_pretrained(tmp_path / "big")
    with pytest.raises(CheckpointError, match="no tokenizer.json .*49152 ids.*pass tokenizer="):
        load_model(tmp_path / "big")


def llama_style_tokenizer_json(add_eos: bool) -> str:
    """A tiny word-level tokenizer.json whose post-processor adds BOS (and EOS when asked), like Llama 3.2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "[UNK]": 2, "[0]hello": 3, "there": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    single = "<|begin_of_text|> $A" + (" <|end_of_text|>" if add_eos else "")
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<|begin_of_text|>", 0), ("<|end_of_text|>", 1)]
    )
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    return tok.to_str()


def test_tokenizer_that_adds_bos_only_gets_eos_added(tmp_path, caplog):
    """Issue 18.3: CSM prompts are <bos>[speaker]text<eos>; a Llama-style file adds BOS only."""
    import logging

    from elise.text import build_tokenizer

    (tmp_path / "tokenizer.json").write_text(llama_style_tokenizer_json(add_eos=False))
    with caplog.at_level(logging.INFO, logger="elise.text"):
        tok = build_tokenizer(tmp_path / "tokenizer.json")
    assert tok.encode("[0]hello there") == [0, 3, 4, 1]
    lines = [r.getMessage() for r in caplog.records if "adds them" in r.getMessage()]
    assert len(lines) == 1 and "EOS 1 (<|end_of_text|>)" in lines[0] and "BOS" not in lines[0]
    complete = HFTokenizer.from_json(llama_style_tokenizer_json(add_eos=True))
    assert complete.encode("[0]hello there") == [0, 3, 4, 1]  # nothing added twice


def test_bad_directory_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="expected 'csm'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(tmp_path)


def test_synthesize_with_directory_checkpoint_equals_transformers_greedy(reference, tmp_path):
    """synthesize.py ckpt=<transformers dir> top_k=1 writes the codes transformers' greedy generate gives."""
    import numpy as np

    from elise.config import compose
    from elise.synthesize import run

    ref, path, _ = reference
    cfg = compose("synthesize", ["codec=tiny"])
    out = tmp_path / "dir.wav"
    for key, value in {
        "ckpt": str(path), "text": "Hello there.", "top_k": 1, "seed": 0, "device": "cpu",
        "max_audio_seconds": 0.8, "save_codes": True, "output": str(out),
    }.items():  # fmt: skip
        cfg[key] = value
    [metrics] = run(cfg)
    codes = np.load(out.with_name("dir.codes.npy"))  # [32, F]
    expected = reference_greedy(ref, ByteTokenizer().encode("[0]Hello there."), 10)
    assert codes.shape == (32, 10) and metrics["frames"] == 10
    assert np.array_equal(codes, expected.numpy())


def test_export_cli_writes_a_directory_transformers_loads(tmp_path):
    import subprocess
    import sys

    from elise.model import build_model

    model = build_model("tiny")
    ckpt = tmp_path / "tiny.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model": model.cfg.to_dict(), "tokenizer": "bytes"},
        },
        ckpt,
    )
    codec_cfg = tmp_path / "codec.json"
    codec_cfg.write_text(json.dumps(tiny_csm_config().codec_config.to_dict()))
    args = [
        sys.executable,
        "-m",
        "elise.export",
        f"ckpt={ckpt}",
        f"out={tmp_path / 'out'}",
        f"codec_config={codec_cfg}",
    ]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    back, info = transformers.CsmForConditionalGeneration.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert [k for k in info["missing_keys"] if not k.startswith("codec_model.")] == []
    torch.testing.assert_close(back.lm_head.weight, model.codebook0_head.weight)
    bad = subprocess.run(
        [sys.executable, "-m", "elise.export", f"ckpt={tmp_path / 'nope.ckpt'}", "out=x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "not found" in bad.stderr
