"""model.py against independent references: Hugging Face's GPT2LMHeadModel and hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import model as model_module
import weights
from model import EOT, GPT, GPTConfig, KVCache

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


@pytest.fixture(scope="module")
def gpt124m():
    torch.manual_seed(0)
    return GPT(GPTConfig())


# ---------------------------------------------------------------- parity with HF


def test_logits_match_hf_tiny(tiny_dir):
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()
    ours = GPT.from_pretrained(tiny_dir).eval()
    idx = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = ours(idx)
    assert logits.shape == ref.shape == (3, 64, 50257)
    assert (logits - ref).abs().max().item() <= 1e-4


def test_loss_matches_hf_and_honours_ignore_index(tiny_dir):
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()
    ours = GPT.from_pretrained(tiny_dir).eval()
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 50257, (2, 32), generator=g)
    targets = torch.randint(0, 50257, (2, 32), generator=g)
    targets[0, :10] = -1
    with torch.no_grad():
        ref_logits = hf(idx).logits
        _, loss = ours(idx, targets)
    # by hand: mean negative log-likelihood over the positions whose target is not -1
    keep = targets != -1
    logp = torch.log_softmax(ref_logits.double(), dim=-1)
    expected = -logp[keep].gather(1, targets[keep].unsqueeze(1)).mean()
    assert abs(loss.item() - expected.item()) < 1e-5


def test_logits_match_hf_124m_shape(tmp_path, gpt124m):
    assert gpt124m.num_params() == 124_439_808  # the published GPT-2 small count, tied embeddings
    torch.manual_seed(3)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # random weights in the real 124M shape
    ours = GPT(GPTConfig())
    weights.load_hf_state_dict(ours, hf.state_dict())
    ours.eval()
    idx = torch.randint(0, 50257, (1, 128), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        err = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert err <= 1e-4


def test_padded_vocab_scores_like_trimmed(tiny_dir):
    plain = GPT.from_pretrained(tiny_dir).eval()
    padded = GPT.from_pretrained(tiny_dir, padded_vocab_size=50304).eval()
    assert padded.transformer.wte.weight.shape == (50304, 64)
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        padded.lm_head.weight[50257:] = 100.0  # padded rows that would dominate if they were seen
        a, la = plain(idx, idx)
        b, lb = padded(idx, idx)
    assert b.shape[-1] == 50257 and torch.equal(a, b) and torch.equal(la, lb)


# ---------------------------------------------------------------- generation


def test_kv_cache_greedy_equals_no_cache_and_hf(tiny_dir):
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()
    ours = GPT.from_pretrained(tiny_dir).eval()
    prompt = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(8))
    cached = ours.generate(prompt, 40, temperature=0)
    recomputed = ours.generate(prompt, 40, temperature=0, use_cache=False)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                      pad_token_id=EOT)
    assert cached.shape == (2, 48)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, ref)


def test_kv_cache_past_block_size_matches_sliding_window(tiny_dir):
    ours = GPT.from_pretrained(tiny_dir).eval()  # block_size 64
    prompt = torch.randint(0, 50257, (1, 50), generator=torch.Generator().manual_seed(9))
    cached = ours.generate(prompt, 30, temperature=0)
    assert torch.equal(cached, ours.generate(prompt, 30, temperature=0, use_cache=False))
    # and by hand: each token is the argmax of a forward pass over the last 64 tokens
    idx = prompt
    for _ in range(30):
        logits, _ = ours(idx[:, -64:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, idx)


def test_sampling_never_returns_padded_ids_and_is_reproducible(tiny_dir):
    model = GPT.from_pretrained(tiny_dir, padded_vocab_size=50304).eval()
    with torch.no_grad():
        h, _ = model.hidden_states(torch.tensor([[EOT]]))
        model.lm_head.weight[50257:] = 1e3 * h[0, -1] / h[0, -1].norm()  # huge padded logits
        assert model.lm_head(h)[0, -1, 50257:].max() > model.lm_head(h)[0, -1, :50257].max() + 100
    prompt = torch.full((4, 1), EOT)
    out = model.generate(prompt, 30, top_k=50, generator=torch.Generator().manual_seed(0))
    assert out.max().item() < 50257
    again = model.generate(prompt, 30, top_k=50, generator=torch.Generator().manual_seed(0))
    other = model.generate(prompt, 30, top_k=50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_top_k_restricts_to_k_most_likely(tiny_dir):
    model = GPT.from_pretrained(tiny_dir).eval()
    prompt = torch.tensor([[EOT]])
    with torch.no_grad():
        top5 = set(model(prompt)[0][0, -1].topk(5).indices.tolist())
    g = torch.Generator().manual_seed(3)
    firsts = {model.generate(prompt, 1, top_k=5, generator=g)[0, 1].item() for _ in range(40)}
    assert firsts <= top5 and len(firsts) > 1


# ---------------------------------------------------------------- init, tying, optimizer, FLOPs


def test_init_statistics_and_weight_tying(gpt124m):
    m = gpt124m
    assert m.transformer.wte.weight.data_ptr() == m.lm_head.weight.data_ptr()
    residual_std = 0.02 / math.sqrt(2 * 12)
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - residual_std) < 0.03 * residual_std, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert abs(p.std().item() - 0.02) < 0.03 * 0.02, name
            assert abs(p.mean().item()) < 1e-3, name
        elif name.endswith("bias") and ".ln_" not in name and "ln_f" not in name:
            assert torch.count_nonzero(p) == 0, name
        elif ".ln_" in name or "ln_f" in name:
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(p == expected), name


def test_tied_weights_train_as_one_like_hf(tmp_path):
    """One SGD step moves the shared wte/lm_head matrix by the sum of both uses' gradients, as in HF."""
    hf = hf_tiny(seed=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path))
    g = torch.Generator().manual_seed(4)
    idx, targets = torch.randint(0, 50257, (2, 32), generator=g), torch.randint(0, 50257, (2, 32), generator=g)
    before = hf.transformer.wte.weight.detach().clone()
    for m, loss_fn in ((hf.train(), lambda: hf(idx, labels=None).logits), (ours.train(), lambda: ours(idx)[0])):
        opt = torch.optim.SGD(m.parameters(), lr=100.0)
        F.cross_entropy(loss_fn().reshape(-1, 50257), targets.reshape(-1)).backward()
        opt.step()
    assert ours.transformer.wte.weight is ours.lm_head.weight
    moved = (hf.transformer.wte.weight - before).abs().max().item()
    assert moved > 1e-3  # the step did change the matrix
    assert (ours.transformer.wte.weight - hf.transformer.wte.weight).abs().max().item() <= 1e-5 * 100


def test_configure_optimizers_groups(gpt124m, capsys):
    opt = gpt124m.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type="cpu")
    decay, no_decay = opt.param_groups
    # per block: 4 weight matrices; plus wte (= lm_head) and wpe. Biases and LayerNorms: 8 per block + ln_f
    assert (len(decay["params"]), len(no_decay["params"])) == (12 * 4 + 2, 12 * 8 + 2)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8 and opt.defaults["lr"] == 6e-4
    n = sum(p.numel() for p in decay["params"]) + sum(p.numel() for p in no_decay["params"])
    assert n == 124_439_808
    assert "50 tensors" in capsys.readouterr().out


def test_flops_per_token_hand_computed(gpt124m):
    n_non_embedding = 124_439_808 - 1024 * 768  # without wpe
    expected = 6 * n_non_embedding + 12 * 12 * 12 * 64 * 1024
    assert gpt124m.flops_per_token(1024) == expected == 855_166_464
    assert gpt124m.estimate_mfu(500_000, 1024, peak_flops=1e15) == pytest.approx(expected * 500_000 / 1e15)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(tmp_path, tiny_dir):
    m = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token id 50257 is outside the vocabulary \[0, 50257\)"):
        m(torch.tensor([[1, 50257]]))
    with pytest.raises(ValueError, match=r"token id -3 is outside"):
        m(torch.tensor([[-3, 5]]))
    with pytest.raises(ValueError, match="neither an OpenAI size"):
        GPT.from_pretrained("gpt3-huge")
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embd=10, n_head=3)


def test_generate_rejects_bad_arguments():
    m = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=16, padded_vocab_size=128))
    ok = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match=r"length >= 1\) tensor of ids, got shape \(1, 0\)"):
        m.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 100\), got 1..120"):
        m.generate(torch.tensor([[1, 120]]), 3)  # a padded row: a valid embedding index, not a token
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        m.generate(ok, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        m.generate(ok, 3, top_k=0)
    assert torch.equal(m.generate(ok, 0), ok)


# ---------------------------------------------------------------- the KV cache and generate_stream


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64)).eval()
    m = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64))
    weights.load_hf_state_dict(m, hf.state_dict())
    return m.eval()


def test_generate_stream_yields_ordinary_tensors(tiny):
    """A caller may edit the ids it is given, or train on them (torch.inference_mode would forbid both)."""
    prompt = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(0))
    ids = list(tiny.generate_stream(prompt, 3, temperature=0))
    ids[0][0, 0] = 11  # e.g. a caller that forces a token
    _, loss = tiny(ids[1], ids[2])
    loss.backward()
    tiny.zero_grad(set_to_none=True)


def test_kv_cache_takes_one_token_a_step_after_the_prompt(tiny):
    """is_causal aligns the causal mask top-left: several new tokens after cached ones would each see
    too few keys, silently. The cache refuses that call instead of computing wrong numbers."""
    x = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = [KVCache(64) for _ in tiny.transformer.h]
    with torch.no_grad():
        full, _ = tiny.hidden_states(x)
        tiny.hidden_states(x[:, :8], cache)
        steps = [tiny.hidden_states(x[:, i : i + 1], cache)[0] for i in range(8, 12)]
        assert (torch.cat(steps, 1) - full[:, 8:]).abs().max() < 1e-5
        with pytest.raises(AssertionError, match="one token a step"):
            tiny.hidden_states(x[:, 8:], cache)


def test_kv_cache_holds_only_what_the_call_needs(tiny, monkeypatch):
    made = []

    class Recording(KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(model_module, "KVCache", Recording)
    prompt = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(2))
    tiny.generate(prompt, 10, temperature=0)
    assert {c.k.size(2) for c in made} == {18}  # 8 + 10 positions, not block_size 64
