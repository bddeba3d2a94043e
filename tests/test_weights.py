"""weights.py against independent references: loading OpenAI-style, HF and train_gpt2.py files,
the export that transformers loads, and clear errors for files this GPT-2 cannot use."""
import json
import os
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

import model as model_module
import weights
from model import EOT, GPT, GPTConfig

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64)


def hf_tiny(seed=0, vocab_size=50257, **overrides):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**TINY, **overrides}, vocab_size=vocab_size)).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny HF GPT-2 saved with save_pretrained: the independent reference."""
    d = tmp_path_factory.mktemp("hf_tiny")
    hf_tiny().save_pretrained(d)
    return str(d)


def test_openai_name_loads_openai_style_file(tmp_path, monkeypatch):
    """OpenAI's hub files name keys without 'transformer.', store no lm_head and carry attn.bias
    buffers: the name path must handle that. The hub download is replaced by a local file."""
    monkeypatch.setitem(model_module.OPENAI_SIZES, "gpt2", dict(n_layer=2, n_head=4, n_embd=64))
    torch.manual_seed(5)
    base = GPT2Model(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=1024)).eval()
    sd = {k: v.contiguous() for k, v in base.state_dict().items()}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1024, 1024)).view(1, 1, 1024, 1024)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, f: calls.append((repo, f)) or str(path))
    ours = GPT.from_pretrained("gpt2").eval()
    assert calls == [("openai-community/gpt2", "model.safetensors")]
    idx = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        h_ref = base(idx).last_hidden_state
        ref = h_ref @ base.wte.weight.t()
        assert (ours(idx)[0] - ref).abs().max().item() <= 1e-4


def test_export_round_trip(tmp_path):
    torch.manual_seed(6)
    ours = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64, padded_vocab_size=50304)).eval()
    ours.save_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["vocab_size"], config["n_positions"], config["n_layer"], config["n_embd"]) == (50257, 64, 2, 64)
    assert config["activation_function"] == "gelu_new"
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    assert hf.transformer.wte.weight.shape == (50257, 64)  # trimmed to the real vocabulary
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)
    back = GPT.from_pretrained(str(tmp_path))
    sd_back = back.state_dict()
    for k, v in ours.state_dict().items():
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[:50257]
        assert torch.equal(sd_back[k], v), k


def test_export_works_in_hf_pipeline(tmp_path):
    import tiktoken
    from transformers import AutoTokenizer, pipeline

    torch.manual_seed(7)
    GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)).save_hf(tmp_path)
    text = "Hello, I'm a language model,  héllo 世界\n\n\tcode: x+=1<|endoftext|>"
    tok = AutoTokenizer.from_pretrained(tmp_path)
    enc = tiktoken.get_encoding("gpt2")
    assert tok(text)["input_ids"] == enc.encode(text, allowed_special="all")
    assert tok.eos_token_id == EOT
    out = pipeline("text-generation", model=str(tmp_path))("Hello", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("Hello")


def test_bad_checkpoints_raise_clear_errors(tmp_path, tiny_dir):
    sd = load_file(os.path.join(tiny_dir, "model.safetensors"))
    config = open(os.path.join(tiny_dir, "config.json")).read()

    def hf_dir(name, state, cfg=config):
        d = tmp_path / name
        d.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(cfg)
        return str(d)

    missing = hf_dir("missing", {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"})
    with pytest.raises(ValueError, match=r"missing keys \['transformer.h.1.mlp.c_fc.bias'\]"):
        GPT.from_pretrained(missing)
    extra = hf_dir("extra", {**sd, "transformer.h.2.ln_1.weight": torch.ones(64)})
    with pytest.raises(ValueError, match=r"unexpected keys \['transformer.h.2.ln_1.weight'\]"):
        GPT.from_pretrained(extra)
    wrong = hf_dir("wrong", sd, config.replace('"n_positions": 64', '"n_positions": 128'))
    with pytest.raises(ValueError, match=r"transformer.wpe.weight has shape \(64, 64\), the model expects \(128, 64\)"):
        GPT.from_pretrained(wrong)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        GPT.from_pretrained(str(empty))
    not_ckpt = tmp_path / "x.pt"
    torch.save({"weights": 1}, not_ckpt)
    with pytest.raises(ValueError, match="not a train_gpt2.py checkpoint"):
        GPT.from_pretrained(str(not_ckpt))


def test_hf_settings_this_model_lacks_are_refused_by_name(tmp_path):
    """A config.json asking for maths this GPT-2 does not do must not load as if it were GPT-2."""
    for key, value in (("layer_norm_epsilon", 1e-2), ("scale_attn_by_inverse_layer_idx", True),
                       ("scale_attn_weights", False), ("tie_word_embeddings", False), ("n_inner", 48),
                       ("activation_function", "relu")):
        d = tmp_path / key
        hf_tiny(**{key: value}).save_pretrained(d)
        assert json.loads((d / "config.json").read_text())[key] == value
        with pytest.raises(ValueError, match=f"config.json: {key}="):
            GPT.from_pretrained(str(d))


def test_untied_weights_are_refused(tiny_dir):
    sd = load_file(os.path.join(tiny_dir, "model.safetensors"))
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 1.0
    m = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64))
    with pytest.raises(ValueError, match="lm_head.weight differs from transformer.wte.weight"):
        weights.load_hf_state_dict(m, sd)


def test_unreadable_checkpoint_files_name_the_file(tmp_path, tiny_dir):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes.txt: not a train_gpt2.py checkpoint \(UnpicklingError"):
        GPT.from_pretrained(str(text))
    m = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    other = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=16)
    from dataclasses import asdict

    torch.save({"model": m.state_dict(), "config": asdict(other)}, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match=r"mismatch.pt: missing keys \['transformer.h.1"):
        GPT.from_pretrained(str(tmp_path / "mismatch.pt"))
    torch.save({"weights": m.state_dict(), "config": asdict(other)}, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match=r"renamed.pt: not a train_gpt2.py checkpoint \(KeyError: 'model'"):
        GPT.from_pretrained(str(tmp_path / "renamed.pt"))
    torch.save({"model": m.state_dict(), "config": {**asdict(other), "n_kv_head": 2}}, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match=r"newer.pt: not a train_gpt2.py checkpoint \(TypeError.*n_kv_head"):
        GPT.from_pretrained(str(tmp_path / "newer.pt"))


def test_save_hf_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    m = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    out = tmp_path / "export"
    out.mkdir()
    (out / "README.md").write_text("mine")
    m.save_hf(out, tokenizer=False)
    first = (out / "model.safetensors").read_bytes()
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]

    def interrupted(directory):  # the tokenizer step fails after the weights were written
        raise KeyboardInterrupt
    monkeypatch.setattr(weights, "save_gpt2_tokenizer", interrupted)
    torch.nn.init.zeros_(m.transformer.wpe.weight)
    with pytest.raises(KeyboardInterrupt):
        m.save_hf(out)
    assert (out / "model.safetensors").read_bytes() == first  # the earlier export is untouched
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]


def test_train_checkpoint_loads(tmp_path):
    from dataclasses import asdict

    cfg = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, padded_vocab_size=50304)
    torch.manual_seed(0)
    m = GPT(cfg)
    torch.save({"model": m.state_dict(), "config": asdict(cfg), "step": 3}, tmp_path / "ckpt.pt")
    back = GPT.from_pretrained(str(tmp_path / "ckpt.pt"))
    assert back.config == cfg
    idx = torch.randint(0, 50257, (1, 8))
    assert torch.equal(back(idx)[0], m(idx)[0])


def test_train_checkpoint_loads_at_another_padding(tmp_path):
    """--init-from a checkpoint at any --padded-vocab-size: real rows copied, padded rows zero."""
    from dataclasses import asdict

    cfg = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, padded_vocab_size=50304)
    torch.manual_seed(0)
    m = GPT(cfg)
    torch.save({"model": m.state_dict(), "config": asdict(cfg)}, tmp_path / "ckpt.pt")
    idx = torch.randint(0, 50257, (1, 8))
    assert GPT.from_pretrained(str(tmp_path / "ckpt.pt")).config.padded_vocab_size == 50304  # None: its own
    for padded in (0, 50320):
        back = GPT.from_pretrained(str(tmp_path / "ckpt.pt"), padded_vocab_size=padded)
        padded = padded or 50257  # 0: no padding, as for every other source
        assert back.config.padded_vocab_size == padded
        assert back.transformer.wte.weight.shape == (padded, 16)
        assert torch.equal(back.transformer.wte.weight[:50257], m.transformer.wte.weight[:50257])
        assert torch.all(back.transformer.wte.weight[50257:] == 0)
        assert torch.equal(back(idx)[0], m(idx)[0])


def test_checkpoint_whose_config_is_not_a_dict_names_the_file(tmp_path):
    m = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    for bad in ([1, 2], 5, "gpt2"):
        torch.save({"model": m.state_dict(), "config": bad}, tmp_path / "bad.pt")
        for padded in (None, 50304):
            with pytest.raises(ValueError, match=r"bad.pt: the model config is a (list|int|str), not a dict"):
                GPT.from_pretrained(str(tmp_path / "bad.pt"), padded_vocab_size=padded)


def test_padding_and_hf_config_errors_blame_the_right_thing(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16)).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"^padded_vocab_size 100 < vocab_size 50257$"):
        GPT.from_pretrained(str(tmp_path / "hf"), padded_vocab_size=100)
    cfg = (tmp_path / "hf" / "config.json").read_text().replace('"n_head": 2', '"n_head": 3')
    (tmp_path / "hf" / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match=r"config.json: not a usable GPT-2 config.json \(ValueError: n_embd 16 is not"):
        GPT.from_pretrained(str(tmp_path / "hf"))


def test_checkpoint_config_missing_a_shape_field_says_so(tmp_path):
    cfg = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
    m = GPT(cfg)
    torch.save({"model": m.state_dict(), "config": {k: v for k, v in asdict(cfg).items() if k != "n_embd"}},
               tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old.pt: the model config lacks n_embd"):
        GPT.from_pretrained(str(tmp_path / "old.pt"))
