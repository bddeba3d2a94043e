"""`python weights.py export`: a checkpoint written by train_gpt2.py itself becomes a directory that
transformers loads (checked against the checkpoint's own weights and tiktoken), with a model card
whose numbers are the checkpoint's and its log's; --push-to-hub hands exactly that directory to
huggingface_hub (a recorder stands in for the Hub, which tests never reach); errors are messages.
"""
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from huggingface_hub.repocard import metadata_load

import model as model_module
import train_gpt2 as tg
import weights
from conftest import ROOT, read_log, write_shards
from model import EOT, GPT, GPTConfig

# as in test_train.py: 2 layers, width 32, 16-token sequences, 64 tokens per step
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "16", "--batch-size", "2",
        "--total-batch-size", "64", "--no-hellaswag", "--num-samples", "0", "--eval-every", "0",
        "--val-tokens", "64", "--seed", "7"]
# a learning rate high enough that the evaluations of steps 3 and 5 differ
FAST = ["--warmup-steps", "0", "--lr", "1e-2"]
HELLASWAG = [  # short enough for a 16-token context
    {"ctx": "The cat sat on the", "endings": [" mat.", " sky.", " idea.", " loud."], "label": 0},
    {"ctx": "She opened the", "endings": [" door.", " seven.", " blue.", " quickly."], "label": 0},
    {"ctx": "He drank a cup of", "endings": [" tea.", " roads.", " walls.", " the."], "label": 0},
    {"ctx": "Birds can", "endings": [" fly.", " table.", " green.", " of."], "label": 0},
]
TEXT = "Hello, I'm a language model,  héllo 世界\n\n\tcode: x+=1<|endoftext|> The end."

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 5-step train_gpt2.py run: val loss and HellaSwag at steps 0, 3 and 5, checkpoints at 2, 4, 5."""
    root = tmp_path_factory.mktemp("run")
    shards = write_shards(str(root / "shards"), [400, 300, 250, 350])
    hellaswag = root / "hellaswag.jsonl"
    hellaswag.write_text("".join(json.dumps(ex) + "\n" for ex in HELLASWAG))
    log_dir = root / "log"
    assert tg.main([*TINY, *FAST, "--data", shards, "--max-steps", "5", "--eval-every", "3", "--checkpoint-every",
                    "2", "--keep-checkpoints", "5", "--hellaswag", "--hellaswag-file", str(hellaswag),
                    "--log-dir", str(log_dir)]) == 0
    assert sorted(os.listdir(log_dir)) == ["ckpt_000002.pt", "ckpt_000004.pt", "ckpt_000005.pt", "log.jsonl"]
    return types.SimpleNamespace(root=root, shards=shards, log_dir=log_dir)


def checkpoint_gpt(path):
    """The checkpoint's GPT, built with torch and model.GPT alone (not weights.py): the reference."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    gpt = GPT(GPTConfig(**ckpt["config"]))
    gpt.load_state_dict(ckpt["model"])
    return gpt.eval()


def card_rows(directory):
    """The model card's table as {row name: value}, and its metadata as huggingface_hub parses it."""
    text = (directory / "README.md").read_text()
    rows = dict(line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ") and " | " in line)
    return {k.strip(): v.strip() for k, v in rows.items()}, metadata_load(directory / "README.md"), text


def export(args, capsys):
    """weights.main(["export", ...]): (exit status, stdout, the `error: ...` line of stderr or None;
    stderr also holds transformers' progress bars)."""
    code = weights.main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, next((line for line in err.splitlines() if line.startswith("error: ")), None)


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records each call (and the card the upload would send);
    `fail` maps a method name to the exception it raises."""
    calls, fail = [], {}

    def create_repo(self, *args, **kwargs):
        RecordingHfApi.calls.append(("create_repo", args, kwargs))
        if "create_repo" in self.fail:
            raise self.fail["create_repo"]
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self, **kwargs):
        card = open(os.path.join(kwargs["folder_path"], "README.md")).read()
        RecordingHfApi.calls.append(("upload_folder", sorted(os.listdir(kwargs["folder_path"])), kwargs, card))
        if "upload_folder" in self.fail:
            raise self.fail["upload_folder"]


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(RecordingHfApi, "calls", [])
    monkeypatch.setattr(RecordingHfApi, "fail", {})
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi


# ---------------------------------------------------------------- the exported directory


def test_export_command_writes_a_model_transformers_loads(run):
    """The command as a user types it, in a real process: the directory loads in GPT2LMHeadModel and
    in pipeline("text-generation"), computing what the checkpoint's GPT computes."""
    import tiktoken
    from transformers import AutoTokenizer, GPT2LMHeadModel, pipeline

    cmd = [sys.executable, os.path.join(ROOT, "weights.py"), "export", "log/ckpt_000005.pt", "gpt2-tiny"]
    proc = subprocess.run(cmd, cwd=run.root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out_dir = run.root / "gpt2-tiny"
    files = ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json"]
    assert sorted(os.listdir(out_dir)) == files
    assert f"wrote gpt2-tiny: {', '.join(files)}" in proc.stdout
    assert 'pipeline("text-generation", model="gpt2-tiny")' in proc.stdout  # how to load it

    ours = checkpoint_gpt(run.log_dir / "ckpt_000005.pt")
    hf, info = GPT2LMHeadModel.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() <= 1e-5

    enc = tiktoken.get_encoding("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer(TEXT)["input_ids"] == enc.encode(TEXT, allowed_special="all")
    generator = pipeline("text-generation", model=str(out_dir))  # the model and tokenizer, both from the directory
    got = generator("Hello, world", max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt = enc.encode("Hello, world")
    expected = ours.generate(torch.tensor([prompt]), 6, temperature=0)[0].tolist()  # greedy
    # the same tokens; HF stops after <|endoftext|> (the export's eos_token_id), ours goes on
    end = expected.index(EOT, len(prompt)) + 1 if EOT in expected[len(prompt):] else len(expected)
    assert got == expected[:end] and len(got) > len(prompt)

    rows, _, _ = card_rows(out_dir)
    assert rows["parameters"] == f"{hf.num_parameters():,}"  # what transformers counts in the export


def test_model_card_numbers_are_the_checkpoints_and_its_logs(run, tmp_path, capsys):
    log = read_log(run.log_dir)
    val = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
    hellaswag = {r["step"]: r["hellaswag"] for r in log if "hellaswag" in r}
    assert sorted(val) == sorted(hellaswag) == [0, 3, 5] and val[3] != val[5]
    # step 4's checkpoint: the latest evaluations at or before step 4 are step 3's, not step 5's
    for step, evaluated in ((4, 3), (5, 5)):
        out_dir = tmp_path / f"step{step}"
        assert export([run.log_dir / f"ckpt_{step:06d}.pt", out_dir], capsys)[0] == 0
        rows, metadata, text = card_rows(out_dir)
        assert rows["shape"] == "2 layers, 2 heads, width 32, context 16 tokens"
        assert rows["training steps"] == f"{step}"
        assert rows["training tokens"] == f"{step * 64} ({step} steps x 64 tokens per step)"
        assert rows["training data"] == f"`{run.shards}`"
        assert rows["val loss"] == f"{val[evaluated]:.4f} (step {evaluated})"
        assert rows["HellaSwag acc_norm"] == f"{hellaswag[evaluated]:.4f} (step {evaluated})"
        assert "trained from scratch" in text and f"ckpt_{step:06d}.pt" in text
        assert f'pipeline("text-generation", model="{out_dir}")' in text  # no --push-to-hub: the local path
        # the metadata the Hub reads; no license is made up (the Hub accepts a card without one)
        assert metadata == {"library_name": "transformers", "pipeline_tag": "text-generation"}
        assert "add a `license:` line" in text


def test_model_card_says_not_recorded_where_nothing_was(run, tmp_path, capsys):
    lonely = tmp_path / "copied" / "ckpt_000004.pt"  # a checkpoint copied away from its log.jsonl
    lonely.parent.mkdir()
    shutil.copy(run.log_dir / "ckpt_000004.pt", lonely)
    assert export([lonely, tmp_path / "a"], capsys)[0] == 0
    rows, _, _ = card_rows(tmp_path / "a")
    assert rows["training steps"] == "4" and rows["training tokens"].startswith("256 ")
    assert rows["val loss"] == rows["HellaSwag acc_norm"] == "not recorded"

    # a checkpoint with weights and shape only (no step, no args), and a Hugging Face directory
    gpt = checkpoint_gpt(run.log_dir / "ckpt_000004.pt")
    bare = tmp_path / "bare.pt"
    torch.save({"model": gpt.state_dict(), "config": vars(gpt.config)}, bare)
    for source in (bare, tmp_path / "a"):
        out_dir = tmp_path / f"from_{source.name}"
        assert export([source, out_dir], capsys)[0] == 0
        rows, _, _ = card_rows(out_dir)
        assert rows["shape"] == "2 layers, 2 heads, width 32, context 16 tokens"
        for name in ("training steps", "training tokens", "training data", "val loss", "HellaSwag acc_norm"):
            assert rows[name] == "not recorded", name


def test_card_names_the_hub_dataset_that_fineweb_tokenized(run, tmp_path, capsys):
    """--data made by fineweb.py: its manifest.json names the Hub dataset, which the card links."""
    gpt = checkpoint_gpt(run.log_dir / "ckpt_000004.pt")
    data = tmp_path / "edu_fineweb10B"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"dataset": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT"}))
    ckpt = {"model": gpt.state_dict(), "config": vars(gpt.config), "step": 3,
            "args": {"data": str(data), "total_batch_size": 64, "init_from": None}}
    torch.save(ckpt, tmp_path / "ckpt_000003.pt")
    assert export([tmp_path / "ckpt_000003.pt", tmp_path / "out"], capsys)[0] == 0
    rows, metadata, _ = card_rows(tmp_path / "out")
    assert rows["training data"] == f"`{data}` (HuggingFaceFW/fineweb-edu, sample-10BT)"
    assert metadata["datasets"] == ["HuggingFaceFW/fineweb-edu"]


def test_fine_tuned_checkpoint_exports_the_same_way(run, tmp_path, monkeypatch, capsys):
    """`train_gpt2.py --init-from gpt2` writes an ordinary checkpoint (its args say init_from=gpt2).
    OpenAI's gpt2 is replaced by a tiny HF model of the same kind, served as the hub download."""
    from transformers import GPT2Config, GPT2LMHeadModel
    import huggingface_hub

    torch.manual_seed(3)
    tiny_openai = tmp_path / "openai"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=1024)).save_pretrained(tiny_openai)
    monkeypatch.setitem(model_module.OPENAI_SIZES, "gpt2", dict(n_layer=2, n_head=2, n_embd=32))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, f: str(tiny_openai / f))
    log_dir = tmp_path / "finetune"
    assert tg.main([*TINY, *FAST, "--data", run.shards, "--max-steps", "2", "--init-from", "gpt2",
                    "--log-dir", str(log_dir)]) == 0
    ckpt = torch.load(log_dir / "ckpt_000002.pt", weights_only=True)
    assert ckpt["args"]["init_from"] == "gpt2" and ckpt["config"]["block_size"] == 1024
    assert export([log_dir / "ckpt_000002.pt", tmp_path / "out"], capsys)[0] == 0
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 50257, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(idx).logits - checkpoint_gpt(log_dir / "ckpt_000002.pt")(idx)[0]).abs().max().item() <= 1e-5
    rows, metadata, text = card_rows(tmp_path / "out")
    assert "fine-tuned from `gpt2`" in text
    assert rows["training tokens"] == "128 (2 steps x 64 tokens per step), fine-tuning only"
    assert rows["val loss"] == f"{read_log(log_dir)[-1]['val_loss']:.4f} (step 2)"
    assert metadata["base_model"] == "openai-community/gpt2"  # the Hub links the model it came from


# ---------------------------------------------------------------- --push-to-hub


def test_push_to_hub_uploads_the_export_with_its_card(run, tmp_path, hub, capsys):
    out_dir = tmp_path / "gpt2-repro"
    code, out, err = export([run.log_dir / "ckpt_000005.pt", out_dir, "--push-to-hub", "alice/gpt2-repro",
                             "--private"], capsys)
    assert code == 0, err
    (create, upload) = hub.calls
    assert create == ("create_repo", ("alice/gpt2-repro",), {"private": True, "exist_ok": True})
    name, files, kwargs, card = upload
    assert name == "upload_folder" and files == sorted(os.listdir(out_dir)) and "model.safetensors" in files
    assert kwargs == {"repo_id": "alice/gpt2-repro", "folder_path": str(out_dir),
                      "commit_message": "Export of ckpt_000005.pt by weights.py", "ignore_patterns": [".save_hf-*"]}
    assert card.startswith("---\n") and "# alice/gpt2-repro" in card  # the card was in place before the upload
    assert 'pipeline("text-generation", model="alice/gpt2-repro")' in card  # loading from the Hub
    assert "uploaded: https://huggingface.co/alice/gpt2-repro" in out
    hub.calls.clear()
    assert export([run.log_dir / "ckpt_000005.pt", out_dir, "--push-to-hub", "alice/gpt2-repro"], capsys)[0] == 0
    assert hub.calls[0][2] == {"private": False, "exist_ok": True}  # public unless --private


def hub_error(status):
    """huggingface_hub's own HTTP error, as it raises it for a response with this status."""
    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub.utils import HfHubHTTPError
    response = types.SimpleNamespace(status_code=status, headers={}, request=None)
    return HfHubHTTPError(f"{status} Client Error for url: https://huggingface.co/api/repos/create\n\n"
                          "Invalid credentials in Authorization header", response=response)


def test_push_without_a_token_says_how_to_log_in(run, tmp_path, hub, capsys):
    try:
        from huggingface_hub.errors import LocalTokenNotFoundError
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub.utils import LocalTokenNotFoundError
    source = run.log_dir / "ckpt_000005.pt"
    for method, error in (("create_repo", hub_error(401)), ("create_repo", hub_error(403)),
                          ("upload_folder", LocalTokenNotFoundError("Token is required, but no token found."))):
        hub.calls.clear()
        hub.fail = {method: error}
        code, out, err = export([source, tmp_path / "out", "--push-to-hub", "alice/gpt2-repro"], capsys)
        assert code == 2 and err.startswith("error: the Hugging Face Hub refused to write alice/gpt2-repro (")
        assert err.endswith("run `hf auth login` (or set HF_TOKEN), then this command again")
        assert [c[0] for c in hub.calls] == (["create_repo"] if method == "create_repo" else
                                             ["create_repo", "upload_folder"])
    # any other failure (a server error, the network): not a login problem, and the export is kept
    for error in (hub_error(500), ConnectionError("[Errno 111] Connection refused")):
        hub.fail = {"upload_folder": error}
        code, out, err = export([source, tmp_path / "out", "--push-to-hub", "alice/gpt2-repro"], capsys)
        assert code == 2 and err.startswith("error: uploading ") and "hf auth login" not in err
        assert f"The export in {tmp_path / 'out'} is complete: run this command again" in err
        assert "model.safetensors" in os.listdir(tmp_path / "out")


# ---------------------------------------------------------------- errors


def test_bad_input_is_an_error_and_writes_nothing(run, tmp_path, hub, capsys):
    ckpt = run.log_dir / "ckpt_000005.pt"
    out_dir = tmp_path / "out"
    code, _, err = export([tmp_path / "log" / "ckpt_019073.pt", out_dir], capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path / 'log' / 'ckpt_019073.pt'}: no such file")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    code, _, err = export([notes, out_dir], capsys)
    assert code == 2 and err.startswith(f"error: {notes}: not a train_gpt2.py checkpoint")
    assert not out_dir.exists()

    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    code, _, err = export([ckpt, a_file], capsys)
    assert code == 2 and err.startswith(f"error: OUT_DIR {a_file} is a file") and a_file.read_text() == "mine"

    out_dir.mkdir()  # a README.md of the user's own: the card would replace it
    (out_dir / "README.md").write_text("my notes")
    code, _, err = export([ckpt, out_dir], capsys)
    assert code == 2 and "README.md exists and was not written by this export" in err
    assert os.listdir(out_dir) == ["README.md"] and (out_dir / "README.md").read_text() == "my notes"

    # flags: checked before any export (argparse's own `error:` and status 2)
    for flags, message in ((["--private"], "--private needs --push-to-hub"),
                           (["--push-to-hub", "gpt2-repro"], "not a repository id USER/NAME"),
                           (["--push-to-hub", "alice/gpt2 repro"], "not a repository id USER/NAME")):
        with pytest.raises(SystemExit) as exit_info:
            weights.main(["export", str(ckpt), str(tmp_path / "new"), *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
    assert hub.calls == []
