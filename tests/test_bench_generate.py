"""bench_generate.py: the bytes a decoding step reads (the roofline's denominator) against GPT-2's
parameter count worked out by hand, and the command line end to end (a short run of the real
124M shape: its table, and the check that every float32 output agrees)."""
import subprocess
import sys

import pytest

from bench_generate import bytes_per_token, parse_threads
from conftest import ROOT
from model import GPT, GPTConfig, config_for


@pytest.mark.parametrize("padded", [0, 50304])
def test_bytes_per_token_by_hand(padded):
    C, L, V = 768, 12, padded or 50257
    model = GPT(config_for("gpt2", padded_vocab_size=padded))
    # per block: c_attn 3C*C + 3C, attn c_proj C*C + C, c_fc 4C*C + 4C, mlp c_proj C*4C + C
    matmul = L * (12 * C * C + 9 * C) + V * C  # + lm_head (the tied wte, padded rows included), no bias
    float32 = L * 4 * C + 2 * C + 2 * C  # LayerNorms (2 per block, ln_f) and one row each of wte and wpe
    assert bytes_per_token(model, 4) == 4 * (matmul + float32)
    assert bytes_per_token(model, 2) == 2 * matmul + 4 * float32
    if not padded:  # 124M parameters, less wpe's 1024 rows but one: 0.49 GB a token in float32
        assert bytes_per_token(model, 4) == 4 * (model.num_params() - 1023 * C + C)


def test_parse_threads():
    assert parse_threads("2") == [2] and parse_threads("1,2") == [1, 2]
    for bad in ("0", "two", "1,", ""):
        with pytest.raises(Exception, match="expected thread counts"):
            parse_threads(bad)


def test_cli_prints_the_roofline_table():
    result = subprocess.run([sys.executable, "bench_generate.py", "--new-tokens", "3", "--repeats", "1",
                             "--threads", "1", "--skip-no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "float32 greedy outputs identical: ours, KV cache, HF transformers generate" in out
    assert "threads 1: memory bandwidth " in out
    rows = {line[:32].strip(): line[32:].split() for line in out.splitlines()
            if line.startswith(("ours", "HF"))}
    assert set(rows) == {"ours, KV cache", "ours, KV cache, bf16 autocast", "HF transformers generate"}
    assert rows["ours, KV cache"][2] == f"{bytes_per_token(GPT(GPTConfig()), 4) / 1e6:.1f}"  # MB/token
    assert rows["ours, KV cache, bf16 autocast"][2] == f"{bytes_per_token(GPT(GPTConfig()), 2) / 1e6:.1f}"
