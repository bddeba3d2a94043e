"""sample.py on a small random Hugging Face GPT-2 directory: its text is HF's own (greedy, and
sampled with the same seed), decoded by tiktoken; it streams token by token without breaking
characters; --stop-at-eot, stdin prompts, a prompt longer than the block, and bad input as
`error: ...` with exit status 2. Also utils.autocast_dtype, the dtype that --dtype auto picks."""
import math
import os
import subprocess
import sys

import pytest
import tiktoken
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import sample
import utils
from conftest import ROOT
from model import EOT

BLOCK_SIZE = 64
PROMPT = "Hello, I'm a language model,"
enc = tiktoken.get_encoding("gpt2")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def save_tiny_gpt2(directory, seed=0, edit=None):
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK_SIZE, vocab_size=50257))
    if edit:
        with torch.no_grad():
            edit(hf)
    hf.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("hf"))


def hf_text(directory, prompt, new_tokens, seed=None, **sampling):
    """The reference: HF generate's continuation of prompt, decoded by tiktoken. With a seed, HF
    samples with torch's global generator seeded alike; sample.py's own generator gives the same
    random numbers for the same seed, so the same tokens come out."""
    hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    hf.generation_config.eos_token_id = None  # never stop early, nor forbid <|endoftext|>
    ids = torch.tensor([enc.encode(prompt, allowed_special={"<|endoftext|>"})])
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=EOT, do_sample=seed is not None, top_p=1.0,
                          **sampling)
    return enc.decode(out[0].tolist())


class Recorder:
    """A stdout that keeps each write apart, to see what was printed when."""
    def __init__(self):
        self.writes, self.flushes = [], 0

    def write(self, s):
        self.writes.append(s)

    def flush(self):
        self.flushes += 1

    def text(self):
        return "".join(self.writes)


def run(argv, dtype="float32"):
    """sample.main(argv) -> (exit code, what it printed). float32 unless told: auto is bfloat16 on a
    CPU that has it, and HF's text is float32's."""
    out = Recorder()
    code = sample.main([*argv, "--dtype", dtype] if dtype else argv, out=out)
    return code, out


# ---------------------------------------------------------------- the text


def test_greedy_is_hf_greedy(hf_dir):
    code, out = run(["-m", hf_dir, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "24"])
    assert code == 0
    assert out.text() == hf_text(hf_dir, PROMPT, 24) + "\n"


def test_sampling_is_hf_sampling_with_the_same_seed(hf_dir):
    argv = ["-m", hf_dir, "--prompt", PROMPT, "--max-new-tokens", "30", "--temperature", "0.8", "--top-k", "40"]
    code, out = run(argv + ["--seed", "7"])
    assert code == 0
    assert out.text() == hf_text(hf_dir, PROMPT, 30, seed=7, temperature=0.8, top_k=40) + "\n"
    assert run(argv + ["--seed", "7"])[1].text() == out.text()  # the same seed, the same text
    assert run(argv + ["--seed", "8"])[1].text() != out.text()


def test_output_streams_token_by_token(hf_dir):
    # random weights pick random tokens, many of them pieces of characters: the streamed pieces
    # must still add up to tiktoken's decode of the whole sequence
    code, out = run(["-m", hf_dir, "--prompt", PROMPT, "--max-new-tokens", "40", "--top-k", "50257", "--seed", "3"])
    assert code == 0
    assert out.text() == hf_text(hf_dir, PROMPT, 40, seed=3, top_k=50257) + "\n"
    assert out.writes[0] == PROMPT  # the prompt first, before the first new token is computed
    assert len(out.writes) >= 20 and out.flushes >= len(out.writes) - 1  # each piece is flushed as it comes


def test_several_samples_print_one_after_another(hf_dir):
    code, out = run(["-m", hf_dir, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "8",
                     "--num-samples", "3"])
    greedy = hf_text(hf_dir, PROMPT, 8) + "\n"
    assert code == 0 and out.text() == greedy + "---------------\n" + greedy + "---------------\n" + greedy


class Scripted(torch.nn.Module):
    """A stand-in model whose generate_stream yields the ids it is given."""
    def __init__(self, ids):
        super().__init__()
        self.ids, self.weight = ids, torch.nn.Parameter(torch.zeros(1))

    def generate_stream(self, idx, max_new_tokens, *args):
        for token in self.ids[:max_new_tokens]:
            yield torch.tensor([[token]])


def test_a_character_split_across_tokens_prints_whole():
    text = " 😀 世界, café! 🤖"
    ids = enc.encode(text)
    pieces = [enc.decode_single_token_bytes(i) for i in ids]
    # the case exists: some tokens are parts of a character, undecodable on their own
    assert sum(1 for p in pieces if "\ufffd" in p.decode("utf-8", errors="replace")) >= 4
    out = Recorder()
    assert sample.stream_sample(Scripted(ids), enc, [15496], out, len(ids)) == ids
    assert out.text() == text + "\n"
    # each character printed once its last byte arrived, never garbage on the way (a space before
    # a character comes at once: it shares a token with the character's first bytes)
    assert out.writes == [" ", "😀", " ", "世", "界", ",", " café", "!", " ", "🤖", "\n"]


def test_bytes_that_never_form_a_character_print_as_tiktoken_decodes_them():
    byte_token = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab - 1)}
    ids = [byte_token[b"\xe4"], byte_token[b"a"], *enc.encode(" ok"), byte_token[b"\xf0"], byte_token[b"\x9f"]]
    out = Recorder()
    sample.stream_sample(Scripted(ids), enc, [15496], out, len(ids))
    assert out.text() == enc.decode(ids) + "\n" == "\ufffda ok\ufffd\n"  # the unfinished end too


def test_stop_at_eot(tmp_path):
    # a model whose every position gives <|endoftext|> probability 0.2 and every other token the
    # same small one: the final LayerNorm outputs the unit vector e0, and only EOT's row has e0 weight
    c = math.log(0.25 * (50257 - 1))

    def eot_one_in_five(hf):
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.zero_()[0] = 1.0
        hf.transformer.wte.weight[:, 0] = 0.0
        hf.transformer.wte.weight[EOT, 0] = c

    directory = save_tiny_gpt2(tmp_path / "eot", edit=eot_one_in_five)
    argv = ["-m", directory, "--prompt", PROMPT, "--max-new-tokens", "40", "--seed", "5"]
    full = hf_text(directory, PROMPT, 40, seed=5, top_k=50)
    assert full.count("<|endoftext|>") >= 2  # the case: this seed's sample has documents after its first one
    assert run(argv)[1].text() == full + "\n"  # without the flag, <|endoftext|> is printed as text
    code, out = run(argv + ["--stop-at-eot"])
    assert code == 0 and out.text() == full.split("<|endoftext|>")[0] + "\n"


def test_prompt_longer_than_the_block_slides_the_window(hf_dir, capsys):
    prompt = " ".join(f"word{i}" for i in range(40))
    ids = enc.encode(prompt)
    assert len(ids) > BLOCK_SIZE
    code, out = run(["-m", hf_dir, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "6"])
    assert code == 0
    assert f"the prompt has {len(ids)} tokens, more than the model's block size {BLOCK_SIZE}" in capsys.readouterr().err
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():  # the reference: HF's forward on the last BLOCK_SIZE tokens, one step at a time
        for _ in range(6):
            ids.append(int(hf(torch.tensor([ids[-BLOCK_SIZE:]])).logits[0, -1].argmax()))
    assert out.text() == enc.decode(ids) + "\n"


def test_endoftext_prompt_samples_from_scratch(hf_dir):
    code, out = run(["-m", hf_dir, "--prompt", "<|endoftext|>", "--temperature", "0", "--max-new-tokens", "5"])
    assert code == 0 and out.text() == hf_text(hf_dir, "<|endoftext|>", 5) + "\n"  # the one token 50256


def test_prompt_from_stdin_in_a_real_process(hf_dir):
    # exactly as written, no newline added or removed
    prompt = "Once upon a time\n"
    result = subprocess.run([sys.executable, "sample.py", "-m", hf_dir, "--prompt-file", "-", "--temperature", "0",
                             "--max-new-tokens", "8", "--device", "cpu", "--dtype", "float32"], cwd=ROOT,
                            input=prompt.encode(), capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == hf_text(hf_dir, prompt, 8) + "\n"
    assert "parameters on cpu, float32, prompt 5 tokens" in result.stderr.decode()


def test_prompt_from_a_file(hf_dir, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("Le café est là ", encoding="utf-8")
    code, out = run(["-m", hf_dir, "--prompt-file", str(path), "--temperature", "0", "--max-new-tokens", "6"])
    assert code == 0 and out.text() == hf_text(hf_dir, "Le café est là ", 6) + "\n"


# ---------------------------------------------------------------- bad input


@pytest.fixture
def files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["-m", "no-such-model"], "-m no-such-model: 'no-such-model' is neither an OpenAI size"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt-file", "{files}/empty.txt"], "the prompt is empty"),
    (["--prompt-file", "{files}/missing.txt"], "--prompt-file {files}/missing.txt: cannot read it"),
    (["--prompt-file", "{files}/latin1.txt"], "--prompt-file {files}/latin1.txt: not UTF-8 text (byte 0xe9 at "
                                              "offset 3)"),
    (["--device", "nonsense"], "--device nonsense: not usable on this machine"),
])
def test_bad_input_is_an_error(hf_dir, files, capsys, args, message):
    args = [a.format(files=files) for a in args]
    code, out = run(["-m", hf_dir, *args])
    assert code == 2 and out.text() == ""
    assert f"error: {message.format(files=files)}" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--top-k", "0"], "argument --top-k: expected a number >= 1, got '0'"),
    (["--temperature", "-1"], "argument --temperature: expected a number >= 0, got '-1'"),
    (["--temperature", "nan"], "argument --temperature: expected a number >= 0, got 'nan'"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: expected a number >= 1, got '0'"),
    (["--num-samples", "two"], "argument --num-samples: expected a number, got 'two'"),
    (["--prompt", "a", "--prompt-file", "b"], "argument --prompt-file: not allowed with argument --prompt"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
])
def test_bad_flag_is_an_error(hf_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        run(["-m", hf_dir, *args], dtype=None)
    assert exit_.value.code == 2 and f"error: {message}" in capsys.readouterr().err


def test_bad_input_exits_2_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", "-m", str(tmp_path / "nothing.pt")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: -m {tmp_path / 'nothing.pt'}: ")


# ---------------------------------------------------------------- --dtype auto (utils.autocast_dtype)

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AMX = "flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\nvmx flags\t: ept\n"
X86_NONE = "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\nvmx flags\t: avx512_bf16\n"  # not a CPU flag line
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve i8mm bf16 sve2\n"
ARM_NONE = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics\n"


@pytest.mark.parametrize("cpuinfo, answer", [(X86_BF16, True), (X86_AMX, True), (X86_NONE, False),
                                             (ARM_BF16, True), (ARM_NONE, False), ("processor\t: 0\n", None)])
def test_bf16_from_cpuinfo(cpuinfo, answer):
    assert utils.bf16_from_cpuinfo(cpuinfo) is answer


def test_this_cpus_answer_is_what_the_os_says(monkeypatch):
    monkeypatch.delenv(utils.CPU_BF16_ENV, raising=False)
    if sys.platform == "darwin":
        said = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        expected = said.stdout.strip() == "1" if said.returncode == 0 else None
    elif os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:  # read independently: the CPU's first feature line
            line = next((ln for ln in f if ln.split(":")[0].strip() in ("flags", "Features")), None)
        words = set(line.split(":", 1)[1].split()) if line else set()
        expected = None if line is None else bool(words & {"avx512_bf16", "amx_bf16", "bf16"})
    else:
        expected = None
    assert utils.cpu_bf16_from_os() is expected
    if expected is not None:
        assert utils.cpu_has_fast_bf16() is expected
        assert utils.autocast_dtype("cpu", "auto") is (torch.bfloat16 if expected else None)


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_on_the_cpu_only_where_native(monkeypatch, native):
    monkeypatch.setenv(utils.CPU_BF16_ENV, "1" if native else "0")
    assert utils.cpu_has_fast_bf16() is native
    assert utils.autocast_dtype("cpu", "auto") is (torch.bfloat16 if native else None)
    assert utils.autocast_dtype("cuda", "auto") is torch.bfloat16  # CUDA: always
    assert utils.autocast_dtype("mps", "auto") is None
    # an explicit --dtype wins either way
    assert utils.autocast_dtype("cpu", "float32") is None
    assert utils.autocast_dtype("cpu", "bfloat16") is torch.bfloat16
    assert utils.autocast_dtype("cpu", "float16") is torch.float16


@pytest.mark.parametrize("measured", [True, False])
def test_without_an_answer_from_the_os_a_measurement_decides_once(monkeypatch, measured):
    monkeypatch.delenv(utils.CPU_BF16_ENV, raising=False)
    calls = []
    monkeypatch.setattr(utils, "cpu_bf16_from_os", lambda: None)
    monkeypatch.setattr(utils, "_bf16_matmul_is_faster", lambda: calls.append(1) or measured)
    utils._detected_cpu_bf16.cache_clear()
    try:
        assert utils.cpu_has_fast_bf16() is measured and utils.cpu_has_fast_bf16() is measured
        assert utils.autocast_dtype("cpu", "auto") is (torch.bfloat16 if measured else None)
        assert calls == [1]  # measured once, then remembered
    finally:
        utils._detected_cpu_bf16.cache_clear()  # the next caller detects for real


def test_the_measurement_returns_an_answer():
    assert utils._bf16_matmul_is_faster(n=32, repeats=1) in (True, False)


def test_bad_override_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(utils.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="GPT2_CPU_BF16='yes': expected 1 .* or 0"):
        utils.autocast_dtype("cpu", "auto")
    with pytest.raises(ValueError, match="--dtype float64"):
        utils.autocast_dtype("cuda", "float64")


@pytest.mark.parametrize("native", ["1", "0"])
def test_sampling_runs_under_the_autocast_dtype_auto_picks(hf_dir, capsys, monkeypatch, native):
    monkeypatch.setenv(utils.CPU_BF16_ENV, native)
    seen = []
    from model import GPT

    original = GPT.generate_stream

    def spy(self, *args, **kwargs):  # what autocast is on while the model generates
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        yield from original(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "generate_stream", spy)
    expected = torch.bfloat16 if native == "1" else None
    for dtype in ("auto", None):  # --dtype auto, and no --dtype at all
        code, out = run(["-m", hf_dir, "--temperature", "0", "--max-new-tokens", "4"], dtype=dtype)
        assert code == 0 and out.text().startswith(PROMPT)
        assert f"parameters on cpu, {'bfloat16' if expected else 'float32'}" in capsys.readouterr().err
    code, out = run(["-m", hf_dir, "--temperature", "0", "--max-new-tokens", "4"], dtype="bfloat16")  # explicit
    code, out = run(["-m", hf_dir, "--temperature", "0", "--max-new-tokens", "4"], dtype="float32")
    assert seen == [expected, expected, torch.bfloat16, None]


def test_bad_cpu_bf16_override_is_an_error(hf_dir, capsys, monkeypatch):
    monkeypatch.setenv(utils.CPU_BF16_ENV, "true")
    code, out = run(["-m", hf_dir], dtype=None)
    assert code == 2 and out.text() == ""
    assert "error: GPT2_CPU_BF16='true': expected 1" in capsys.readouterr().err


FAULTS_PER_STEP = """
import resource, sys, torch, utils
from model import GPT, GPTConfig
applied = utils.keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
optimizer = model.configure_optimizers(0.1, 1e-3, "cpu", verbose=False)
x = torch.randint(0, 50257, (4, 64))  # logits: 4 x 64 x 50304 floats, 51 MB
def step():
    model(x, x)[1].backward()
    optimizer.step()
    optimizer.zero_grad()
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def transparent_huge_pages_always():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


# With huge pages always on, a fresh 51 MB block faults in 2 MB pages: too few faults to count here.
@pytest.mark.skipif(not sys.platform.startswith("linux") or transparent_huge_pages_always(),
                    reason="counts glibc's 4 KB page faults: Linux without transparent huge pages always on")
def test_keeping_freed_memory_stops_the_page_faults_of_every_step():
    # Counted, not timed: page faults (the kernel handing memory back zero-filled) per training step
    # of a model whose logits are 51 MB, with glibc's default allocator and with keep_freed_memory.
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], float(out[1])

    (_, default), (applied, kept) = faults("default"), faults("keep")
    assert applied == "True"
    assert default > 12_000  # 51 MB is 12,500 pages of 4 KB: every step faults in its logits again, and more
    assert kept < default / 4
