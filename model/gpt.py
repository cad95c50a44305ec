"""CrawlerGPT (SPEC 3): a U-Net of flat blocks around one shared "crawler" block looped CRAWLER_LOOPS times.

    h  = RMSNorm(E[ids] + BigramHash(ids));  x0 = x = SmearGate(h)
    encoder blocks (stack their outputs) -> crawler block x CRAWLER_LOOPS -> decoder blocks (+ skips)
    logits = 30·tanh(RMSNorm(x)·Eᵀ / 30)      (E tied with the input embedding)

Every block sees the same x0. The heavy ops go through kernels/ (`kernels.attention`, `kernels.mlp`),
which pick the Triton kernel or the PyTorch path. Parameter names follow the original's state dict, so
its checkpoints load by name (`from_seed_state_dict`) and quant/ finds linear layers by name.

The order of block applications is one static plan, `block_schedule(config)`, kept as `model.schedule`
(a tuple of `Slot`s): __init__ reads each block's XSA flag from it, and forward (`run_blocks`) and the
KV-cached decode (model/decode.py) walk it.

Calibration (quant/): the MLP normally runs fused (`kernels.mlp` takes the weights, so forward hooks on
`mlp.fc` / `mlp.proj` never fire). Inside `with calibration_mode(model):` every MLP calls `fc` and `proj`
through their own forward, so ordinary forward (pre-)hooks on every nn.Linear see its input; the shared
crawler block's hooks fire once per loop.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.mlp import leaky_relu_squared
from kernels.norm import rms_norm_reference

from .config import Config, ConfigError, from_env
from .io import write_atomic

# The original's hash multipliers (SPEC 3).
BIGRAM_MUL_CURRENT, BIGRAM_MUL_PREVIOUS = 36313, 27191


class CheckpointError(ValueError):
    """A checkpoint or state dict that cannot be loaded; the message names the file or tensor."""


# ---------------------------------------------------------------- rotary embedding (partial, O's direction)

class Rope(NamedTuple):
    """What a block's RoPE tables are built from: inv_freq_i = base^(-2i/rope_dims) / scale, with
    base^(-2i/rope_dims) first rounded to bf16 when inv_freq_bf16 (the original as it ran)."""
    base: float
    scale: float
    inv_freq_bf16: bool = False


def bf16_rounded(x: torch.Tensor) -> torch.Tensor:
    """fp32 x rounded to the nearest bf16 value (ties to even), still fp32. Rounded on the bits because
    torch.compile fuses x.to(torch.bfloat16).float() into nothing, which would drop the rounding."""
    bits = x.view(torch.int32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).view(torch.float32)


def rope_tables(seq_len: int, base: float, scale: float, rope_dims: int, device,
                inv_freq_bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, rope_dims/2] of the angles t·inv_freq_i, inv_freq_i = base^(-2i/rope_dims) / scale
    (base^(-2i/rope_dims) rounded to bf16 first when inv_freq_bf16).

    Recomputed on every forward: it is a few thousand elements, and plain tensor maths keeps the model
    free of Python-side caches that torch.compile(fullgraph=True) would have to break on.
    """
    exponents = torch.arange(0, rope_dims, 2, device=device, dtype=torch.float32) / rope_dims
    inv_freq = 1.0 / (base ** exponents)
    if inv_freq_bf16:  # the original's model.bfloat16() rounded its inv_freq buffers; its loops divide those
        inv_freq = bf16_rounded(inv_freq)
    inv_freq = inv_freq / scale
    # Elementwise product, not torch.outer, so CUDA autocast never lowers the angles to bf16.
    angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2·cos.size(-1) dims of x [B, T, H, D]; the rest pass through.

    Rotate-half within the rotary dims, in the original's direction: with x1, x2 the two halves,
    out1 = x1·cos + x2·sin, out2 = -x1·sin + x2·cos.
    """
    half = cos.size(-1)
    if half == 0:
        return x
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


# ---------------------------------------------------------------- embedding side

def bigram_buckets(ids: torch.Tensor, table_size: int) -> torch.Tensor:
    """Hash bucket of each (previous, current) token pair, in int32 as the original.

    Position t >= 1: (36313·id_t XOR 27191·id_{t-1}) mod (table_size - 1); position 0 of every
    sequence gets the reserved last bucket, table_size - 1.
    """
    ids = ids.to(torch.int32)
    pairs = torch.bitwise_xor(BIGRAM_MUL_CURRENT * ids[:, 1:], BIGRAM_MUL_PREVIOUS * ids[:, :-1])
    first = torch.full_like(ids[:, :1], table_size - 1)
    return torch.cat((first, pairs % (table_size - 1)), dim=1)


class BigramHash(nn.Module):
    """A hashed bigram table (zero init) projected to the model dim and scaled by a learned scalar."""

    def __init__(self, table_size: int, table_dim: int, model_dim: int):
        super().__init__()
        if table_size < 2:
            raise ConfigError(f"BIGRAM_VOCAB_SIZE={table_size}: needs at least 2 buckets (the last is reserved)")
        self.table_size = table_size
        self.embed = nn.Embedding(table_size, table_dim)
        self.proj = nn.Linear(table_dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(bigram_buckets(ids, self.table_size))) * self.scale


class SmearGate(nn.Module):
    """out_t = (1 - σ(g))·h_t + σ(g)·h_{t-1}, with h_{-1} = 0: a learned per-channel blend with the previous token."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate)
        previous = F.pad(h[:, :-1], (0, 0, 1, 0))
        return (1 - g) * h + g * previous


# ---------------------------------------------------------------- the block

class Attention(nn.Module):
    """QK-normed, partially rotated GQA attention; q_gain, causal softmax and XSA happen in kernels.attention."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qk_gain_init: float, xsa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.c_v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((num_heads,), float(qk_gain_init)))
        self.xsa = xsa

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B, T, Hq, D], k, v [B, T, Hkv, D]: projected, q and k RMS-normed and rotated, all in v's dtype
        (under CUDA autocast F.rms_norm returns fp32 while v is bf16). model/decode.py shares it."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q = apply_rope(rms_norm_reference(q), cos, sin)
        k = apply_rope(rms_norm_reference(k), cos, sin)
        return q.to(v.dtype), k.to(v.dtype), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x, cos, sin)
        y = kernels.attention(q, k, v, self.q_gain, self.xsa)
        return self.proj(y.flatten(2))


class MLP(nn.Module):
    """y = W_down · leaky_relu(W_up · x, slope)², fused in kernels.mlp (slope 0 = relu²)."""

    def __init__(self, dim: int, hidden: int, slope: float):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.slope = float(slope)
        self.unfused = False  # set by calibration_mode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unfused:  # calibration: each Linear's own forward runs, so hooks on fc and proj fire
            return self.proj(leaky_relu_squared(self.fc(x), self.slope))
        return kernels.mlp(x, self.fc.weight, self.proj.weight, self.slope)


class Block(nn.Module):
    """x_in = m0⊙x + m1⊙x0;  x = x_in + a⊙Attn(RMSNorm(x_in)·s);  x = x + b⊙MLP(RMSNorm(x)·s),  s = 1/sqrt(layer+1)."""

    def __init__(self, config: Config, layer_idx: int, mlp_mult: float, slope: float, xsa: bool):
        super().__init__()
        dim = config.model_dim
        self.attn = Attention(dim, config.num_heads, config.num_kv_heads, config.qk_gain_init, xsa)
        self.mlp = MLP(dim, int(mlp_mult * dim), slope)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))  # rows: x, x0
        self.norm_scale = 1.0 / math.sqrt(layer_idx + 1)  # deeper blocks see smaller inputs (the original's rule)

    def forward(self, x: torch.Tensor, x0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Each residual update and the RMSNorm after it run as one fused pass (kernels/norm.py).
        x, h = kernels.mix_norm(x, x0, self.resid_mix, self.norm_scale)
        x, h = kernels.add_norm(x, self.attn(h, cos, sin), self.attn_scale, self.norm_scale)
        return x + self.mlp_scale * self.mlp(h)


# ---------------------------------------------------------------- the block schedule

ENCODER, CRAWLER, DECODER = "encoder", "crawler", "decoder"


@dataclass(frozen=True)
class Slot:
    """One block application, in forward order.

    blocks, index: the module applied, `getattr(model, blocks)[index]` (state-dict prefix `name`).
    kind: ENCODER, CRAWLER (loop `loop` of the shared block) or DECODER.
    position: its place in forward order, which is also its KV-cache slot (model/decode.py).
    rope: what its RoPE tables are built from (a Rope).
    inst: the loop_inst_up row applied to x before the block (None: no instruction).
    push_skip: the block's output is kept for a decoder (encoder slots).
    skip: the skip_weights row with which the last kept output is added before the block (None: none left).
    xsa: XSA on the module (per distinct block, so every loop of the crawler agrees).
    """
    blocks: str
    index: int
    kind: str
    position: int
    rope: Rope
    xsa: bool
    loop: int | None = None
    inst: int | None = None
    push_skip: bool = False
    skip: int | None = None

    @property
    def name(self) -> str:
        return f"{self.blocks}.{self.index}"


def block_schedule(config: Config) -> tuple[Slot, ...]:
    """The U-Net's block applications: encoder blocks (each keeps its output), the crawler block once per
    loop (its own RoPE scale and instruction), then decoder blocks (decoder i adds encoder n_enc-1-i's
    output with skip_weights[i] while encoder outputs remain).

    XSA counts the distinct blocks in forward order (encoder blocks, the crawler, decoder blocks):
    XSA_LAST_N=N turns it on for the last N of them (N >= their count: all); XSA_BLOCKS=crawler is the
    original's placement, the crawler only.
    """
    n_enc, n_dec = config.num_encoder_layers, config.num_decoder_layers
    distinct = config.num_flat_layers + 1

    def xsa(d: int) -> bool:  # d: the block's place among the distinct blocks
        return d == n_enc if config.xsa_blocks == "crawler" else d >= distinct - config.xsa_last_n

    flat_rope = Rope(config.flat_rope_base, 1.0)
    encoder = [Slot("flat_blocks", i, ENCODER, i, flat_rope, xsa(i), push_skip=True) for i in range(n_enc)]
    # Each loop sees its own RoPE frequencies (base 10000 divided by its scale, never NTK-rescaled).
    crawler = [Slot("crawler_blocks", 0, CRAWLER, n_enc + k,
                    Rope(config.rope_base, config.crawler_loop_rope_scales[k], config.rope_inv_freq_bf16),
                    xsa(n_enc), loop=k, inst=k if config.inst_dim > 0 else None)
               for k in range(config.crawler_loops)]
    decoder = [Slot("flat_blocks", n_enc + i, DECODER, n_enc + config.crawler_loops + i, flat_rope,
                    xsa(n_enc + 1 + i), skip=i if i < n_enc else None) for i in range(n_dec)]
    return tuple(encoder + crawler + decoder)


# ---------------------------------------------------------------- the model

class CrawlerGPT(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        dim = config.model_dim
        self.schedule = block_schedule(config)
        self.rope_keys = tuple(dict.fromkeys(slot.rope for slot in self.schedule))  # distinct Ropes
        xsa = {slot.name: slot.xsa for slot in self.schedule}
        self.tok_emb = nn.Embedding(config.vocab_size, dim)
        self.bigram = BigramHash(config.bigram_vocab_size, config.bigram_dim, dim)
        self.smear = SmearGate(dim)
        self.skip_weights = nn.Parameter(torch.ones(min(config.num_encoder_layers, config.num_decoder_layers), dim))
        self.flat_blocks = nn.ModuleList(
            Block(config, i, config.mlp_mult, config.mlp_leaky_slope, xsa[f"flat_blocks.{i}"])
            for i in range(config.num_flat_layers))
        self.crawler_blocks = nn.ModuleList([Block(config, config.num_flat_layers, config.crawler_mlp_mult,
                                                   config.crawler_mlp_leaky_slope, xsa["crawler_blocks.0"])])
        if config.inst_dim > 0:  # per-loop instruction: x_loop = x + up_k(proj(x))
            self.loop_inst_proj = nn.Linear(dim, config.inst_dim, bias=False)
            self.loop_inst_up = nn.ModuleList(nn.Linear(config.inst_dim, dim, bias=False)
                                              for _ in range(config.crawler_loops))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The original's init (SPEC 3), also a full reset for the trainer; deterministic given torch.manual_seed."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith(("attn.proj", "mlp.proj")) or name.startswith("loop_inst_up."):
                    nn.init.zeros_(module.weight)  # every residual branch and instruction starts as identity
                elif name == "loop_inst_proj":
                    nn.init.normal_(module.weight, std=0.01)
                elif min(module.weight.shape) >= 64:
                    nn.init.orthogonal_(module.weight, gain=1.0)
                else:  # too thin for the orthogonal rule (small test configs): PyTorch's default
                    module.reset_parameters()
            elif isinstance(module, Block):
                module.attn_scale.fill_(1.0)
                module.mlp_scale.fill_(1.0)
                module.resid_mix[0].fill_(1.0)
                module.resid_mix[1].fill_(0.0)
                module.attn.q_gain.fill_(self.config.qk_gain_init)
        # The original scales every "*.proj" by 1/sqrt(2·layers) after init (10 layers: 9 flat + the crawler);
        # attn.proj and mlp.proj are zero, so only the bigram projection changes.
        self.bigram.proj.weight.mul_(1.0 / math.sqrt(2 * (self.config.num_flat_layers + 1)))
        nn.init.normal_(self.tok_emb.weight, std=self.config.tied_embed_init_std)
        nn.init.zeros_(self.bigram.embed.weight)
        self.bigram.scale.fill_(0.05)
        nn.init.zeros_(self.smear.gate)
        self.skip_weights.fill_(1.0)

    def block(self, slot: Slot) -> Block:
        """The module a slot applies."""
        return getattr(self, slot.blocks)[slot.index]

    def rope_tables(self, seq_len: int, device) -> dict[Rope, tuple[torch.Tensor, torch.Tensor]]:
        """{slot.rope: (cos, sin)} for positions 0..seq_len-1, for forward and the KV cache alike."""
        return {rope: rope_tables(seq_len, rope.base, rope.scale, self.config.rope_dims, device, rope.inv_freq_bf16)
                for rope in self.rope_keys}

    def run_blocks(self, x: torch.Tensor, x0: torch.Tensor, ropes: Mapping,
                   apply: Callable[..., torch.Tensor]) -> torch.Tensor:
        """x after every slot of the schedule, in order; apply(slot, x, x0, cos, sin) runs the slot's block
        (its module in forward, the cached attention in decode_step); ropes: {slot.rope: (cos, sin)}."""
        skips = []
        for slot in self.schedule:
            if slot.inst is not None:  # x_loop = x + up_k(proj(x))
                x = x + self.loop_inst_up[slot.inst](self.loop_inst_proj(x))
            if slot.skip is not None:  # decoder 0 gets the last encoder's output, and so on inwards
                x = x + self.skip_weights[slot.skip] * skips.pop()
            x = apply(slot, x, x0, *ropes[slot.rope])
            if slot.push_skip:
                skips.append(x)
        return x

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> softcapped fp32 logits [B, T, vocab], or the fp32 mean cross-entropy given targets [B, T]."""
        if ids.dim() != 2:
            raise ValueError(f"CrawlerGPT: ids must be [batch, seq], got shape {tuple(ids.shape)}")
        if targets is not None and targets.shape != ids.shape:
            raise ValueError(f"CrawlerGPT: targets shape {tuple(targets.shape)} != ids shape {tuple(ids.shape)}")
        cfg = self.config
        T, device = ids.size(1), ids.device
        x = x0 = self.smear(rms_norm_reference(self.tok_emb(ids) + self.bigram(ids)))
        x = self.run_blocks(x, x0, self.rope_tables(T, device), lambda slot, *args: self.block(slot)(*args))
        h = kernels.rms_norm(x)
        if targets is not None:  # fused on the Triton path: no [B·T, vocab] fp32 logits are materialized
            return kernels.softcap_cross_entropy(h, self.tok_emb.weight, targets, cfg.logit_softcap)
        logits = F.linear(h, self.tok_emb.weight).float()
        return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)


# ---------------------------------------------------------------- helpers for the trainer, quant/ and the CLIs

def _unwrap(model: nn.Module) -> CrawlerGPT:
    """The CrawlerGPT inside a torch.compile and/or DDP wrapper."""
    while not isinstance(model, CrawlerGPT):
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a CrawlerGPT (possibly compiled or DDP-wrapped), got {type(model).__name__}")
        model = inner
    return model


def build_model(config: Config | None = None, **overrides) -> CrawlerGPT:
    """The model for `config`, or for the environment (PRESET and the seed's variables) when it is None.

    Keyword overrides replace config fields (`build_model(preset="tiny", model_dim=64)`).
    """
    if config is None:
        config = from_env(**overrides)
    elif overrides:
        config = config.replace(**overrides)
    return CrawlerGPT(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in _unwrap(model).parameters())


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters by optimizer: "matrix" (Muon: every nn.Linear weight, i.e. the blocks' matrices, the
    bigram and instruction projections), "embed" (AdamW: tok_emb, bigram.embed), "scalar" (AdamW: the rest)."""
    model = _unwrap(model)
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embeddings = {id(model.tok_emb.weight), id(model.bigram.embed.weight)}
    groups = {"matrix": [], "embed": [], "scalar": []}
    for p in model.parameters():
        key = "matrix" if id(p) in matrices else "embed" if id(p) in embeddings else "scalar"
        groups[key].append(p)
    return groups


@contextlib.contextmanager
def calibration_mode(model: nn.Module):
    """Inside, every MLP runs fc and proj through their own forward, so forward hooks on every nn.Linear
    see its input (the fused kernels.mlp path bypasses them). Same numbers as the PyTorch reference."""
    mlps = [m for m in _unwrap(model).modules() if isinstance(m, MLP)]
    before = [m.unfused for m in mlps]
    for m in mlps:
        m.unfused = True
    try:
        yield model
    finally:
        for m, state in zip(mlps, before):
            m.unfused = state


def _load_exact(config: Config, state_dict: Mapping, source: str) -> CrawlerGPT:
    """A model for `config` holding `state_dict`, after naming every missing, unexpected or mis-shaped tensor.

    The model is built on the meta device and takes the tensors as they are (assign=True): loading
    should not pay for a random init that is overwritten at once.
    """
    with torch.device("meta"):
        model = CrawlerGPT(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
                 if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors {misshaped}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def from_seed_state_dict(state_dict: Mapping) -> CrawlerGPT:
    """The `ouroboros-as-run` model carrying a checkpoint saved by the original script (SPEC 3).

    Tensors are cast to fp32; `ve_*` (never used) are ignored; `loop_inst_*` are ignored after checking
    every `loop_inst_up` weight is zero (never trained in the original, so the instruction was a no-op).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_seed_state_dict: expected a state dict (name -> tensor), got {type(state_dict).__name__}")
    kept = {}
    for name, tensor in state_dict.items():
        if not torch.is_tensor(tensor):
            raise CheckpointError(f"original's state dict: {name} is a {type(tensor).__name__}, not a tensor")
        if name.startswith("ve_"):
            continue
        if name.startswith("loop_inst_"):
            if name.startswith("loop_inst_up.") and torch.count_nonzero(tensor).item():
                raise CheckpointError(f"original's state dict: {name} is not zero, so its instruction was live and "
                                      f"the ouroboros-as-run model (INST_DIM=0) cannot carry it")
            continue
        kept[name] = tensor.detach().to(torch.float32, copy=True)  # the model must not share the caller's storage
    return _load_exact(from_env(environ={}, preset="ouroboros-as-run"), kept, "original's state dict")


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write {"config", "state_dict"} atomically: a temp file in the same folder, then os.replace. A full
    disk raises model.io.DiskFullError with the size the tensors need; the model is untouched."""
    model = _unwrap(model)
    payload = {"config": model.config.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    tensor_bytes = sum(v.numel() * v.element_size() for v in payload["state_dict"].values())
    write_atomic(path, lambda f: torch.save(payload, f), size_hint=tensor_bytes)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> CrawlerGPT:
    """The model saved by save_checkpoint, built from its stored config, on `map_location`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: unreadable, corrupt or not a torch file "
                              f"({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or not {"config", "state_dict"} <= set(payload):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path}: expected keys 'config' and 'state_dict', found {found}")
    try:
        config = Config.from_dict(payload["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: bad stored config: {e}") from e
    return _load_exact(config, payload["state_dict"], f"checkpoint {path}")
