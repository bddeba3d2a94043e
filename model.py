"""GPT-2 in one file: the model, loading OpenAI's weights, exporting to Hugging Face format.

Parameter names are exactly those of Hugging Face's `GPT2LMHeadModel`, so a state dict moves
between the two with only one change: HF stores its linear layers as `Conv1D`, whose weight is
the transpose of `nn.Linear`'s.
"""
import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EOT = 50256  # tiktoken "gpt2": the <|endoftext|> token that separates documents
# HF stores these as Conv1D (in_features, out_features): the transpose of nn.Linear's weight
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (number of learned positions)
    vocab_size: int = 50257  # real tokens: sampling and scoring only ever see these
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    padded_vocab_size: int = 0  # embedding rows; >= vocab_size (50304 trains faster); 0 = vocab_size

    def __post_init__(self):
        if self.padded_vocab_size == 0:
            self.padded_vocab_size = self.vocab_size
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


# The four sizes OpenAI released (all with block_size 1024 and vocab_size 50257).
OPENAI_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x, kv=None, attn_mask=None):
        """x: (B, T, C). kv: this layer's cached (keys, values) of earlier positions, or None.
        attn_mask: bool, True where a query may see a key, instead of the causal mask.
        Returns the output and the (keys, values) of all positions so far."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv is not None:  # earlier positions come from the cache
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        past = k.size(2) - T
        if attn_mask is None and past > 0 and T > 1:
            # new token i sits at position past + i and sees keys 0 .. past + i
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        # no cache: plain causal attention (the fast kernels); one new token: it sees every key
        causal = attn_mask is None and past == 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv=None, attn_mask=None):
        a, kv = self.attn(self.ln_1(x), kv, attn_mask)  # pre-LayerNorm: the residual stream is never normalised
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor, two uses
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5  # each block adds two residual branches
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        # nn.LayerNorm already starts at weight 1, bias 0

    def num_params(self, non_embedding=False):
        """Parameters, counted once (the tied wte/lm_head tensor is one). non_embedding drops wpe,
        as the usual 6N FLOPs estimate does (wte is still counted: it is the lm_head matmul)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden_states(self, idx, kv_cache=None, pos=None, attn_mask=None):
        """Final-LayerNorm output (B, T, n_embd) for tokens idx (B, T) that follow the positions in
        kv_cache (a list of per-layer (keys, values), or None). Returns it and the updated cache.
        For packed rows (hellaswag.py), pos gives each token's position (B, T) and attn_mask
        (B, 1, T, T; True = may attend) replaces the causal mask."""
        B, T = idx.size()
        past = 0 if kv_cache is None else kv_cache[0][0].size(2)
        if pos is None and past + T > self.config.block_size:
            raise ValueError(f"sequence length {past + T} exceeds block_size {self.config.block_size}")
        # Checking ids is free on the CPU; on a GPU it would stall the pipeline every step, so there
        # the callers check instead: the training loader checks its shards, generate its prompt.
        # (CUDA asserts on an id past the padded rows, but ids in [vocab_size, padded) would pass.)
        if idx.device.type == "cpu" and T > 0 and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if pos is None:
            pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        new_cache = []
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, None if kv_cache is None else kv_cache[i], attn_mask)
            new_cache.append(kv)
        return self.transformer.ln_f(x), new_cache

    def logits(self, h):
        """Logits over the real vocabulary only: padded rows of lm_head are computed (the padded
        matmul is faster) but sliced away, so they can never be sampled or change a loss."""
        return self.lm_head(h)[..., : self.config.vocab_size]

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids. Returns (logits (B, T, vocab_size), mean cross-entropy
        loss or None). Targets of -1 are ignored."""
        h, _ = self.hidden_states(idx)
        logits = self.logits(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, device_type, verbose=True):
        """AdamW as in GPT-3: decay only matrices (matmul weights and embeddings), never biases
        or LayerNorm parameters."""
        params = [p for p in self.parameters() if p.requires_grad]  # .parameters() yields tied ones once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        if verbose:
            print(f"weight decay {weight_decay}: {len(decay)} tensors, {sum(p.numel() for p in decay):,} parameters; "
                  f"no decay: {len(no_decay)} tensors, {sum(p.numel() for p in no_decay):,} parameters")
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), PaLM paper appendix B: 6N + 12*L*H*Q*T."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * seq_len

    def estimate_mfu(self, tokens_per_second, seq_len, peak_flops=989e12):
        """Model FLOPs utilisation; the default peak is an H100 SXM's dense bf16 989 TFLOP/s."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, use_cache=True):
        """Continue idx (B, T) by max_new_tokens tokens. temperature 0 is greedy; top_k None keeps
        every token. With the key/value cache the prompt is processed once, then one token per
        step; without it (use_cache=False, for testing) every step recomputes the whole window."""
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"the prompt must be a (batch, length >= 1) tensor of ids, got shape {tuple(idx.shape)}")
        if int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size:  # one check per call, on any device
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size}), "
                             f"got {int(idx.min())}..{int(idx.max())}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, or None to keep every token; got {top_k}")
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and idx.size(1) <= self.config.block_size:
                h, cache = self.hidden_states(idx[:, -1:], cache)  # only the newest token is new
            else:  # first step, no cache, or the window slid past block_size: recompute it
                h, cache = self.hidden_states(idx[:, -self.config.block_size :])
            logits = self.logits(h[:, -1, :]).float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path, padded_vocab_size=None):
        """Load an OpenAI size ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"; downloaded once from
        the Hugging Face hub into its cache), a local directory written by HF's save_pretrained
        or by save_hf, or a checkpoint file written by train_gpt2.py. padded_vocab_size (e.g.
        50304) sets the number of embedding rows, extra rows starting at zero (for fine-tuning at
        the faster padded size; they never reach sampling or a loss); 0 means none, the real 50257;
        None keeps the source's own (a checkpoint's padding; none for OpenAI's and HF's)."""
        if name_or_path in OPENAI_SIZES:
            from huggingface_hub import hf_hub_download

            model = cls(config_for(name_or_path, padded_vocab_size=padded_vocab_size or 0))
            weights_file = hf_hub_download(f"openai-community/{name_or_path}", "model.safetensors")
            model.load_hf_state_dict(_read_weights(weights_file), source=weights_file)
        elif os.path.isfile(name_or_path):  # a checkpoint written by train_gpt2.py
            try:
                ckpt = torch.load(name_or_path, map_location="cpu", weights_only=True)
                config, weights = dict(ckpt["config"]), ckpt["model"]
                if padded_vocab_size is not None:
                    config["padded_vocab_size"] = padded_vocab_size
                model = cls(GPTConfig(**config))
            except Exception as e:  # not a zip/pickle, no "config" or "model", unknown fields...
                raise ValueError(f"{name_or_path}: not a train_gpt2.py checkpoint ({type(e).__name__}: {e})") from e
            model._copy_weights(weights, source=name_or_path)
        elif os.path.isdir(name_or_path):
            model = cls(_config_from_hf_dir(name_or_path, padded_vocab_size or 0))
            weights_file = _weights_file_in(name_or_path)
            model.load_hf_state_dict(_read_weights(weights_file), source=weights_file)
        else:
            raise ValueError(f"{name_or_path!r} is neither an OpenAI size ({', '.join(OPENAI_SIZES)}), "
                             f"a directory written by save_pretrained, nor a train_gpt2.py checkpoint file")
        return model

    def load_hf_state_dict(self, sd_hf, source="state dict"):
        """Copy a GPT2LMHeadModel state dict into this model, transposing HF's Conv1D weights."""
        # OpenAI's files name keys without "transformer." (a GPT2Model's) and store no lm_head
        sd_hf = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
                 for k, v in sd_hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # buffers
        self._copy_weights({k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in sd_hf.items()}, source)

    def _copy_weights(self, sd, source):
        """Copy a state dict in our layout into this model. Embedding rows past the real vocabulary
        are padding: the source's are dropped, ours start at zero, so any padding loads into any."""
        V = self.config.vocab_size
        if "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
            sd = {**sd, "lm_head.weight": sd["transformer.wte.weight"]}  # tied: saved once
        ours = self.state_dict()
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
                    raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, "
                                     f"the model expects {tuple(target.shape)}")
                target.copy_(v)

    def to_hf(self):
        """This model as a transformers GPT2LMHeadModel (float32, CPU): real vocabulary rows only,
        linear weights transposed into HF's Conv1D layout."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                        n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                        bos_token_id=EOT, eos_token_id=EOT))
        sd = {}
        for k, v in self.state_dict().items():
            v = v.detach().float().cpu()
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v = v[: c.vocab_size]
            sd[k] = v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v.clone()
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"export mismatch: HF expects {missing[:5]}, did not expect {unexpected[:5]}")
        return hf.eval()

    def save_hf(self, directory, tokenizer=True):
        """Write a directory that transformers' GPT2LMHeadModel.from_pretrained (and pipeline
        "text-generation") loads directly, with config.json and, with tokenizer=True, the GPT-2
        tokenizer converted from tiktoken. The files are written next to it under a temporary name,
        then renamed into place: an interrupted export leaves no half-written file behind."""
        import shutil
        import tempfile

        os.makedirs(directory, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=directory, prefix=".save_hf-")
        try:
            # one file whatever the size (transformers 4.x would shard anything over 5 GB)
            self.to_hf().save_pretrained(tmp, max_shard_size="1000GB")
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
    import tempfile

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


def config_for(name, **overrides):
    """GPTConfig of an OpenAI size by name, with any field overridden."""
    if name not in OPENAI_SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(OPENAI_SIZES)}")
    return GPTConfig(**{**OPENAI_SIZES[name], **overrides})


def _config_from_hf_dir(directory, padded_vocab_size=0):
    import json

    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            c = json.load(f)
        shape = {k: c[k] for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")}
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a usable GPT-2 config.json ({e!r})") from e
    # settings that HF's GPT-2 supports and this model does not: loading would silently compute
    # something else, so refuse by name (the values here are GPT-2's own)
    gpt2 = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
            "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
            "tie_word_embeddings": (True,), "n_inner": (None, 4 * shape["n_embd"])}
    for key, allowed in gpt2.items():
        if key in c and c[key] not in allowed:
            raise ValueError(f"{path}: {key}={c[key]!r} is not supported (this GPT-2 has {key}={allowed[0]!r})")
    return GPTConfig(block_size=shape["n_positions"], vocab_size=shape["vocab_size"], n_layer=shape["n_layer"],
                     n_head=shape["n_head"], n_embd=shape["n_embd"], padded_vocab_size=padded_vocab_size)


def _weights_file_in(directory):
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise ValueError(f"{directory}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not supported)")


def _read_weights(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
