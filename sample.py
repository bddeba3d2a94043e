"""Sample text from a GPT-2: one of OpenAI's, a Hugging Face directory, or your own train_gpt2.py checkpoint.

    python sample.py                                             # gpt2 (124M, downloaded once), one sample
    python sample.py -m log/ckpt_019073.pt --prompt "The meaning of life is" --num-samples 3
    python sample.py -m gpt2-xl --temperature 0 --max-new-tokens 50   # greedy: the same text every time
    printf 'Once upon a time' | python sample.py --prompt-file -       # the prompt from stdin
    python sample.py --prompt "<|endoftext|>" --stop-at-eot           # unconditional: one whole document

Each sample is printed as it is generated, token by token (model.generate_stream: with the KV cache
each new token costs one token's forward pass); several samples come one after another, separated
by a line of dashes. Only text goes to stdout; notes (model, device, dtype) go to stderr.

Each new token reads every weight once, so sampling one sequence is bound by memory bandwidth: in
bfloat16 (--dtype auto, where the CPU has it) the weights are half the bytes, 1.2-1.9x faster on a
CPU with AVX512-BF16 (BENCHMARKS.md); --dtype float32 reproduces Hugging Face's float32 text exactly.
"""
import argparse
import codecs
import math
import sys

import tiktoken
import torch

from model import EOT, GPT
from utils import autocast_dtype, usable_device

EOT_TEXT = "<|endoftext|>"  # the text of EOT, the token that separates documents: allowed in a prompt
DEFAULT_PROMPT = "Hello, I'm a language model,"  # the walkthrough's
SEPARATOR = "---------------"  # between samples, as nanoGPT's sample.py


# ---------------------------------------------------------------- text out, token by token


class StreamDecoder:
    """Token ids in, text out as soon as it is complete. GPT-2's tokens are byte sequences, and a
    character of several UTF-8 bytes (é is 2, 世 3, 😀 4) may be split across tokens: decoding each
    token on its own would print garbage (U+FFFD) for both halves. So bytes wait here until they
    form whole characters. Bytes that can never be valid UTF-8 become U+FFFD, as tiktoken's decode
    does: the streamed text equals enc.decode(all the tokens)."""

    def __init__(self, enc):
        self.enc = enc
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # keeps an unfinished character

    def push(self, token):
        """The text that this token completes ("" while a character is still unfinished)."""
        return self.utf8.decode(self.enc.decode_single_token_bytes(token))

    def flush(self):
        """The end of a sample: bytes of a character that never finished become U+FFFD."""
        return self.utf8.decode(b"", final=True)


def stream_sample(model, enc, prompt_ids, out, max_new_tokens, temperature=1.0, top_k=50, generator=None,
                  stop_at_eot=False):
    """Generate one sample after prompt_ids (a list of ids) and write its text to out as it comes,
    flushing after each piece. Returns the new ids (an <|endoftext|> that stopped it not included)."""
    decoder = StreamDecoder(enc)
    idx = torch.tensor([prompt_ids], device=next(model.parameters()).device)  # (1, T)
    new_ids = []
    for next_id in model.generate_stream(idx, max_new_tokens, temperature, top_k, generator):
        token = next_id.item()  # (1, 1) -> int: the one host sync per step, needed to print
        if token == EOT and stop_at_eot:
            break
        new_ids.append(token)
        if piece := decoder.push(token):
            out.write(piece)
            out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    return new_ids


# ---------------------------------------------------------------- the command line


def read_prompt(args):
    """The prompt text: --prompt, or the whole of --prompt-file (- = stdin), exactly as written (a final
    newline included). ValueError naming the file if it cannot be read or is not UTF-8."""
    if args.prompt_file is None:
        return DEFAULT_PROMPT if args.prompt is None else args.prompt
    name = "stdin" if args.prompt_file == "-" else args.prompt_file
    try:
        if args.prompt_file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.prompt_file, "rb") as f:
                data = f.read()
    except OSError as e:
        raise ValueError(f"--prompt-file {name}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "convert it first, e.g. with iconv -f latin1 -t utf-8") from None


def encode_prompt(text):
    """Token ids of the prompt; <|endoftext|> in it is the document separator, so that a prompt of
    just "<|endoftext|>" asks for a document from scratch."""
    ids = tiktoken.get_encoding("gpt2").encode(text, allowed_special={EOT_TEXT})
    if not ids:
        raise ValueError("the prompt is empty: the model needs at least one token to continue. For samples "
                         f"from scratch, use --prompt '{EOT_TEXT}'")
    return ids


def number(kind, low, allow_low=True):
    """An argparse type: kind (int, float) >= low (> low if not allow_low), finite."""
    def parse(s):
        try:
            x = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(x) or x < low or (x == low and not allow_low):
            raise argparse.ArgumentTypeError(f"expected a number {'>=' if allow_low else '>'} {low}, got {s!r}")
        return x
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="gpt2", help="an OpenAI size (gpt2, gpt2-medium, gpt2-large, gpt2-xl), "
                   "a Hugging Face save_pretrained directory, or a train_gpt2.py checkpoint (default: gpt2)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help=f"the text to continue (default: {DEFAULT_PROMPT!r}); "
                        f"'{EOT_TEXT}' alone samples from scratch")
    prompt.add_argument("--prompt-file", metavar="FILE", help="the text to continue, from a UTF-8 file, "
                        "used exactly as written; - reads stdin")
    p.add_argument("--num-samples", type=number(int, 1), default=1, help="samples, printed one after another "
                   "(default: 1)")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=100, help="tokens per sample (default: 100)")
    p.add_argument("--temperature", type=number(float, 0), default=1.0, help="< 1 is more predictable, > 1 more "
                   "varied; 0 is greedy (the likeliest token every time) (default: 1.0)")
    p.add_argument("--top-k", type=number(int, 1), default=50, help="sample among the k likeliest tokens only "
                   "(default: 50; 50257 keeps all)")
    p.add_argument("--seed", type=int, default=1337, help="the same seed gives the same samples (default: 1337)")
    p.add_argument("--stop-at-eot", action="store_true", help="end a sample at <|endoftext|> (the end of a document)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, ... (default: cuda if available, "
                   "else mps, else cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="autocast dtype; auto: "
                   "bfloat16 on CUDA and on a CPU with native bfloat16 (AVX512-BF16, AMX, ARM BF16), else float32. "
                   "float32 gives exactly Hugging Face's text; bfloat16 rounds, and may pick another token at a "
                   "near-tie (default: auto)")
    return p.parse_args(argv)


def main(argv=None, out=None):
    args = parse_args(argv)
    out = out or sys.stdout
    try:
        device = usable_device(args.device)
        dtype = autocast_dtype(torch.device(device).type, args.dtype)
        prompt = read_prompt(args)
        prompt_ids = encode_prompt(prompt)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model = GPT.from_pretrained(args.model)
    except (ValueError, OSError) as e:  # an unknown name, a broken file, no network for a download
        print(f"error: -m {args.model}: {e}", file=sys.stderr)
        return 2
    if model.config.vocab_size != 50257:
        print(f"error: -m {args.model}: vocab_size {model.config.vocab_size}, but sample.py speaks GPT-2's "
              "tokenizer (50257 tokens)", file=sys.stderr)
        return 2
    model.to(device).eval()
    block_size = model.config.block_size
    print(f"{args.model}: {model.num_params() / 1e6:.1f}M parameters on {device}, "
          f"{str(dtype or torch.float32).removeprefix('torch.')}, prompt {len(prompt_ids)} tokens", file=sys.stderr)
    if len(prompt_ids) > block_size:  # as generate does: the window slides
        print(f"note: the prompt has {len(prompt_ids)} tokens, more than the model's block size {block_size}: "
              f"it sees only the last {block_size}, and the window slides on as it generates", file=sys.stderr)

    generator = torch.Generator(device=device).manual_seed(args.seed)  # the only randomness: same seed, same text
    enc = tiktoken.get_encoding("gpt2")
    # one autocast region for all samples: it casts each weight to bfloat16 once and keeps the copy (a
    # cache that works under no_grad, not inference_mode), so each step reads half the bytes
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        for i in range(args.num_samples):
            if i:
                out.write(SEPARATOR + "\n")
            out.write(prompt)  # the prompt as given; the sample's text streams after it
            out.flush()
            stream_sample(model, enc, prompt_ids, out, args.max_new_tokens, args.temperature, args.top_k, generator,
                          args.stop_at_eot)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while a sample streams: stop there, without a traceback
        print(file=sys.stderr)
        sys.exit(130)
