"""Weights in and out of model.GPT: OpenAI's GPT-2 from the Hugging Face hub, Hugging Face
directories, train_gpt2.py checkpoints; and the export to a directory that `transformers` loads.

Our parameter names are those of HF's GPT2LMHeadModel, so a state dict moves between the two
with one change: HF stores its linear layers as `Conv1D`, whose weight is nn.Linear's transposed.
"""
import json
import os
import shutil
import tempfile

import torch

from model import EOT, GPT, OPENAI_SIZES, GPTConfig, config_for

# HF stores these as Conv1D (in_features, out_features): the transpose of nn.Linear's weight
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def from_pretrained(name_or_path, padded_vocab_size=None):
    """A GPT from an OpenAI size ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"; downloaded once from
    the Hugging Face hub into its cache), a local directory written by HF's save_pretrained or by
    save_hf, or a checkpoint file written by train_gpt2.py. padded_vocab_size (e.g. 50304) sets the
    number of embedding rows, extra rows starting at zero (for fine-tuning at the faster padded
    size; they never reach sampling or a loss); 0 means none, the real 50257; None keeps the
    source's own (a checkpoint's padding; none for OpenAI's and HF's)."""
    if name_or_path in OPENAI_SIZES:
        from huggingface_hub import hf_hub_download

        model = GPT(config_for(name_or_path, padded_vocab_size=padded_vocab_size or 0))
        weights_file = hf_hub_download(f"openai-community/{name_or_path}", "model.safetensors")
        load_hf_state_dict(model, read_weights(weights_file), source=weights_file)
    elif os.path.isfile(name_or_path):  # a checkpoint written by train_gpt2.py
        ckpt = read_checkpoint(name_or_path, keys=("model", "config"))
        config = dict(ckpt["config"])
        if padded_vocab_size is not None:
            config["padded_vocab_size"] = padded_vocab_size
        model = GPT(config_from_dict(config, name_or_path))
        copy_weights(model, ckpt["model"], source=name_or_path)
    elif os.path.isdir(name_or_path):
        model = GPT(config_from_hf_dir(name_or_path, padded_vocab_size or 0))
        weights_file = weights_file_in(name_or_path)
        load_hf_state_dict(model, read_weights(weights_file), source=weights_file)
    else:
        raise ValueError(f"{name_or_path!r} is neither an OpenAI size ({', '.join(OPENAI_SIZES)}), "
                         f"a directory written by save_pretrained, nor a train_gpt2.py checkpoint file")
    return model


# ---------------------------------------------------------------- reading files


def read_checkpoint(path, keys=("model", "config", "step"), mmap=False):
    """The dict a train_gpt2.py checkpoint file holds; ValueError naming the file if it cannot be
    read or lacks one of `keys`. mmap=True reads tensors lazily (the step, without the weights)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated file, another format, a directory...: all the same to the user
        raise ValueError(f"{path}: not a train_gpt2.py checkpoint ({type(e).__name__}: {e})") from e
    missing = [k for k in keys if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        raise ValueError(f"{path}: not a train_gpt2.py checkpoint (KeyError: {missing[0]!r} is missing)")
    return ckpt


def config_from_dict(config, source):
    """GPTConfig(**config), or a ValueError naming the source: unknown fields, values that are not
    positive integers, a width that the heads do not divide."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: the model config is a {type(config).__name__}, not a dict")
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < (key != "padded_vocab_size"):
            raise ValueError(f"{source}: {key}={value!r} is not a positive integer")
    try:
        return GPTConfig(**config)
    except (TypeError, ValueError) as e:  # a field this version does not know; n_embd % n_head != 0 ...
        raise ValueError(f"{source}: not a train_gpt2.py checkpoint ({type(e).__name__}: {e})") from e


def config_from_hf_dir(directory, padded_vocab_size=0):
    """The GPTConfig of an HF GPT-2 directory's config.json; settings this model lacks are refused."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            c = json.load(f)
        shape = dict(block_size=c["n_positions"], **{k: c[k] for k in ("vocab_size", "n_layer", "n_head", "n_embd")})
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a usable GPT-2 config.json ({e!r})") from e
    config = config_from_dict({**shape, "padded_vocab_size": padded_vocab_size}, path)
    # settings that HF's GPT-2 supports and this model does not: loading would silently compute
    # something else, so refuse by name (the values here are GPT-2's own)
    gpt2 = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
            "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
            "tie_word_embeddings": (True,), "n_inner": (None, 4 * config.n_embd)}
    for key, allowed in gpt2.items():
        if key in c and c[key] not in allowed:
            raise ValueError(f"{path}: {key}={c[key]!r} is not supported (this GPT-2 has {key}={allowed[0]!r})")
    return config


def weights_file_in(directory):
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise ValueError(f"{directory}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not supported)")


def read_weights(path):
    """A state dict from a .safetensors or a torch .bin file; ValueError naming the file if it is
    truncated or not such a file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors raises its own SafetensorError; torch.load many types
        raise ValueError(f"{path}: unreadable weights file, truncated or not a checkpoint "
                         f"({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------- state dicts into the model


def load_hf_state_dict(model, sd_hf, source="state dict"):
    """Copy a GPT2LMHeadModel (or OpenAI GPT2Model) state dict into model, transposing Conv1D weights."""
    # OpenAI's files name keys without "transformer." (a GPT2Model's) and store no lm_head
    sd_hf = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
             for k, v in sd_hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # buffers
    copy_weights(model, {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in sd_hf.items()}, source)


def copy_weights(model, sd, source):
    """Copy a state dict in our layout into model. Embedding rows past the real vocabulary are
    padding: the source's are dropped, ours start at zero, so any padding loads into any."""
    V = model.config.vocab_size
    if "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
        sd = {**sd, "lm_head.weight": sd["transformer.wte.weight"]}  # tied: saved once
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{source}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    wte, lm_head = sd["transformer.wte.weight"], sd["lm_head.weight"]
    if wte.shape != lm_head.shape or not torch.equal(wte[:V], lm_head[:V]):
        raise ValueError(f"{source}: lm_head.weight differs from transformer.wte.weight; this GPT-2 "
                         f"ties them (an untied model cannot be loaded without changing it)")
    with torch.no_grad():
        for k, v in sd.items():
            target = ours[k]
            if k in ("transformer.wte.weight", "lm_head.weight") and v.size(0) >= V:
                target[V:].zero_()
                target, v = target[:V], v[:V]
            if target.shape != v.shape:
                raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(v)


# ---------------------------------------------------------------- export to Hugging Face


def to_hf(model):
    """model as a transformers GPT2LMHeadModel (float32, CPU): real vocabulary rows only, linear
    weights transposed into HF's Conv1D layout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                    bos_token_id=EOT, eos_token_id=EOT))
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().float().cpu()
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[: c.vocab_size]
        sd[k] = v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v.clone()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export mismatch: HF expects {missing[:5]}, did not expect {unexpected[:5]}")
    return hf.eval()


def save_hf(model, directory, tokenizer=True):
    """Write a directory that transformers' GPT2LMHeadModel.from_pretrained (and pipeline
    "text-generation") loads directly, with config.json and, with tokenizer=True, the GPT-2
    tokenizer converted from tiktoken. The files are written next to it under a temporary name,
    then renamed into place: an interrupted export leaves no half-written file behind."""
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=directory, prefix=".save_hf-")
    try:
        # one file whatever the size (transformers 4.x would shard anything over 5 GB)
        to_hf(model).save_pretrained(tmp, max_shard_size="1000GB")
        if tokenizer:
            save_gpt2_tokenizer(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_gpt2_tokenizer(directory):
    """Save the GPT-2 tokenizer in HF format, converted from tiktoken's "gpt2" encoding (which
    works offline with TIKTOKEN_CACHE_DIR), so an exported model needs nothing from the hub."""
    import base64
    import inspect

    import tiktoken
    from transformers import GPT2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = tiktoken.get_encoding("gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        bpe_file = os.path.join(tmp, "gpt2.tiktoken")  # tiktoken's own format: "base64(bytes) rank"
        with open(bpe_file, "w") as f:
            for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        # the special tokens' keyword was renamed in transformers 5 (4.x ignores unknown keywords)
        names = inspect.signature(TikTokenConverter.__init__).parameters
        specials = "extra_special_tokens" if "extra_special_tokens" in names else "additional_special_tokens"
        converted = TikTokenConverter(vocab_file=bpe_file, pattern=enc._pat_str,
                                      **{specials: list(enc._special_tokens)}).converted()
    eot = "<|endoftext|>"
    GPT2TokenizerFast(tokenizer_object=converted, bos_token=eot, eos_token=eot, unk_token=eot).save_pretrained(directory)
