"""`python -m quant.generate --artifact runs/<id>/final_model.int6.ptz --prompt "..." --tokens 64`: text from the artifact.

Loads the quantized artifact (on CUDA its int6 layers are QuantLinear, so one token at a time runs the
M = 1 int6 kernel path; on CPU the dequantized fp32 reference), or with --checkpoint a float checkpoint
(a run's final_model.pt, or R1's, which loads as the `frontier` model), encodes the prompt as training documents
are ([BOS] + sentencepiece ids), prefills a KV cache with it and samples one token at a time:
temperature 0 is greedy, otherwise softmax(logits / temperature) over the top-k tokens (0: all).
A BOS from the model ends its document, and the generation, unless --no-stop.

Prints the prompt and its continuation, then the prefill time and the decode speed in tokens per second.
On the triton backend the kernels it uses pass the start-up self-test first (kernels/selftest.py).
Exit status: 0 done, 1 (KERNELS_STRICT=1) a Triton op failed its self-test, 2 bad input (missing or
corrupt artifact, missing tokenizer, bad option).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import kernels
from kernels import selftest
from kernels.int6 import QuantLinear
from model import CheckpointError, ConfigError, load_checkpoint
from model.cli import nonnegative_float, nonnegative_int, positive_int
from model.decode import KVCache, decode_step
from model.io import synchronize

from .artifact import ArtifactError
from .load import load_model


def _check_sampling(temperature: float, top_k: int) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: must be >= 0 (0 = no top-k cut)")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest logits (top_k 0 or >= V: all)."""
    _check_sampling(temperature, top_k)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    tokens: torch.Tensor     # [B, n] the new tokens (prompt excluded)
    prefill_seconds: float   # the prompt's forward and the first token's sampling
    decode_seconds: float    # the remaining n - 1 single-token steps
    stopped_at_bos: bool

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first per second of single-token steps (batch included)."""
        steps = self.tokens.shape[1] - 1
        return steps * self.tokens.shape[0] / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")




@torch.no_grad()
def generate(net: torch.nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, seed: int | None = None, stop_id: int | None = None) -> Generation:
    """Sample up to max_new_tokens after prompt_ids [B, T] with a KV cache (prefill, then one token a step).

    Deterministic for a given seed (a private generator; the global RNG is untouched). Stops early
    when every sequence has produced stop_id (the stop token is kept in the output).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"generate: prompt_ids must be [batch, length >= 1], got shape {tuple(prompt_ids.shape)}")
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be > 0")
    _check_sampling(temperature, top_k)
    device = prompt_ids.device
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())  # as training and evaluation run the model
    B = prompt_ids.shape[0]
    cache = KVCache(net, B, prompt_ids.shape[1] + max_new_tokens - 1, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    with autocast:
        synchronize(device)
        t0 = time.perf_counter()
        logits = decode_step(net, prompt_ids, cache)[:, -1]
        token = sample_next(logits, temperature, top_k, generator)
        out.append(token)
        synchronize(device)
        t1 = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            if stop_id is not None:
                done |= token == stop_id
                if bool(done.all()):
                    break
            logits = decode_step(net, token[:, None], cache)[:, -1]
            token = sample_next(logits, temperature, top_k, generator)
            out.append(token)
        synchronize(device)
        t2 = time.perf_counter()
    stopped = stop_id is not None and bool((done | (token == stop_id)).all())
    return Generation(torch.stack(out, dim=1), t1 - t0, t2 - t1, stopped)


def encode_prompt(sp, text: str) -> list[int]:
    """[BOS] + the text's sentencepiece ids: how every training document starts."""
    bos = sp.bos_id()
    if bos < 0:
        raise ValueError("the tokenizer has no BOS id; training documents start with one")
    return [bos] + sp.encode(text)


def _tokenizer(path: Path, where: str):
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path}: no such file ({where}; pass --tokenizer)")
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise ValueError(f"tokenizer {path}: not a sentencepiece model ({err})") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant.generate", description=__doc__.split("\n")[0])
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--artifact", help="runs/<id>/final_model.int6.ptz")
    weights.add_argument("--checkpoint", help="a float checkpoint: runs/<id>/final_model.pt, or R1's final_model.pt")
    parser.add_argument("--prompt", default="", help="text to continue (default: none, the model starts a document)")
    parser.add_argument("--tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=nonnegative_int, default=50,
                        help="sample among the k likeliest tokens; 0 = all (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--tokenizer", help="sentencepiece model (default: the artifact's TOKENIZER_PATH)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-stop", action="store_true", help="keep generating past a BOS (a new document)")
    parser.add_argument("--quant-linear", action=argparse.BooleanOptionalAction, default=None,
                        help="int6 layers as QuantLinear (the int6 kernel on KERNELS=triton) rather than dequantized "
                             "fp32 nn.Linear (default: on with CUDA)")
    args = parser.parse_args(argv)

    try:
        try:
            args.prompt.encode("utf-8")  # argv bytes that do not decode arrive as lone surrogates
        except UnicodeEncodeError:
            raise ValueError("--prompt: not valid UTF-8 text") from None
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise ValueError(f"--device {args.device!r}: not a device name (cuda, cuda:1, cpu)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        kernels.backend()  # a bad KERNELS or KERNELS_STRICT is bad input too (kernels.BackendError is a ValueError)
        kernels.strict()
        if args.checkpoint:
            net = load_checkpoint(args.checkpoint, map_location=device)
            cfg = net.config
        else:
            artifact = Path(args.artifact)
            if not artifact.is_file():
                raise FileNotFoundError(f"artifact {artifact}: no such file")
            net, cfg = load_model(artifact, device, quant_linear=args.quant_linear)
        where = "from --tokenizer" if args.tokenizer else f"the {'checkpoint' if args.checkpoint else 'artifact'}'s " \
                                                          "stored TOKENIZER_PATH"
        sp = _tokenizer(Path(args.tokenizer or cfg.tokenizer_path), where)
        if sp.get_piece_size() > cfg.vocab_size:
            raise ValueError(f"tokenizer {args.tokenizer or cfg.tokenizer_path}: {sp.get_piece_size()} pieces, "
                             f"more than the model's VOCAB_SIZE={cfg.vocab_size}")
        prompt = encode_prompt(sp, args.prompt)
    except (ArtifactError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    quant_linear = any(isinstance(m, QuantLinear) for m in net.modules())
    try:
        selftest.run(device, selftest.TRAINING_OPS + (selftest.QUANT_OPS if quant_linear else ()))
    except selftest.SelfTestFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    net.eval()
    bos = prompt[0]
    ids = torch.tensor([prompt], dtype=torch.int64, device=device)
    if len(prompt) + args.tokens > cfg.train_seq_len:
        print(f"note: {len(prompt)} prompt + {args.tokens} new tokens run past TRAIN_SEQ_LEN={cfg.train_seq_len}, "
              f"the longest context the model was trained on", file=sys.stderr)
    if device.type == "cuda":  # compile the prefill and single-token kernels outside the timed run
        generate(net, ids, 2, temperature=0.0)
    result = generate(net, ids, args.tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                      stop_id=None if args.no_stop else bos)
    new = result.tokens[0].tolist()
    if result.stopped_at_bos:
        new = new[:new.index(bos)]
    # Decoded after the prompt's pieces: a continuation decoded alone would lose its leading space.
    shown = sp.decode(prompt[1:])
    print(args.prompt + sp.decode(prompt[1:] + new)[len(shown):])
    weights = "float checkpoint" if args.checkpoint else "int6 QuantLinear" if quant_linear else "dequantized fp32"
    print(f"\n[{len(new)} tokens{' (stopped at BOS)' if result.stopped_at_bos else ''}; prompt of {len(prompt)} tokens "
          f"prefilled in {result.prefill_seconds * 1e3:.1f} ms; decode {result.tokens_per_second:.1f} tokens/s "
          f"on {device}, {weights} weights, kernels={kernels.backend()}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
