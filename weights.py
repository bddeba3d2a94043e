"""Weights in and out of model.GPT: OpenAI's GPT-2 from the Hugging Face hub, Hugging Face
directories, train_gpt2.py checkpoints; and the export to a directory that `transformers` loads.

Our parameter names are those of HF's GPT2LMHeadModel, so a state dict moves between the two
with one change: HF stores its linear layers as `Conv1D`, whose weight is nn.Linear's transposed.

From the command line, a checkpoint becomes a Hugging Face model (weights, config.json, tokenizer,
and a model card README.md), optionally uploaded to the Hugging Face Hub:

    python weights.py export log/ckpt_019073.pt gpt2-repro
    python weights.py export log/ckpt_019073.pt gpt2-repro --push-to-hub USER/gpt2-repro
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

import torch

from model import EOT, GPT, OPENAI_SIZES, GPTConfig, config_for
from utils import atomic_write

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
        config = config_from_dict(ckpt["config"], name_or_path)
        if padded_vocab_size is not None:  # another padding than the checkpoint's (0: none)
            config = dataclasses.replace(config, padded_vocab_size=padded_vocab_size)
        model = GPT(config)
        copy_weights(model, ckpt["model"], source=name_or_path)
    elif os.path.isdir(name_or_path):
        model = GPT(dataclasses.replace(config_from_hf_dir(name_or_path), padded_vocab_size=padded_vocab_size or 0))
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


def config_from_dict(config, source, kind="train_gpt2.py checkpoint"):
    """GPTConfig(**config), or a ValueError naming the source: unknown fields, values that are not
    positive integers, a width that the heads do not divide."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: the model config is a {type(config).__name__}, not a dict")
    missing = [k for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd") if k not in config]
    if missing:  # GPTConfig's defaults (124M) would stand in for them, and the weights then fail to fit
        raise ValueError(f"{source}: the model config lacks {', '.join(missing)}")
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < (key != "padded_vocab_size"):
            raise ValueError(f"{source}: {key}={value!r} is not a positive integer")
    try:
        return GPTConfig(**config)
    except (TypeError, ValueError) as e:  # a field this version does not know; n_embd % n_head != 0 ...
        raise ValueError(f"{source}: not a {kind} ({type(e).__name__}: {e})") from e


def config_from_hf_dir(directory):
    """The GPTConfig (unpadded) of an HF GPT-2 directory's config.json; settings this model lacks are refused."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            c = json.load(f)
        shape = dict(block_size=c["n_positions"], **{k: c[k] for k in ("vocab_size", "n_layer", "n_head", "n_embd")})
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a usable GPT-2 config.json ({e!r})") from e
    config = config_from_dict({**shape, "padded_vocab_size": 0}, path, kind="usable GPT-2 config.json")
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
    then renamed into place: an interrupted export leaves no half-written file behind. Returns
    the names of the files written."""
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=directory, prefix=".save_hf-")
    try:
        # one file whatever the size (transformers 4.x would shard anything over 5 GB)
        to_hf(model).save_pretrained(tmp, max_shard_size="1000GB")
        if tokenizer:
            save_gpt2_tokenizer(tmp)
        names = sorted(os.listdir(tmp))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


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


# ---------------------------------------------------------------- the model card

NOT_RECORDED = "not recorded"
CARD_MARKER = "<!-- written by `python weights.py export`: exporting into this directory again rewrites this file -->"


def training_record(checkpoint):
    """What a train_gpt2.py checkpoint tells about its training: the step, the run's args (data,
    total_batch_size, init_from) and, from the log.jsonl beside it, the latest val loss and
    HellaSwag acc_norm at or before that step, as (step, value) or None."""
    ckpt = read_checkpoint(checkpoint, keys=("model", "config"), mmap=True)  # mmap: the weights stay on disk
    step, args = ckpt.get("step"), ckpt.get("args") or {}
    log = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "log.jsonl")
    return dict(step=step, args=args, val_loss=latest_in_log(log, "val_loss", step),
                hellaswag=latest_in_log(log, "hellaswag", step))


def latest_in_log(path, key, step):
    """(step, value) of the last log.jsonl record holding `key` at or before `step`, or None. The
    log can run past the checkpoint (training went on after it): later records are not this model's."""
    if step is None or not os.path.isfile(path):
        return None
    found = None
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a last line cut short by a crash
                continue
            if isinstance(record, dict) and key in record and isinstance(record.get("step"), int) \
                    and record["step"] <= step:
                found = (record["step"], record[key])  # records are in step order: the last one wins
    return found


def hub_dataset(data):
    """The Hub dataset (and its config) that fineweb.py tokenized into the shard directory `data`, as its
    manifest.json records it; None for anything else (a .txt file, local files, no manifest here)."""
    try:
        with open(os.path.join(data, "manifest.json")) as f:
            manifest = json.load(f)
        dataset, name = manifest["dataset"], manifest.get("name")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if dataset == "local files" else (dataset, name)


def model_card(model, name, load_as, source, record=None):
    """README.md of an export: the metadata the Hub reads (between the --- lines), the model's shape,
    its training as the checkpoint and its log.jsonl recorded it (record is None for a Hugging Face
    directory or an OpenAI size), and how to load it. No license: the Hub accepts a card without one,
    and only the model's owner can choose it."""
    c, r = model.config, record or {}
    args, step = r.get("args", {}), r.get("step")
    init_from, data, batch = args.get("init_from"), args.get("data"), args.get("total_batch_size")
    dataset = hub_dataset(data) if data else None
    params = model.num_params() - (c.padded_vocab_size - c.vocab_size) * c.n_embd  # padding rows are not exported

    metadata = ["library_name: transformers", "pipeline_tag: text-generation"]
    if init_from in OPENAI_SIZES:  # the Hub links the model it was fine-tuned from
        metadata.append(f"base_model: openai-community/{init_from}")
    if dataset:
        metadata.append(f"datasets:\n- {dataset[0]}")
    metadata = "\n".join(metadata)
    if record is None:
        origin = f"converted from `{source}`"
    else:
        origin = f"fine-tuned from `{init_from}`" if init_from else "trained from scratch"
        origin += f" with train_gpt2.py (checkpoint `{os.path.basename(source)}`)"
    steps = NOT_RECORDED if step is None else f"{step:,}"
    tokens = NOT_RECORDED if step is None or not batch else f"{step * batch:,} ({step:,} steps x {batch:,} tokens per step)"
    if init_from and tokens != NOT_RECORDED:
        tokens += ", fine-tuning only"
    data = NOT_RECORDED if not data else f"`{data}`" + (f" ({', '.join(filter(None, dataset))})" if dataset else "")
    val_loss, hellaswag = (NOT_RECORDED if m is None else f"{m[1]:.4f} (step {m[0]:,})"
                           for m in (r.get("val_loss"), r.get("hellaswag")))
    return f"""---
{metadata}
---

# {name}

A GPT-2 language model {origin}, exported to Hugging Face format by `python weights.py export`.

| | |
|---|---|
| shape | {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context {c.block_size} tokens |
| parameters | {params:,} |
| training steps | {steps} |
| training tokens | {tokens} |
| training data | {data} |
| val loss | {val_loss} |
| HellaSwag acc_norm | {hellaswag} |

## Use

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{load_as}")
print(generator("Hello, I'm a language model,", max_new_tokens=30)[0]["generated_text"])
```

The tokenizer is GPT-2's ({c.vocab_size:,} tokens); `<|endoftext|>` (id {EOT}) ends each document.

No license was chosen at export: to say how others may use this model, add a `license:` line to the
metadata at the top (see https://huggingface.co/docs/hub/repositories-licenses).

{CARD_MARKER}
"""


# ---------------------------------------------------------------- command line


class ExportError(Exception):
    """Bad input, or a failed write or upload: main prints it as `error: ...` and exits with status 2."""


def export(source, out_dir, repo_id=None, private=False):
    """`python weights.py export`: source (a checkpoint; also a Hugging Face directory or an OpenAI
    size) as a Hugging Face directory out_dir with a model card, uploaded to repo_id if given."""
    if source not in OPENAI_SIZES and not os.path.exists(source):
        raise ExportError(f"{source}: no such file. Give a train_gpt2.py checkpoint (log/ckpt_NNNNNN.pt), "
                          f"a Hugging Face model directory, or one of {', '.join(OPENAI_SIZES)}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"OUT_DIR {out_dir} is a file: give the name of a directory to write (it is created)")
    readme = os.path.join(out_dir, "README.md")
    if os.path.isfile(readme):  # the card would replace it: only replace our own
        with open(readme, errors="replace") as f:
            if CARD_MARKER not in f.read():
                raise ExportError(f"{readme} exists and was not written by this export, which writes its model "
                                  "card there: move it away, or choose another OUT_DIR")
    try:
        model = from_pretrained(source)
        record = training_record(source) if os.path.isfile(source) else None
    except (ValueError, OSError) as e:  # OSError: an OpenAI size that cannot be downloaded
        raise ExportError(e) from e
    card = model_card(model, name=repo_id or os.path.basename(os.path.abspath(out_dir)),
                      load_as=repo_id or out_dir, source=source, record=record)
    try:
        names = save_hf(model, out_dir)
        atomic_write(readme, lambda f: f.write(card.encode()))
    except OSError as e:
        raise ExportError(f"writing {out_dir}: {e}") from e
    print(f"wrote {out_dir}: {', '.join(sorted(names + ['README.md']))} (README.md is the model card)")
    print(f'load it with:\n    from transformers import pipeline\n'
          f'    generator = pipeline("text-generation", model="{repo_id or out_dir}")')
    if repo_id:
        push_to_hub(out_dir, repo_id, private, message=f"Export of {os.path.basename(source)} by weights.py")
    else:
        print("publish it on the Hugging Face Hub: `hf auth login` once, then the same command with "
              "--push-to-hub USER/NAME")
    return 0


def push_to_hub(directory, repo_id, private, message):
    """Upload directory to the Hub model repository repo_id, created if needed: the library's own two
    calls, with the token `hf auth login` saved (or HF_TOKEN). Failures come back as ExportError."""
    import huggingface_hub

    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
    except ImportError:  # huggingface_hub before 0.24 kept its errors in utils
        from huggingface_hub.utils import HfHubHTTPError, LocalTokenNotFoundError

    print(f"uploading {directory} to the Hugging Face Hub as {repo_id}", flush=True)
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=directory, commit_message=message,
                          ignore_patterns=[".save_hf-*"])  # the temporary directory of an interrupted save_hf
    except Exception as e:  # the library's errors, and network errors (requests' or httpx's, by version)
        status = getattr(getattr(e, "response", None), "status_code", None)
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # the server's message, on one line
        if isinstance(e, LocalTokenNotFoundError) or (isinstance(e, HfHubHTTPError) and status in (401, 403)):
            raise ExportError(f"the Hugging Face Hub refused to write {repo_id} ({reason}). Log in with a token "
                              "that may write there: run `hf auth login` (or set HF_TOKEN), then this command "
                              "again") from e
        raise ExportError(f"uploading {directory} to {repo_id} failed ({reason}). The export in {directory} "
                          "is complete: run this command again to retry the upload") from e
    print(f"uploaded: {url}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="weights.py", description="GPT-2 weights out of train_gpt2.py")
    commands = p.add_subparsers(dest="command", required=True)
    e = commands.add_parser("export", help="a checkpoint as a Hugging Face model directory",
                            description="Write CHECKPOINT as a directory that transformers loads (model.safetensors, "
                            "config.json, the GPT-2 tokenizer, a model card README.md); with --push-to-hub, upload it.")
    e.add_argument("checkpoint", metavar="CHECKPOINT", help="a train_gpt2.py checkpoint, e.g. log/ckpt_019073.pt "
                   f"(also a Hugging Face directory, or one of {', '.join(OPENAI_SIZES)})")
    e.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write (created if needed; its files of the "
                   "same names are replaced, others are kept)")
    e.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload OUT_DIR to this Hugging Face Hub model "
                   "repository, USER/NAME or ORG/NAME (created if needed), with the token `hf auth login` saved")
    e.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps "
                   "its visibility)")
    args = p.parse_args(argv)
    if args.private and not args.push_to_hub:
        e.error("--private needs --push-to-hub REPO_ID")
    if args.push_to_hub is not None:  # checked before the export, not after it
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)  # the Hub's own rules for names (a ValueError)
            if "/" not in args.push_to_hub:
                raise ValueError("the owner is missing")
        except ValueError as err:
            e.error(f"--push-to-hub {args.push_to_hub!r}: not a repository id USER/NAME or ORG/NAME ({err})")
    try:
        return export(args.checkpoint, args.out_dir, args.push_to_hub, args.private)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
