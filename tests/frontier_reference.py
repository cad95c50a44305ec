"""An independent fp32 reference of the challenge record R1's model function, written from
the specification of R1 alone, MODEL.md (section numbers below are its).

It deliberately shares no code with model/ or kernels/: the project's model is tested against it, and a
shared bug would hide. Everything is eager fp32 torch, written for clarity, not speed (attention builds an
explicit [T, T] mask). The one as-run rounding it keeps is the bf16 rotary inv_freq table (§2.6, §7).
"""
import dataclasses
import math
from typing import NamedTuple

import torch

BOS_ID = 1  # hard-coded in R1 (§1, §7)
RMS_EPS = torch.finfo(torch.float32).eps  # 2^-23, PyTorch's default for eps=None (conventions)
XSA_NORM_FLOOR = 1e-12  # §2.6 step 6
LEAKY_SLOPE = 0.5  # §2.7
R1_PARAMETER_COUNT = 35_945_671  # §5, the log's model_params


@dataclasses.dataclass(frozen=True)
class R1Shape:
    """R1's shape-defining hyperparameters as run (§1). Tests shrink the sizes and keep the structure.

    SmearGate, skip gates and the sparse attention gate are always on, as run: MODEL.md specifies only that
    path, so the flags exist to make the choice explicit and refuse anything else.
    """
    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    rope_dims: int = 16  # 0 means the whole head (§1)
    rope_base: float = 10000.0
    qk_gain_init: float = 5.0  # the init only (§3); r1_state_dict_random draws its own q_gain
    logit_softcap: float = 30.0
    num_loops: int = 2
    loop_start: int = 3
    loop_end: int = 5
    parallel_start_layer: int = 8  # 0 disables the two-lane blocks
    parallel_final_lane: str = "mean"  # mean / attn / mlp (§2.8 step 7)
    gate_window: int = 12
    sparse_attn_gate_scale: float = 0.5
    bos_id: int = BOS_ID
    xsa_last_n: int = 11  # XSA on physical blocks max(0, L - N)..L-1
    ln_scale: bool = True
    skip_gates: bool = True
    smear_gate: bool = True
    sparse_attn_gate: bool = True

    def __post_init__(self):
        if not (self.skip_gates and self.smear_gate and self.sparse_attn_gate):
            raise ValueError("MODEL.md specifies R1 with skip gates, SmearGate and sparse attention gate on only")
        if self.parallel_final_lane not in ("mean", "attn", "mlp"):
            raise ValueError(f"parallel_final_lane must be mean, attn or mlp, not {self.parallel_final_lane!r}")
        if self.model_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must divide model_dim, and num_kv_heads must divide num_heads")
        if not 0 <= self.loop_start <= self.loop_end < self.num_layers:
            raise ValueError("the loop segment loop_start..loop_end must lie inside 0..num_layers-1")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)  # §1 MLP_MULT

    @property
    def rotary_dims(self) -> int:
        return self.rope_dims or self.head_dim


# ---- §2.3 layer schedule -------------------------------------------------------------------------------

class Slot(NamedTuple):
    """One virtual slot. For decoder slot j (its position among the decoder slots), `skip` is the k of the
    S_k popped before it, merged with skip_weights[j] and skip_gates[j]; encoder slot k pushes S_k."""
    physical: int
    part: str  # "enc" or "dec"
    skip: int | None
    parallel: bool


def _encoder_decoder(shape: R1Shape, looping_active: bool) -> tuple[list[int], list[int]]:
    """§2.3: the physical index lists of the encoder and decoder slots."""
    if looping_active:
        loop = list(range(shape.loop_start, shape.loop_end + 1))
        virtual = list(range(shape.loop_start)) + loop * (shape.num_loops + 1) \
            + list(range(shape.loop_end + 1, shape.num_layers))
    else:
        virtual = list(range(shape.num_layers))
    n_encoder = len(virtual) // 2
    return virtual[:n_encoder], virtual[n_encoder:]


def num_skip_slots(shape: R1Shape) -> int:
    """K, fixed from the loop-on lists and used in both modes (§2.3)."""
    encoder, decoder = _encoder_decoder(shape, looping_active=True)
    return min(len(encoder), len(decoder))


def r1_schedule(shape: R1Shape, looping_active: bool = True) -> list[Slot]:
    """The slot plan of §2.3/§2.4/§2.8: encoder slots push, decoder slot j < K pops while the stack lasts,
    decoder slots with physical index >= parallel_start_layer (> 0) run two-lane."""
    encoder, decoder = _encoder_decoder(shape, looping_active)
    plan = [Slot(i, "enc", None, False) for i in encoder]
    stack, k = list(range(len(encoder))), num_skip_slots(shape)
    for j, i in enumerate(decoder):
        skip = stack.pop() if j < k and stack else None
        plan.append(Slot(i, "dec", skip, 0 < shape.parallel_start_layer <= i))
    flags = [slot.parallel for slot in plan]
    if True in flags and not all(flags[flags.index(True):]):
        # MODEL.md only describes parallel slots that run to the end of the decoder (§2.8 step 7).
        raise ValueError("the parallel slots must be the last decoder slots")
    return plan


# ---- §4 checkpoint format ------------------------------------------------------------------------------

def r1_state_dict_spec(shape: R1Shape) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key of R1's checkpoint in save order (§4) with its shape and dtype; nothing is allocated."""
    n, d, f32 = shape.num_layers, shape.model_dim, torch.float32
    k = num_skip_slots(shape)
    spec = {
        "qo_bank": ((2 * n, d, d), f32),
        "kv_bank": ((2 * n, shape.kv_dim, d), f32),
        "mlp_up_bank": ((n, shape.hidden, d), f32),
        "mlp_down_bank": ((n, d, shape.hidden), f32),
        "skip_weights": ((k, d), f32),
        "skip_gates": ((k, d), f32),
        "parallel_post_lambdas": ((n, 2, 2), f32),
        "parallel_resid_lambdas": ((n, 2), f32),
        "smear_lambda": ((1,), f32),
        "tok_emb.weight": ((shape.vocab_size, d), torch.bfloat16),
    }
    for i in range(n):
        spec[f"blocks.{i}.attn_scale"] = ((d,), f32)
        spec[f"blocks.{i}.mlp_scale"] = ((d,), f32)
        spec[f"blocks.{i}.resid_mix"] = ((2, d), f32)
        spec[f"blocks.{i}.attn.q_gain"] = ((shape.num_heads,), f32)
        spec[f"blocks.{i}.attn.attn_gate_w"] = ((shape.num_heads, shape.gate_window), f32)
    spec["smear_gate.weight"] = ((1, shape.gate_window), f32)
    return spec


def r1_parameter_count(shape: R1Shape) -> int:
    """§5: the element count of the checkpoint (35,945,671 at R1's shape)."""
    return sum(math.prod(size) for size, _ in r1_state_dict_spec(shape).values())


# (mean, std) of the random fill of the control tensors, by key (block keys by their suffix). Centred near the
# init where the init is not zero, but never equal to it: zero gates or unit lambdas would hide terms.
_CONTROL_FILL = {
    "skip_weights": (1.0, 0.25),
    "skip_gates": (0.0, 1.0),
    "parallel_post_lambdas": (1.0, 0.25),
    "parallel_resid_lambdas": (1.1, 0.1),
    "smear_lambda": (0.5, 0.2),
    "tok_emb.weight": (0.0, 0.5),  # logits z of std ~0.5·sqrt(d): the softcap bends, the SmearGate input varies
    "attn_scale": (1.0, 0.25),
    "mlp_scale": (1.0, 0.25),
    "resid_mix": (0.0, 0.5),  # row 0 gets +1 (r1_state_dict_random); row 1, the x0 term, is far from zero
    "attn.q_gain": (2.0, 0.5),  # below the 5.0 init so the softmax stays soft and every key matters
    "attn.attn_gate_w": (0.0, 0.5),
    "smear_gate.weight": (0.0, 0.5),
}


def _fill_mean_std(key: str, shape: R1Shape) -> tuple[float, float]:
    """Matrices get unit-variance outputs for unit-RMS inputs (out/down too: their zero init would hide the
    attention and MLP); control tensors follow _CONTROL_FILL."""
    if key in ("qo_bank", "kv_bank", "mlp_up_bank"):
        return 0.0, shape.model_dim ** -0.5
    if key == "mlp_down_bank":
        return 0.0, shape.hidden ** -0.5
    return _CONTROL_FILL[key.split(".", 2)[2] if key.startswith("blocks.") else key]


def r1_state_dict_random(shape: R1Shape, seed: int) -> dict[str, torch.Tensor]:
    """A checkpoint in R1's exact format (§4) with every tensor random (_fill_mean_std), drawn in save order.
    tok_emb is drawn in fp32 and stored bf16, so its values are bf16-representable by construction."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, (size, dtype) in r1_state_dict_spec(shape).items():
        mean, std = _fill_mean_std(key, shape)
        value = torch.randn(size, generator=generator) * std + mean
        if key.endswith("resid_mix"):
            value[0] += 1.0
        state[key] = value.to(dtype)
    return state


# ---- building blocks (§2.2-§2.9), exposed for the reference's own tests --------------------------------

def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Weightless RMSNorm over the last dim with eps = 2^-23 (conventions)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)


def smear(e: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, lam: torch.Tensor,
          bos_id: int = BOS_ID) -> torch.Tensor:
    """§2.2 SmearGate on raw embeddings e [B, T, d]: h_t = e_t + (λσ(w·e_t[:W])·e_{t-1})·m_t for t >= 1,
    m_t = 0 at BOS. Not recursive (e_{t-1} is unsmeared); position 0 of a row is untouched."""
    window = weight.shape[-1]
    gate = lam * torch.sigmoid(e[..., :window] @ weight.T)  # [B, T, 1]
    not_bos = (ids[:, 1:] != bos_id).to(e.dtype).unsqueeze(-1)
    return torch.cat([e[:, :1], e[:, 1:] + (gate[:, 1:] * e[:, :-1]) * not_bos], dim=1)


def skip_merge(x: torch.Tensor, s: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """§2.4: lerp(start = w⊙s, end = x, weight = σ(g)) = w⊙s + σ(g)⊙(x − w⊙s), a real lerp."""
    return torch.lerp(w * s, x, torch.sigmoid(g))


def leaky_relu_sq(u: torch.Tensor) -> torch.Tensor:
    """§2.7 φ(u) = u² for u > 0, (0.5u)² otherwise."""
    return torch.where(u > 0, u, LEAKY_SLOPE * u).square()


def rope_inv_freq(shape: R1Shape) -> torch.Tensor:
    """§2.6 step 3: inv_freq_j = 1/base^(2j/rd) in fp32, rounded to bf16 as run, returned as fp32."""
    rd = shape.rotary_dims
    exact = 1.0 / (shape.rope_base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    return exact.to(torch.bfloat16).to(torch.float32)


def rope_tables(shape: R1Shape, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rd/2] of θ_{p,j} = p·inv_freq_j in fp32, p the row index (§2.6, §2.10)."""
    theta = torch.outer(torch.arange(seq_len, dtype=torch.float32), rope_inv_freq(shape))
    return theta.cos(), theta.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """§2.6 step 3 on x [B, T, heads, D]: u1' = u1·cos + u2·sin, u2' = −u1·sin + u2·cos on the first rd dims."""
    half = cos.shape[-1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    u1, u2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([u1 * cos + u2 * sin, -u1 * sin + u2 * cos, rest], dim=-1)


def attention_mask(seq_len: int, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """[T, T] bool, True where query p may see key p': p' <= p and, with cu_seqlens, the same segment (§2.10)."""
    positions = torch.arange(seq_len)
    mask = positions[None, :] <= positions[:, None]
    if cu_seqlens is not None:
        cu = cu_seqlens.to(torch.int64)
        if cu[0] != 0 or cu[-1] != seq_len or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError("cu_seqlens must rise from 0 to T")
        segment = torch.searchsorted(cu, positions, right=True)
        mask &= segment[None, :] == segment[:, None]
    return mask


# ---- the model function --------------------------------------------------------------------------------

class _Block:
    """Physical block i's weights, sliced from the banks (§4 `_bank_weights`), all fp32."""

    def __init__(self, state: dict[str, torch.Tensor], i: int, shape: R1Shape):
        n = shape.num_layers
        self.w_q, self.w_o = state["qo_bank"][i], state["qo_bank"][n + i]
        self.w_k, self.w_v = state["kv_bank"][i], state["kv_bank"][n + i]
        self.w_up, self.w_down = state["mlp_up_bank"][i], state["mlp_down_bank"][i]
        self.attn_scale = state[f"blocks.{i}.attn_scale"]
        self.mlp_scale = state[f"blocks.{i}.mlp_scale"]
        self.resid_mix = state[f"blocks.{i}.resid_mix"]
        self.q_gain = state[f"blocks.{i}.attn.q_gain"]
        self.gate_w = state[f"blocks.{i}.attn.attn_gate_w"]
        self.ln = 1.0 / math.sqrt(i + 1) if shape.ln_scale else 1.0  # s_i (§1 LN_SCALE)
        self.xsa = i >= max(0, n - shape.xsa_last_n)  # §1 XSA_LAST_N
        self.shape = shape

    def attention(self, a: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  mask: torch.Tensor) -> torch.Tensor:
        """§2.6 on a = RMSNorm(·)·s_i, [B, T, d]."""
        shape = self.shape
        b, t, _ = a.shape
        h, h_kv, dh = shape.num_heads, shape.num_kv_heads, shape.head_dim
        q = (a @ self.w_q.T).view(b, t, h, dh)
        k = (a @ self.w_k.T).view(b, t, h_kv, dh)
        v = (a @ self.w_v.T).view(b, t, h_kv, dh)
        q, k = rms_norm(q), rms_norm(k)  # step 2, per head
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # step 3
        q = q * self.q_gain[:, None]  # step 4, after RoPE
        kv_head = torch.arange(h) // (h // h_kv)  # GQA: head h uses KV head h // (H/Hkv)
        k, v = k[:, :, kv_head], v[:, :, kv_head]  # [B, T, H, D]
        scores = torch.einsum("bphd,bshd->bhps", q, k) / math.sqrt(dh)  # step 5
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        y = torch.einsum("bhps,bshd->bphd", probs, v)
        if self.xsa:  # step 6: remove the component along the token's own raw value
            v_hat = v / v.norm(dim=-1, keepdim=True).clamp_min(XSA_NORM_FLOOR)
            y = y - (y * v_hat).sum(dim=-1, keepdim=True) * v_hat
        gate = torch.sigmoid(shape.sparse_attn_gate_scale * (a[..., :shape.gate_window] @ self.gate_w.T))  # step 7
        y = y * gate.unsqueeze(-1)
        return y.reshape(b, t, h * dh) @ self.w_o.T  # step 8

    def mlp(self, a: torch.Tensor) -> torch.Tensor:
        """§2.7."""
        return leaky_relu_sq(a @ self.w_up.T) @ self.w_down.T

    def sequential(self, x, x0, rope, mask):
        """§2.5."""
        x_in = self.resid_mix[0] * x + self.resid_mix[1] * x0
        x = x_in + self.attn_scale * self.attention(rms_norm(x_in) * self.ln, rope, mask)
        return x + self.mlp_scale * self.mlp(rms_norm(x) * self.ln)

    def parallel(self, lane0, lane1, x0, rope, mask, resid_lambdas, post_lambdas):
        """§2.8 steps 3-6, with r = resid_lambdas [2] and P = post_lambdas [2 (source), 2 (lane)]."""
        a_in = self.resid_mix[0] * lane0 + self.resid_mix[1] * x0
        attn_out = self.attn_scale * self.attention(rms_norm(a_in) * self.ln, rope, mask)
        mlp_out = self.mlp_scale * self.mlp(rms_norm(lane1) * self.ln)
        new_lane0 = resid_lambdas[0] * lane0 + post_lambdas[0, 0] * attn_out + post_lambdas[1, 0] * mlp_out
        new_lane1 = resid_lambdas[1] * lane1 + post_lambdas[0, 1] * attn_out + post_lambdas[1, 1] * mlp_out
        return new_lane0, new_lane1


def r1_hidden(state_dict: dict[str, torch.Tensor], ids: torch.Tensor, shape: R1Shape,
              looping_active: bool = True, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """§2.2-§2.8: the stream x [B, T, d] that enters the final norm."""
    if cu_seqlens is not None and ids.shape[0] != 1:
        raise ValueError("cu_seqlens needs a single packed row (B = 1)")
    state = {key: value.to(torch.float32) for key, value in state_dict.items()}
    seq_len = ids.shape[1]
    rope = rope_tables(shape, seq_len)
    mask = attention_mask(seq_len, cu_seqlens)
    blocks = [_Block(state, i, shape) for i in range(shape.num_layers)]

    e = state["tok_emb.weight"][ids]  # §2.2
    x0 = rms_norm(smear(e, ids, state["smear_gate.weight"], state["smear_lambda"], shape.bos_id))
    plan = r1_schedule(shape, looping_active)
    encoder = [slot for slot in plan if slot.part == "enc"]
    decoder = [slot for slot in plan if slot.part == "dec"]
    x, skips = x0, []
    for slot in encoder:
        x = blocks[slot.physical].sequential(x, x0, rope, mask)
        skips.append(x)  # S_k, k = this encoder slot (§2.4)
    lanes = None
    for j, slot in enumerate(decoder):
        if slot.parallel and lanes is None:
            lanes = (x, x)  # §2.8 step 1: both lanes start from the stream before the merge
        stream = lanes[0] if slot.parallel else x
        if slot.skip is not None:  # §2.4 with w[j], g[j]; into lane0 for a parallel slot
            stream = skip_merge(stream, skips[slot.skip], state["skip_weights"][j], state["skip_gates"][j])
        block = blocks[slot.physical]
        if slot.parallel:
            lanes = block.parallel(stream, lanes[1], x0, rope, mask, state["parallel_resid_lambdas"][slot.physical],
                                   state["parallel_post_lambdas"][slot.physical])
        else:
            x = block.sequential(stream, x0, rope, mask)
    if lanes is None:
        return x
    return {"mean": 0.5 * (lanes[0] + lanes[1]), "attn": lanes[0], "mlp": lanes[1]}[shape.parallel_final_lane]


def r1_logits(state_dict: dict[str, torch.Tensor], ids: torch.Tensor, shape: R1Shape,
              looping_active: bool = True, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """R1's model function (§2): ids [B, T] int64 -> logits [B, T, V] fp32. cu_seqlens (int32, B = 1) keeps
    attention causal within each segment; RoPE positions stay row indices (§2.10)."""
    x = r1_hidden(state_dict, ids, shape, looping_active, cu_seqlens)
    z = rms_norm(x) @ state_dict["tok_emb.weight"].to(torch.float32).T  # §2.9, tied head
    return shape.logit_softcap * torch.tanh(z / shape.logit_softcap)


def build_cu_seqlens(ids_row: torch.Tensor, max_len: int = 2048, pad_to: int = 64,
                     bos_id: int = BOS_ID) -> torch.Tensor:
    """§2.10 `_build_cu_seqlens`: segment starts at 0 and every BOS, a new one every max_len tokens inside a
    document (counted from its start), then T, padded with copies of T to a multiple of pad_to entries."""
    seq_len = ids_row.numel()
    doc_starts = sorted({0} | set((ids_row == bos_id).nonzero().flatten().tolist()))
    starts = []
    for start, end in zip(doc_starts, doc_starts[1:] + [seq_len]):
        starts.extend(range(start, end, max_len))
    cu = starts + [seq_len]
    cu += [seq_len] * (-len(cu) % pad_to)
    return torch.tensor(cu, dtype=torch.int32)
