"""play.ipynb, executed headless end to end and offline: a tiny random Hugging Face model, a
training log and checkpoints that this test writes stand in for GPT-2 and a real run."""
import dataclasses
import json
import os
import re
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

# the notebook runner (requirements-test.txt) may be missing on a GPU machine running `pytest -m gpu`
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient
write_kernel_spec = pytest.importorskip("ipykernel.kernelspec").write_kernel_spec
KernelSpecManager = pytest.importorskip("jupyter_client.kernelspec").KernelSpecManager
KernelManager = pytest.importorskip("jupyter_client.manager").KernelManager

from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "play.ipynb")
PROMPT = "Hello, I'm a language model,"


def write_log(path):
    """A run in progress: per-step train records, eval records with only some fields, step 4
    logged twice (as after a resume; the later value counts), and a half-written last line."""
    train = {0: 10.9, 1: 9.5, 2: 8.25, 3: 7.75, 4: 7.0, 5: 7.5}
    records = [{"step": s, "train_loss": v, "lr": 6e-4, "norm": 1.0} for s, v in train.items()]
    records += [{"step": 0, "val_loss": 10.95, "hellaswag": 0.25}, {"step": 3, "val_loss": 7.9},
                {"step": 5, "val_loss": 7.6, "hellaswag": 0.2625}, {"step": 4, "train_loss": 6.5}]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write('{"step": 6, "train_loss": 1.')  # the line the run is writing right now


def write_checkpoint(path, n_layer, step):
    """The format train_gpt2.py writes (loadable with weights_only=True)."""
    cfg = GPTConfig(block_size=64, n_layer=n_layer, n_head=2, n_embd=16, padded_vocab_size=50304)
    torch.save({"model": GPT(cfg).state_dict(), "config": dataclasses.asdict(cfg), "step": step,
                "optimizer": {}, "loader": {"position": 0}, "rng": {}, "args": {}}, path)


def kernel_manager(tmp_path):
    """A kernel that runs this interpreter (the venv's): a "python3" kernelspec elsewhere on
    the machine (~/.local/share/jupyter) could otherwise start a different Python."""
    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "this-python")  # argv [sys.executable, "-m", "ipykernel_launcher", ...]
    return KernelManager(kernel_name="this-python", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


def outputs_text(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def test_notebook_runs_end_to_end_offline(tmp_path, monkeypatch):
    torch.manual_seed(0)
    hf_dir = tmp_path / "tiny-gpt2"  # vocab 50257 so tiktoken's ids fit; 64 positions > prompt + 30
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    hf.save_pretrained(hf_dir)
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    write_log(log_dir / "log.jsonl")
    write_checkpoint(log_dir / "ckpt_000005.pt", n_layer=1, step=5)
    write_checkpoint(log_dir / "ckpt_000010.pt", n_layer=2, step=10)  # newest: the one to load
    # a user's own file: it sorts after ckpt_0... ("b" > "0"), so max(glob(...)) would load it
    write_checkpoint(log_dir / "ckpt_best.pt", n_layer=3, step=7)

    # the kernel inherits this environment (conftest already made tiktoken and the hub offline)
    monkeypatch.setenv("GPT2_MODEL", str(hf_dir))
    monkeypatch.setenv("GPT2_LOG", str(log_dir))  # a directory: log.jsonl and ckpt_*.pt inside
    monkeypatch.delenv("GPT2_CHECKPOINT", raising=False)  # exercise "newest beside the log"
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures as image/png

    nb = nbformat.read(NOTEBOOK, as_version=4)
    n_cells = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    # raises CellExecutionError, with the cell and its traceback, if any cell fails
    NotebookClient(nb, km=kernel_manager(tmp_path), timeout=300,
                   resources={"metadata": {"path": ROOT}}).execute()

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells)
    assert not any(o.output_type == "error" for c in code_cells for o in c.outputs)
    assert any("image/png" in o.get("data", {}) for c in code_cells for o in c.outputs)
    assert outputs_text(nb.cells[-1]).strip() == sys.executable
    text = "".join(outputs_text(c) for c in nb.cells[:n_cells])

    # 5 samples each: our model, HF's, and the checkpoint's; all continue the prompt
    samples = [line for line in text.splitlines() if line.startswith("> ")]
    assert len(samples) == 15 and all(s.startswith("> " + PROMPT) for s in samples)
    assert "greedy outputs identical: True" in text  # our generate agrees with HF's token for token
    # the log: the half-written line skipped, step 4's later value used, partial records read
    assert "skipped 1 line(s)" in text
    assert "min train loss 6.5000 (step 4)" in text
    assert "min val loss   7.6000 (step 5)" in text
    assert "max HellaSwag  0.2625 (step 5)" in text
    # the newest of train_gpt2.py's checkpoints (n_layer=2), not the user's ckpt_best.pt (n_layer=3)
    assert "ckpt_000010.pt: " in text and "n_layer=2" in text.split("ckpt_000010.pt: ")[1].splitlines()[0]
    assert "ckpt_best.pt" not in text

    # section 4, the walkthrough's experiments: their results, not only that they ran
    assert sum("image/png" in o.get("data", {}) for c in code_cells for o in c.outputs) >= 3  # log, wpe, stds
    # wpe of the tiny random model: its shape, and no structure (trained weights: neighbours alike)
    positions, channels, sim = find(r"wpe: (\d+) positions x (\d+) channels; neighbour cosine similarity (\S+)", text)
    assert (int(positions), int(channels)) == (64, 32) and abs(float(sim)) < 0.15
    # tying: one tensor; parameters() counts it once (as HF does), the state dict once per name
    assert "wte.weight is lm_head.weight: True" in text and "same storage: True" in text
    once, per_name = (int(n.replace(",", "")) for n in find(r"parameters: ([\d,]+) counted once, ([\d,]+) counted per name", text))
    assert once == sum(p.numel() for p in hf.parameters()) and per_name - once == 50257 * 32
    assert float(find(r"tied gradient vs embedding's \+ classifier's: max abs diff (\S+)", text)[0]) < 1e-6
    assert "after one SGD step: wte changed True | lm_head changed True | still one tensor True" in text
    # the toy residual stream: 100 additions of randn have std sqrt(100) = 10, scaled by 100**-0.5 std 1
    assert 9 < float(find(r"100 additions, scale 1: std (\S+)", text)[0]) < 11
    assert 0.9 < float(find(r"100 additions, scale 0.1: std (\S+)", text)[0]) < 1.1
    # the 12-block model: without the scale the stream grows about as sqrt(depth) (sqrt(12) = 3.5);
    # with it, all 12 blocks add less than one unscaled block does (24 branches at 1/24 the variance)
    table = text.split("block  scaled init  plain 0.02\n")[1]
    rows = [tuple(map(float, m)) for m in re.findall(r"^\s*\d+\s+([\d.]+)\s+([\d.]+)$", table, re.M)]
    assert len(rows) == 12
    scaled, plain = zip(*rows)
    assert all(a < b for a, b in zip(plain, plain[1:])) and plain[-1] > 2.5 * plain[0]
    assert scaled[-1] < plain[0] and plain[-1] > 3 * scaled[-1]
    # gradient accumulation: k micro-batches with loss / k give the big batch's gradient; without, k times it
    assert float(find(r"big batch vs accumulated with loss / k: max abs diff (\S+)", text)[0]) < 1e-6
    ratio, k = find(r"accumulated without / k: gradient norm (\S+) x the big batch's \(k = (\d+)\)", text)
    assert int(k) > 1 and abs(float(ratio) - int(k)) < 1e-3


def find(pattern, text):
    """The groups of pattern's first match in text (a clear failure if the notebook printed none)."""
    match = re.search(pattern, text)
    assert match, f"the notebook printed no line matching {pattern!r}"
    return match.groups()


def test_committed_notebook_has_no_outputs():
    """Outputs run here would come from random weights or someone's own run: they would mislead."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells)
