"""The model: blocks walked along a schedule, for the crawler (SPEC 3) and for looped layers (R1).

    h  = RMSNorm(SmearGate_R1(E[ids] + BigramHash(ids)));  x0 = x = SmearGate(h)
    x  = the schedule's blocks in order (encoder slots keep their outputs, decoder slots merge them back)
    logits = 30·tanh(RMSNorm(x)·Eᵀ / 30)      (E tied with the input embedding)

Every block sees the same x0. Which parts exist is the config's: BigramHash (BIGRAM_VOCAB_SIZE > 0), the
seed's static SmearGate after the norm (STATIC_SMEAR_ENABLED), R1's input-dependent one before it
(SMEAR_GATE_ENABLED), gated skips (SKIP_GATES_ENABLED), two-lane decoder blocks (PARALLEL_START_LAYER),
the attention output gate (SPARSE_ATTN_GATE_ENABLED). The plan of block applications is
model/schedule.py's `block_schedule`, one plan with recurrence on and one with it off; `recurrence_active`
picks which one forward, the KV-cached decode (model/decode.py) and calibration walk (`model.schedule`).

Parameter names follow the original's state dict (crawler: flat_blocks, crawler_blocks) and R1's flat
names (looped layers: blocks.{i}, skip_gates, parallel_*_lambdas, smear_gate, smear_lambda), so their
checkpoints load by name (`from_seed_state_dict`, model/record.py) and quant/ finds linear layers by name.

Calibration (quant/): the MLP normally runs fused (`kernels.mlp` takes the weights, so forward hooks on
`mlp.fc` / `mlp.proj` never fire). Inside `with calibration_mode(model):` every MLP calls `fc` and `proj`
through their own forward, so ordinary forward (pre-)hooks on every nn.Linear see its input; a repeated
block's hooks fire once per pass.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.norm import rms_norm_reference

from .blocks import MLP, BigramHash, Block, SmearGate, input_smear, rope_tables
from .config import Config, ConfigError, from_env
from .io import write_atomic
from .schedule import Rope, Slot, block_schedule, skip_slots


class CheckpointError(ValueError):
    """A checkpoint or state dict that cannot be loaded; the message names the file or tensor."""


class GPT(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        dim = config.model_dim
        self.schedules = {on: block_schedule(config, on) for on in (True, False)}
        self.recurrence_active = True  # the plan forward walks; ENABLE_LOOPING_AT switches it on during training
        self.rope_keys = tuple(dict.fromkeys(s.rope for plan in self.schedules.values() for s in plan))
        xsa = {slot.name: slot.xsa for slot in self.schedules[True]}
        self.tok_emb = nn.Embedding(config.vocab_size, dim)
        self.head_input = nn.Identity()  # a module call where the head reads h, for calibration's hooks (no weights)
        if config.use_crawler:
            # Modules are made in the original's order: their constructors draw from the RNG, and the pinned
            # crawler presets depend on it.
            if config.bigram_vocab_size:
                self.bigram = BigramHash(config.bigram_vocab_size, config.bigram_dim, dim)
            if config.static_smear_enabled:
                self.smear = SmearGate(dim)
            self.skip_weights = nn.Parameter(torch.ones(skip_slots(config), dim))
            self.flat_blocks = nn.ModuleList(
                Block(config, i, config.mlp_mult, config.mlp_leaky_slope, xsa[f"flat_blocks.{i}"])
                for i in range(config.num_flat_layers))
            self.crawler_blocks = nn.ModuleList([Block(config, config.num_flat_layers, config.crawler_mlp_mult,
                                                       config.crawler_mlp_leaky_slope, xsa["crawler_blocks.0"])])
            if config.inst_dim > 0:  # per-loop instruction: x_loop = x + up_k(proj(x))
                self.loop_inst_proj = nn.Linear(dim, config.inst_dim, bias=False)
                self.loop_inst_up = nn.ModuleList(nn.Linear(config.inst_dim, dim, bias=False)
                                                  for _ in range(config.crawler_loops))
            if config.smear_gate_enabled:
                self._add_input_smear(config)
        else:
            # R1's RNG order: the embedding's and the SmearGate's constructors draw, its banked matrices do
            # not, so the blocks' constructor draws are dropped and reset_parameters draws in R1's order.
            if config.smear_gate_enabled:
                self._add_input_smear(config)
            if config.bigram_vocab_size:
                self.bigram = BigramHash(config.bigram_vocab_size, config.bigram_dim, dim)
            if config.static_smear_enabled:
                self.smear = SmearGate(dim)
            self.skip_weights = nn.Parameter(torch.ones(skip_slots(config), dim))
            with torch.random.fork_rng(devices=[]):
                self.blocks = nn.ModuleList(Block(config, i, config.mlp_mult, config.mlp_leaky_slope,
                                                  xsa[f"blocks.{i}"]) for i in range(config.num_layers))
        if config.skip_gates_enabled:
            self.skip_gates = nn.Parameter(torch.zeros(skip_slots(config), dim))
        if config.parallel_start_layer > 0:  # a row per physical block (R1 keeps the rows it never reads)
            rows = config.num_flat_layers if config.use_crawler else config.num_layers
            self.parallel_post_lambdas = nn.Parameter(torch.ones(rows, 2, 2))   # [block, source, lane]
            self.parallel_resid_lambdas = nn.Parameter(torch.full((rows, 2), 1.1))
        self.reset_parameters()

    def _add_input_smear(self, config: Config) -> None:
        self.smear_gate = nn.Linear(config.gate_window, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))

    @property
    def schedule(self) -> tuple[Slot, ...]:
        """The plan forward walks now: recurrence on (the crawler's loops, the looped segment) or off."""
        return self.schedules[self.recurrence_active]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The original's init (SPEC 3) or R1's (MODEL.md §3), also a full reset for the trainer;
        deterministic given torch.manual_seed."""
        cfg = self.config
        if cfg.use_crawler:
            self._reset_crawler()
        else:
            nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
            for block in self.blocks:
                for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                    nn.init.orthogonal_(linear.weight, gain=1.0)
            for block in self.blocks:
                nn.init.orthogonal_(block.mlp.fc.weight, gain=1.0)
                nn.init.zeros_(block.attn.proj.weight)
                nn.init.zeros_(block.mlp.proj.weight)
                self._reset_controls(block)
            if hasattr(self, "bigram"):
                self._reset_bigram(cfg.num_layers)
            if hasattr(self, "smear"):
                nn.init.zeros_(self.smear.gate)
            self.skip_weights.fill_(1.0)
        if hasattr(self, "smear_gate"):
            nn.init.zeros_(self.smear_gate.weight)
            self.smear_lambda.zero_()
        if hasattr(self, "skip_gates"):
            self.skip_gates.zero_()
        if hasattr(self, "parallel_post_lambdas"):
            self.parallel_post_lambdas.fill_(1.0)
            self.parallel_resid_lambdas.fill_(1.1)
        for module in self.modules():
            if isinstance(module, Block) and hasattr(module.attn, "attn_gate_w"):
                nn.init.normal_(module.attn.attn_gate_w, std=cfg.sparse_attn_gate_init_std) \
                    if cfg.sparse_attn_gate_init_std > 0 else nn.init.zeros_(module.attn.attn_gate_w)

    def _reset_crawler(self) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and name != "smear_gate":
                if name.endswith(("attn.proj", "mlp.proj")) or name.startswith("loop_inst_up."):
                    nn.init.zeros_(module.weight)  # every residual branch and instruction starts as identity
                elif name == "loop_inst_proj":
                    nn.init.normal_(module.weight, std=0.01)
                elif min(module.weight.shape) >= 64:
                    nn.init.orthogonal_(module.weight, gain=1.0)
                else:  # too thin for the orthogonal rule (small test configs): PyTorch's default
                    module.reset_parameters()
            elif isinstance(module, Block):
                self._reset_controls(module)
        if hasattr(self, "bigram"):
            self._reset_bigram(self.config.num_flat_layers + 1)
        nn.init.normal_(self.tok_emb.weight, std=self.config.tied_embed_init_std)
        if hasattr(self, "bigram"):
            nn.init.zeros_(self.bigram.embed.weight)
            self.bigram.scale.fill_(0.05)
        if hasattr(self, "smear"):
            nn.init.zeros_(self.smear.gate)
        self.skip_weights.fill_(1.0)

    def _reset_controls(self, block: Block) -> None:
        block.attn_scale.fill_(1.0)
        block.mlp_scale.fill_(1.0)
        block.resid_mix[0].fill_(1.0)
        block.resid_mix[1].fill_(0.0)
        block.attn.q_gain.fill_(self.config.qk_gain_init)

    def _reset_bigram(self, layers: int) -> None:
        # The original scales every "*.proj" by 1/sqrt(2·layers) after init; attn.proj and mlp.proj are zero,
        # so only the bigram projection changes.
        self.bigram.proj.weight.mul_(1.0 / math.sqrt(2 * layers))

    def block(self, slot: Slot) -> Block:
        """The module a slot applies."""
        return getattr(self, slot.blocks)[slot.index]

    def rope_tables(self, seq_len: int, device) -> dict[Rope, tuple[torch.Tensor, torch.Tensor]]:
        """{slot.rope: (cos, sin)} for positions 0..seq_len-1, for forward and the KV cache alike."""
        return {rope: rope_tables(seq_len, rope.base, rope.scale, self.config.rope_dims, device, rope.inv_freq_bf16)
                for rope in self.rope_keys}

    def embed(self, ids: torch.Tensor, before: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """(x0 [B, T, d], what the next call needs of the last token) for ids [B, T]. before: that tuple from
        the call for the tokens just before ids (the KV-cached decode); None: ids start their rows."""
        prev_ids, prev_e, prev_h = before if before is not None else (None, None, None)
        T = ids.size(1)

        def with_previous(prev, cur):  # the previous token prepended for the parts that look one back
            return cur if prev is None else torch.cat((prev, cur), dim=1)

        all_ids = with_previous(prev_ids, ids)
        e = self.tok_emb(ids)
        if hasattr(self, "bigram"):
            e = e + self.bigram(all_ids)[:, -T:]
        smeared = e
        if hasattr(self, "smear_gate"):
            smeared = input_smear(with_previous(prev_e, e), all_ids, self.smear_gate.weight, self.smear_lambda)[:, -T:]
        h = rms_norm_reference(smeared)
        x = self.smear(with_previous(prev_h, h))[:, -T:] if hasattr(self, "smear") else h
        return x, (ids[:, -1:], e[:, -1:], h[:, -1:])

    def skip_for(self, row: int, kept: torch.Tensor) -> tuple:
        """A kept encoder output as the next block merges it: x + w⊙s, or with skip gates lerp(w⊙s, x, σ(g))
        (kernels.skip_mix_norm: (kept, weight row, gate row or None))."""
        return kept, self.skip_weights[row], self.skip_gates[row] if hasattr(self, "skip_gates") else None

    def run_blocks(self, x: torch.Tensor, x0: torch.Tensor, ropes: Mapping,
                   block_for: Callable[[Slot], nn.Module] | None = None,
                   cu_seqlens: torch.Tensor | None = None, lora=None) -> torch.Tensor:
        """x after every slot of the schedule, in order. block_for(slot): what runs the slot's block (its
        module in forward, the block with cached attention in decode_step); ropes: {slot.rope: (cos, sin)};
        lora: test-time adapters (model/lora.py TTTLoRA), lora.slots[i] for the i-th slot.

        Two-lane slots start both lanes from x (before their skip merge, which goes into lane0); after the
        last slot x is their mean (PARALLEL_FINAL_LANE: or lane0, or lane1)."""
        block_for = block_for or self.block
        skips, lanes = [], None
        if lora is not None and lora.num_slots != len(self.schedule):
            raise ValueError(f"the adapters were made for {lora.num_slots} slots, the schedule has "
                             f"{len(self.schedule)}: test-time training runs with recurrence on")
        for i, slot in enumerate(self.schedule):
            block = block_for(slot)
            adapter = None if lora is None else lora.slots[i]
            if slot.inst is not None:  # x_loop = x + up_k(proj(x))
                x = x + self.loop_inst_up[slot.inst](self.loop_inst_proj(x))
            if slot.parallel and lanes is None:
                lanes = (x, x)
            # decoder 0 gets the last encoder's output, and so on inwards; the block merges it (into lane0)
            skip = self.skip_for(slot.skip, skips.pop()) if slot.skip is not None else None
            cos, sin = ropes[slot.rope]
            if lanes is None:
                x = block(x, x0, cos, sin, cu_seqlens, skip, adapter)
            else:
                lanes = block.forward_parallel(*lanes, x0, cos, sin, cu_seqlens,
                                               self.parallel_resid_lambdas[slot.index],
                                               self.parallel_post_lambdas[slot.index], skip, adapter)
            if slot.push_skip:
                skips.append(x)
        if lanes is not None:
            final = self.config.parallel_final_lane
            x = lanes[0] if final == "attn" else lanes[1] if final == "mlp" else 0.5 * (lanes[0] + lanes[1])
        return x

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, lora=None, tail: int | None = None) -> torch.Tensor:
        """ids [B, T] -> softcapped fp32 logits [B, T, vocab], or the fp32 mean cross-entropy given targets [B, T].

        cu_seqlens: int32 segment offsets into one packed row (B = 1): attention stays within each segment
        (R1's document isolation); RoPE positions stay row positions. lora: per-row test-time adapters
        (model/lora.py TTTLoRA) on every slot's projections and MLP and on the head. tail: logits of the last
        `tail` positions only (test-time training scores a chunk at the end of a longer window; at a large vocab
        the head is the costliest op)."""
        if ids.dim() != 2:
            raise ValueError(f"GPT: ids must be [batch, seq], got shape {tuple(ids.shape)}")
        if targets is not None and targets.shape != ids.shape:
            raise ValueError(f"GPT: targets shape {tuple(targets.shape)} != ids shape {tuple(ids.shape)}")
        cfg = self.config
        T, device = ids.size(1), ids.device
        x0 = self.embed(ids)[0]
        x = self.run_blocks(x0, x0, self.rope_tables(T, device), cu_seqlens=cu_seqlens, lora=lora)
        h = self.head_input(kernels.rms_norm(x))
        if tail is not None:
            h = h[:, -tail:]
            targets = None if targets is None else targets[:, -tail:]
        if targets is not None and lora is None:  # fused on the Triton path: no [B·T, vocab] fp32 logits
            return kernels.softcap_cross_entropy(h, self.tok_emb.weight, targets, cfg.logit_softcap)
        logits = F.linear(h, self.tok_emb.weight).float()
        if lora is not None:
            logits = logits + lora.head(h).float()
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        if targets is not None:
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits


# ---------------------------------------------------------------- helpers for the trainer, quant/ and the CLIs

def _unwrap(model: nn.Module) -> GPT:
    """The GPT inside a torch.compile and/or DDP wrapper."""
    while not isinstance(model, GPT):
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a GPT (possibly compiled or DDP-wrapped), got {type(model).__name__}")
        model = inner
    return model


def build_model(config: Config | None = None, **overrides) -> GPT:
    """The model for `config`, or for the environment (PRESET and the seed's variables) when it is None.

    Keyword overrides replace config fields (`build_model(preset="tiny", model_dim=64)`).
    """
    if config is None:
        config = from_env(**overrides)
    elif overrides:
        config = config.replace(**overrides)
    return GPT(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in _unwrap(model).parameters())


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters by optimizer: "matrix" (Muon: every nn.Linear weight but R1's SmearGate row, i.e. the
    blocks' matrices, the bigram and instruction projections), "embed" (AdamW: tok_emb, bigram.embed),
    "scalar" (AdamW: the rest, the SmearGate's 1 x GATE_WINDOW weight included, as R1 groups it)."""
    model = _unwrap(model)
    matrices = {id(m.weight) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "smear_gate"}
    embeddings = {id(model.tok_emb.weight)} | ({id(model.bigram.embed.weight)} if hasattr(model, "bigram") else set())
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


def _load_exact(config: Config, state_dict: Mapping, source: str) -> GPT:
    """A model for `config` holding `state_dict`, after naming every missing, unexpected or mis-shaped tensor.

    The model is built on the meta device and takes the tensors as they are (assign=True): loading
    should not pay for a random init that is overwritten at once.
    """
    with torch.device("meta"):
        model = GPT(config)
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


def from_seed_state_dict(state_dict: Mapping) -> GPT:
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


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> GPT:
    """The model saved by save_checkpoint, built from its stored config, on `map_location`; or R1's
    `final_model.pt` (its banked state dict alone) as the `frontier` model."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: unreadable, corrupt or not a torch file "
                              f"({type(e).__name__}: {e})") from e
    if isinstance(payload, dict) and "qo_bank" in payload and "config" not in payload:  # R1's torch.save(state_dict)
        from .record import from_record_state_dict

        return from_record_state_dict(payload).to(map_location)
    if not isinstance(payload, dict) or not {"config", "state_dict"} <= set(payload):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path}: expected keys 'config' and 'state_dict', found {found}")
    try:
        config = Config.from_dict(payload["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: bad stored config: {e}") from e
    return _load_exact(config, payload["state_dict"], f"checkpoint {path}")
