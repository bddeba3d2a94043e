"""GPT-2, top to bottom: config, attention (and its KV cache), MLP, Block, GPT, input checks. Parameter names are
exactly those of Hugging Face's GPT2LMHeadModel, so OpenAI's weights load by name (weights.py loads and exports)."""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EOT = 50256  # tiktoken "gpt2": the <|endoftext|> token that separates documents
H100_BF16_PEAK_FLOPS = 989e12  # one H100 (or H200) SXM, dense bf16: the denominator of MFU


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (number of learned positions)
    vocab_size: int = 50257  # real tokens: sampling and scoring only ever see these
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    padded_vocab_size: int = 0  # embedding rows; >= vocab_size (50304 trains faster); 0 = vocab_size

    def __post_init__(self):
        self.padded_vocab_size = self.padded_vocab_size or self.vocab_size
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


OPENAI_SIZES = {  # the four sizes OpenAI released, all with block_size 1024 and vocab_size 50257
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def config_for(name, **overrides):
    """GPTConfig of an OpenAI size by name, with any field overridden."""
    if name not in OPENAI_SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(OPENAI_SIZES)}")
    return GPTConfig(**{**OPENAI_SIZES[name], **overrides})


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # the walkthrough's NANOGPT_SCALE_INIT

    def forward(self, x, cache=None, attn_mask=None):
        B, T, C = x.size()  # batch, sequence length, embedding width (n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # split C into n_head heads of hs = C / n_head channels, and move the heads beside the batch
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # generation: earlier positions' keys and values come from the cache
            k, v = cache.append(k, v)  # (B, nh, past + T, hs)
        # causal: each position sees itself and earlier ones; a single new token after the cache sees every key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.c_proj(y)


class KVCache:
    """One layer's keys and values so far (the prompt, then one token a step), preallocated: no torch.cat copy."""
    def __init__(self, capacity):  # positions it can hold: the prompt and the new tokens, at most block_size
        self.capacity, self.length, self.k, self.v = capacity, 0, None, None

    def append(self, k, v):  # k, v: (B, nh, T, hs) of the new positions
        if self.k is None:
            self.k, self.v = (t.new_empty(*t.shape[:2], self.capacity, t.size(3)) for t in (k, v))
        assert self.length == 0 or k.size(2) == 1, "after the prompt, one token a step: is_causal assumes no past"
        n, self.length = self.length, self.length + k.size(2)
        self.k[:, :, n : self.length], self.v[:, :, n : self.length] = k, v
        return self.k[:, :, : self.length], self.v[:, :, : self.length]  # (B, nh, length, hs)


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

    def forward(self, x, cache=None, attn_mask=None):
        # pre-LayerNorm: each branch reads a normalised copy, adds to the raw residual stream (ln_f normalises it)
        x = x + self.attn(self.ln_1(x), cache, attn_mask)  # tokens talk to each other
        return x + self.mlp(self.ln_2(x))  # each token thinks on its own


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor, two uses
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02  # 2 residual branches per block add up: scaling theirs keeps the sum's std from growing
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)  # (nn.LayerNorm already starts at weight 1, bias 0)

    def hidden_states(self, idx, kv_cache=None, pos=None, attn_mask=None):
        """(final LayerNorm output (B, T, C), kv_cache) of ids idx (B, T); kv_cache: a KVCache per layer, filled in
        place, or None. Packed rows (hellaswag.py) give pos (B, T) and attn_mask (B, 1, T, T; True = may attend)."""
        past = 0 if kv_cache is None else kv_cache[0].length  # positions already in the cache
        pos = torch.arange(past, past + idx.size(1), device=idx.device) if pos is None else pos  # (T,) after the cache
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_cache is None else kv_cache[i], attn_mask)
        return self.transformer.ln_f(x), kv_cache

    def logits(self, h):  # the real vocabulary only: padded rows are computed (a faster matmul), never seen
        return self.lm_head(h)[..., : self.config.vocab_size]

    def forward(self, idx, targets=None, return_logits=True):
        """idx, targets: (B, T) ids (target -1: ignored) -> (logits (B, T, vocab_size), mean cross-entropy or None).
        Training asks for (None, loss): logits it never reads are then freed early (and, compiled, get no gradient)."""
        check_input(idx, self.config)
        h, _ = self.hidden_states(idx)
        logits = self.logits(h)  # (B, T, vocab_size)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return (logits if return_logits else None), loss

    @torch.no_grad()  # not inference_mode: ids stay ordinary tensors; autocast keeps its bf16 weights (4x faster)
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, use_cache=True):
        """Yield max_new_tokens new ids, (B, 1) each, after idx (B, T); temperature 0 = greedy, top_k None = all.
        The KV cache computes the prompt once, then one token a step; use_cache=False recomputes the window."""
        check_input(idx, self.config, prompt=True, temperature=temperature, top_k=top_k)
        cache = None
        for _ in range(max_new_tokens):
            if cache is not None and cache[0].length < self.config.block_size:
                h, cache = self.hidden_states(idx[:, -1:], cache)  # only the newest token is new
            else:  # first step, no cache, or the window slid past block_size: compute the last block_size tokens
                size = min(idx.size(1) + max_new_tokens, self.config.block_size)  # all this call will ever need
                cache = [KVCache(size) for _ in self.transformer.h] if use_cache else None
                h, cache = self.hidden_states(idx[:, -self.config.block_size :], cache)
            logits = self.logits(h[:, -1, :]).float()  # (B, vocab_size): only the last position predicts
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
            yield next_id

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, use_cache=True):
        """idx (B, T) and max_new_tokens more: (B, T + max_new_tokens). See generate_stream."""
        return torch.cat([idx, *self.generate_stream(idx, max_new_tokens, temperature, top_k, generator, use_cache)], 1)

    def configure_optimizers(self, weight_decay, learning_rate, device_type, verbose=True):
        """AdamW as in GPT-3: decay only matrices (matmuls, embeddings), never biases or LayerNorms."""
        params = [p for p in self.parameters() if p.requires_grad]  # .parameters() yields tied ones once
        decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
        if verbose:
            print(f"weight decay {weight_decay}: {len(decay)} tensors, {sum(map(torch.numel, decay)):,} parameters; "
                  f"no decay: {len(no_decay)} tensors, {sum(map(torch.numel, no_decay)):,} parameters")
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda"  # one kernel for the whole update instead of several per tensor
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    def num_params(self, non_embedding=False):
        """Parameters (tied wte = lm_head once); non_embedding drops wpe (wte still counts: it is a matmul)."""
        return sum(p.numel() for p in self.parameters()) - non_embedding * self.transformer.wpe.weight.numel()

    def flops_per_token(self, seq_len):
        """Training FLOPs per token, 6N + 12*L*H*Q*T (PaLM, appendix B): full T x T attention (llm.c counts half)."""
        L, H, Q = self.config.n_layer, self.config.n_head, self.config.n_embd // self.config.n_head
        return 6 * self.num_params(non_embedding=True) + 12 * L * H * Q * seq_len

    def estimate_mfu(self, tokens_per_second, seq_len, peak_flops=H100_BF16_PEAK_FLOPS):
        """Model FLOPs utilisation: the fraction of the device's peak that training's FLOPs use."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops

    @classmethod
    def from_pretrained(cls, name_or_path, padded_vocab_size=None):
        """An OpenAI size (gpt2 ... gpt2-xl), an HF directory or a train_gpt2.py checkpoint: see weights.py."""
        import weights
        return weights.from_pretrained(name_or_path, padded_vocab_size)

    def save_hf(self, directory, tokenizer=True):
        """A directory that transformers' GPT2LMHeadModel and pipeline() load: see weights.py."""
        import weights
        weights.save_hf(self, directory, tokenizer)


def check_input(idx, config, prompt=False, temperature=0.0, top_k=None):
    """Input checks at the edge. Reading ids would stall a GPU (there, prompts only) or split a compiled graph."""
    if idx.dim() != 2 or (prompt and idx.size(1) == 0):
        raise ValueError(f"the input must be a (batch, length >= 1) tensor of ids, got shape {tuple(idx.shape)}")
    if not prompt and idx.size(1) > config.block_size:
        raise ValueError(f"sequence length {idx.size(1)} exceeds block_size {config.block_size}")
    if idx.numel() and (prompt or idx.device.type == "cpu") and not torch.compiler.is_compiling():
        lo, hi, V = int(idx.min()), int(idx.max()), config.vocab_size
        if lo < 0 or hi >= V:
            raise ValueError(f"prompt token ids must be in [0, {V}), got {lo}..{hi}" if prompt else
                             f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {V})")
    if not 0 <= temperature < float("inf"):  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 and finite (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, or None to keep every token; got {top_k}")
