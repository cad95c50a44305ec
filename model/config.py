"""One typed configuration for the model, training, evaluation and quantization.

Resolution order: dataclass defaults (the seed's reproduce command) < the preset (PRESET=ouroboros |
ouroboros-as-run | tiny, each only what it changes) < environment variables named as in the seed's
reproduce command (field `matrix_lr` <- MATRIX_LR) < keyword overrides. A bad value stops at start-up
with the variable named. With no PRESET the default is `ouroboros` when CUDA is present and `tiny` otherwise.

Checks sit on the fields (`setting(default, bound=..., choices=..., fixed=...)`); the checks that relate
fields to each other are in `_validated`. The seed's SKIP_GPTQ / LOOP_AWARE_GPTQ pair is read as the one
QUANT_METHOD it means (`_quant_method_from_env`), and configs stored with the pair still load (`from_dict`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field, fields

from kernels._runtime import parse_flag

from .datasets import VARIANTS, variant_for
from kernels.gptq import INVERSES as GPTQ_INVERSES, MAX_BLOCK as GPTQ_MAX_BLOCK, ORDERS as GPTQ_ORDERS

# quant/methods.py registers one class under each of these names (a new method adds its name here too).
QUANT_METHODS = ("rtn", "gptq", "loop_aware", "frontier")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


def setting(default, *, bound: str = "", choices: tuple = (), fixed: bool = False):
    """A Config field with its check: bound ">0" or ">=0", one of `choices`, or `fixed` (only the default is
    accepted: a switch of the original for a feature this project does not have)."""
    if bound not in ("", ">0", ">=0"):
        raise ValueError(f"setting: bound={bound!r} must be '>0' or '>=0'")
    return field(default=default, metadata={"bound": bound, "choices": tuple(choices), "fixed": fixed})


@dataclass(frozen=True)
class Config:
    """The defaults are the seed's reproduce command (SPEC 3); a preset lists only what it changes."""
    preset: str = "ouroboros"
    # --- model (SPEC 3) ---
    vocab_size: int = setting(1024, bound=">0")
    model_dim: int = setting(512, bound=">0")
    num_heads: int = setting(8, bound=">0")
    num_kv_heads: int = setting(4, bound=">0")
    num_flat_layers: int = setting(9, bound=">=0")   # U-Net: num_flat_layers // 2 encoder blocks, the rest decoder
    crawler_loops: int = setting(2, bound=">0")
    crawler_loop_rope_scales: tuple = (9.0, 1.0, 1.0)   # values beyond crawler_loops are ignored
    mlp_mult: float = setting(3.0, bound=">0")
    crawler_mlp_mult: float = setting(6.0, bound=">0")
    mlp_leaky_slope: float = setting(0.5, bound=">=0")  # 0 = relu^2
    crawler_mlp_leaky_slope: float = setting(0.5, bound=">=0")
    qk_gain_init: float = setting(4.0, bound=">=0")
    xsa_last_n: int = setting(11, bound=">=0")  # last N of the distinct blocks in forward order (enc.., crawler, dec..)
    xsa_blocks: str = setting("", choices=("", "crawler"))  # "crawler": the original's crawler-only placement
                                                            # (overrides xsa_last_n)
    inst_dim: int = setting(32, bound=">=0")         # per-loop instruction bottleneck; 0 = off
    bigram_vocab_size: int = setting(2048, bound=">=0")  # 0 = no BigramHash
    bigram_dim: int = setting(128, bound=">0")
    rope_dims: int = setting(16, bound=">=0")
    rope_base: float = 10000.0
    # The original as it ran: its model.bfloat16() rounded every rotary inv_freq buffer to bf16, and each crawler
    # loop divides that rounded buffer by its scale (its flat blocks rebuilt exact tables at 2048). False: exact.
    rope_inv_freq_bf16: bool = setting(False)
    ln_scale: bool = setting(True)  # norm outputs x 1/sqrt(i+1), i the physical block index
    logit_softcap: float = setting(30.0, bound=">0")
    tied_embed_init_std: float = 0.005
    train_seq_len: int = setting(2048, bound=">0")   # also fixes the flat blocks' NTK RoPE base
    # --- training (SPEC 4) ---
    seed: int = 444
    iterations: int = setting(20000, bound=">0")
    max_wallclock_seconds: float = 600.0   # <= 0: step schedule over `iterations`
    warmdown_iters: int = setting(2000, bound=">=0")
    warmup_steps: int = setting(20, bound=">=0")     # compile warmup, then weights/optimizer/data are reset
    train_batch_tokens: int = setting(786432, bound=">0")
    grad_accum_steps: int = setting(0, bound=">=0")  # 0: 8 // world_size, as the original
    val_loss_every: int = setting(1000, bound=">=0")  # 0: only at the end
    train_log_every: int = setting(200, bound=">=0")
    matrix_lr: float = setting(0.03, bound=">=0")
    tied_embed_lr: float = setting(0.035, bound=">=0")
    scalar_lr: float = setting(0.025, bound=">=0")
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = setting(1500, bound=">=0")
    muon_backend_steps: int = setting(5, bound=">0")
    muon_weight_decay: float = setting(0.04, bound=">=0")
    adam_weight_decay: float = setting(0.04, bound=">=0")
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = setting(0.3, bound=">=0")
    micro_batch_grads: str = setting("mean", choices=("mean", "sum"))  # sum: the original's plain loss.backward()
                                                                       # per micro-batch (same at grad accum 1)
    swa_every: int = setting(50, bound=">=0")        # 0 = off; snapshots once the LR multiplier < 0.2
    # --- R1's training switches (TRAIN.md; each off: the Ouroboros entry) ---
    train_loader: str = setting("stream", choices=("stream", "packed"))  # packed: one row of whole documents,
                                                                          # attention cut at each BOS (TRAIN.md 1)
    muon_row_normalize: bool = setting(False)   # MuonEq-R: rows of the update normalized before Newton-Schulz
    muon_ns: str = setting("quintic", choices=("quintic", "polar"))  # polar: the five Polar-Express tuples
    embed_weight_decay: float = -1.0            # EMBED_WD; < 0: ADAM_WEIGHT_DECAY, as the Ouroboros entry
    warmdown_frac: float = setting(0.0, bound=">=0")  # > 0: LR by elapsed fraction, decaying over its last part
    min_lr: float = setting(0.0, bound=">=0")          # floor of the LR multiplier
    enable_looping_at: float = setting(0.0, bound=">=0")  # recurrence off until this fraction of training
    ema_decay: float = setting(0.0, bound=">=0")       # > 0: EMA of the weights every step, swapped in at the end
    grad_clip_mode: str = setting("global", choices=("global", "local"))  # local: each rank's gradient, as R1
    compile_fullgraph: bool = True      # torch.compile(fullgraph=True) on CUDA
    # --- evaluation (SPEC 2) ---
    eval_seq_len: int = setting(2048, bound=">0")
    eval_stride: int = setting(64, bound=">0")
    eval_batch_seqs: int = setting(32, bound=">0")
    # sliding: windows of EVAL_SEQ_LEN every EVAL_STRIDE (the Ouroboros entry's score); doc: attention cut at each
    # BOS and every EVAL_SEQ_LEN tokens of a document, spans of EVAL_BATCH_SEQS windows (R1's score)
    eval_mode: str = setting("sliding", choices=("sliding", "doc"))
    # --- phased LoRA test-time training at evaluation (R1's, DATA_EVAL.md 4; train/ttt.py): per-document adapters
    # trained chunk by chunk on what was already scored, and global SGD phases on the scored documents. On, its
    # score is the run's. Defaults are R1's run values; the names are R1's variables ---
    ttt_enabled: bool = setting(False)
    ttt_lora_rank: int = setting(80, bound=">0")
    ttt_lora_alpha: float = setting(144.0, bound=">0")   # adapter scale alpha / rank
    ttt_warm_start_a: bool = setting(True)                # A carried from batch to batch (B reset), else fresh
    ttt_lora_lr: float = setting(1e-4, bound=">=0")
    ttt_chunk_size: int = setting(48, bound=">0")
    ttt_eval_seq_len: int = setting(2048, bound=">0")     # the window cap, and the global SGD's sequence length
    ttt_batch_size: int = setting(64, bound=">0")
    ttt_grad_steps: int = setting(1, bound=">=0")
    ttt_weight_decay: float = setting(0.5, bound=">=0")
    ttt_beta1: float = setting(0.0, bound=">=0")
    ttt_beta2: float = setting(0.99, bound=">=0")
    ttt_k_lora: bool = setting(True)
    ttt_o_lora: bool = setting(True)
    ttt_mlp_lora: bool = setting(True)
    ttt_optimizer: str = setting("adam", fixed=True)
    # dynamic: batches go to whichever rank asks first (an atomic counter in torch.distributed's store: fastest);
    # static: batch i of the queue on rank i mod world and warm A carried along TTT_STATIC_LANES fixed lanes, so
    # the score does not depend on timing or on the number of ranks (any that divides the lanes)
    ttt_schedule: str = setting("dynamic", choices=("dynamic", "static"))
    ttt_static_lanes: int = setting(8, bound=">0")
    ttt_compile: bool = setting(True)                     # torch.compile the TTT forward on CUDA (warmed on random ids)
    phased_ttt_prefix_docs: int = setting(2500, bound=">=0")
    phased_ttt_num_phases: int = setting(3, bound=">=0")
    global_ttt_lr: float = setting(1e-3, bound=">=0")
    global_ttt_momentum: float = setting(0.9, bound=">=0")
    global_ttt_epochs: int = setting(1, fixed=True)
    global_ttt_chunk_tokens: int = setting(32768, bound=">0")
    global_ttt_batch_seqs: int = setting(32, bound=">0")
    global_ttt_grad_clip: float = setting(1.0, bound=">0")
    global_ttt_warmup_chunks: int = setting(0, fixed=True)
    global_ttt_respect_doc_boundaries: bool = setting(True)
    val_doc_fraction: float = setting(1.0, bound=">0")
    # --- quantization (SPEC 5) ---
    quant_method: str = setting("loop_aware", choices=QUANT_METHODS)  # the seed's SKIP_GPTQ=0 LOOP_AWARE_GPTQ=1
    gptq_cal_samples: int = setting(128, bound=">0")
    gptq_cal_seq_len: int = setting(2048, bound=">0")
    # GPTQ_RESERVE_SECONDS=auto (stored as -1): training stops when the time left reaches the calibration's cost,
    # estimated from this run's measured forward time and a GPTQ probe (train/trainer.py CalibrationBudget)
    gptq_reserve_seconds: float = -1.0
    # stream: the first GPTQ_CAL_SAMPLES sequences of the train stream; shuffled: R1's loader (QUANT.md Q.1), seeded
    # by the rank
    gptq_cal_loader: str = setting("stream", choices=("stream", "shuffled"))
    gptq_block_size: int = setting(128, bound=">0")
    gptq_damping: float = setting(0.01, bound=">=0")
    gptq_order: str = setting("descending", choices=GPTQ_ORDERS)
    gptq_inverse: str = setting("cholesky", choices=GPTQ_INVERSES)  # plain: the original's never-downdated inverse
    quant_small_numel: int = setting(65536, bound=">=0")  # tensors with at most this many elements are stored fp16
    # --- R1's quantization (QUANT_METHOD=frontier, QUANT.md): SDClip steps k * row std / (2^(bits-1) - 1) ---
    matrix_bits: int = setting(6, choices=(6, 7))
    embed_bits: int = setting(7, choices=(6, 7))         # the tied embedding's GPTQ (R1's run: 7; its code's 8 unused)
    matrix_clip_sigmas: float = setting(12.85, bound=">0")
    mlp_clip_sigmas: float = setting(10.0, bound=">0")
    attn_clip_sigmas: float = setting(13.0, bound=">0")
    embed_clip_sigmas: float = setting(20.0, bound=">0")
    gated_attn_quant_gate: bool = setting(False)         # the attention gate rows int8 per row
    lqer_enabled: bool = setting(True)                   # low-rank correction of the LQER_TOP_K largest errors
    lqer_rank: int = setting(4, bound=">0")
    lqer_top_k: int = setting(3, bound=">=0")
    lqer_factor_bits: int = setting(4, bound=">0")
    lqer_asym_enabled: bool = setting(True)
    lqer_asym_group: int = setting(64, bound=">0")
    # ouroptz: this project's container (brotli-11 over grouped sections); pergroup: R1's layout, role groups
    # of similarity-sorted, transposed codes, each through PERGROUP_CODER
    compressor: str = setting("ouroptz", choices=("ouroptz", "pergroup"))
    pergroup_coder: str = setting("auto", choices=("auto", "ans", "lrzip", "brotli"))  # auto: the best this build has
    # --- paths and run control ---
    caseops_enabled: bool = setting(False)  # the CaseOps data: val bytes come from its byte sidecars
    # unset: the download (model/datasets.py) below DATA_DIR that VOCAB_SIZE and CASEOPS_ENABLED name
    data_dir: str = "data"
    data_path: str = "data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "data/tokenizers/fineweb_1024_bpe.model"
    runs_dir: str = "runs"
    run_id: str = ""                    # "": a timestamp
    dry_run: bool = False
    # where a checkpoint goes when the run folder's disk is full (the weights are still in memory)
    checkpoint_fallback_dir: str = setting(tempfile.gettempdir())
    # how long ranks wait on each other (a collective, a barrier) before the survivors stop with a message
    dist_timeout_seconds: float = setting(120.0, bound=">0")
    # --- the layout (model/schedule.py): the crawler, or looped layers (the 1.0611 record, R1) ---
    use_crawler: int = setting(1, choices=(0, 1))
    num_layers: int = setting(11, bound=">0")       # looped layers: physical blocks
    loop_start: int = setting(3, bound=">=0")       # ... LOOP_START..LOOP_END run NUM_LOOPS+1 times
    loop_end: int = setting(5, bound=">=0")
    num_loops: int = setting(2, bound=">=0")
    # --- R1's model switches, for every layout (off: the Ouroboros entry) ---
    parallel_start_layer: int = setting(0, bound=">=0")  # decoder blocks of physical index >= this: two lanes
    parallel_final_lane: str = setting("mean", choices=("mean", "attn", "mlp"))
    skip_gates_enabled: bool = setting(False)        # skips merge by lerp with sigmoid gates, not by adding
    smear_gate_enabled: bool = setting(False)        # R1's input-dependent, BOS-masked SmearGate before the norm
    static_smear_enabled: bool = setting(True)       # the seed's per-channel SmearGate after the norm
    gate_window: int = setting(12, bound=">0")       # leading dims fed to the SmearGate and the attention gate
    sparse_attn_gate_enabled: bool = setting(False)  # per-head gate on the attention output, after XSA
    sparse_attn_gate_scale: float = setting(1.0, bound=">0")
    sparse_attn_gate_init_std: float = setting(0.0, bound=">=0")  # 0: zero init
    # --- switches of the original or of R1 for features this project does not have ---
    num_crawler_layers: int = setting(1, fixed=True)
    skip_ema: int = setting(1, fixed=True)
    crawler_tap_dim: int = setting(0, fixed=True)
    anchor_dim: int = setting(0, fixed=True)
    crawler_mlp_choke_dim: int = setting(0, fixed=True)
    tie_embeddings: int = setting(1, fixed=True)
    rope_yarn: int = setting(0, fixed=True)
    attn_out_gate_enabled: int = setting(0, fixed=True)
    gated_attn_enabled: int = setting(0, fixed=True)

    # ---- derived values ----
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def num_encoder_layers(self) -> int:
        return self.num_flat_layers // 2

    @property
    def num_decoder_layers(self) -> int:
        return self.num_flat_layers - self.num_encoder_layers

    @property
    def flat_rope_base(self) -> float:
        """The original's NTK quirk: base grows when training longer than 1024 tokens, fixed for eval too."""
        if self.train_seq_len <= 1024:
            return self.rope_base
        return self.rope_base * (self.train_seq_len / 1024) ** (self.rope_dims / (self.rope_dims - 2))

    def env_dict(self) -> dict:
        """The resolved values under their environment-variable names (for logs and run folders)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name.upper()] = ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else v
        if self.gptq_reserve_seconds < 0:
            out["GPTQ_RESERVE_SECONDS"] = "auto"
        return out

    def to_dict(self) -> dict:
        """Plain values, for checkpoints and summary.json; `Config.from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """Inverse of to_dict; a dict stored before QUANT_METHOD (skip_gptq, loop_aware_gptq) loads too, and a field
        stored before it existed takes its default (rope_inv_freq_bf16, micro_batch_grads: what ran then)."""
        values = dict(values)
        legacy = {k: values.pop(k) for k in _LEGACY_QUANT if k in values}
        if legacy:
            method = _legacy_quant_method(legacy.get("skip_gptq", False), legacy.get("loop_aware_gptq", True))
            stored = values.setdefault("quant_method", method)
            if stored != method:
                raise ConfigError(f"QUANT_METHOD={stored!r} contradicts the stored "
                                  f"{', '.join(f'{k}={v!r}' for k, v in legacy.items())} (which mean {method!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown configuration fields {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return _validated(cls(**values))

    def replace(self, **changes) -> "Config":
        return _validated(dataclasses.replace(self, **changes))


# What each preset changes from the defaults (a test keeps every entry different from its default).
PRESETS: dict[str, dict] = {
    # The seed's reproduce command, every knob live, on FineWeb: the defaults.
    "ouroboros": {},
    # The original exactly as it ran: its dead knobs dead (relu^2, XSA on the crawler only, no INST, no SWA),
    # its bf16-rounded crawler RoPE frequencies and its summed micro-batch gradients.
    "ouroboros-as-run": dict(inst_dim=0, xsa_blocks="crawler", swa_every=0, mlp_leaky_slope=0.0,
                             crawler_mlp_leaky_slope=0.0, rope_inv_freq_bf16=True, micro_batch_grads="sum",
                             gptq_block_size=64, gptq_damping=0.002, gptq_order="ascending", gptq_inverse="plain"),
    # The CPU default: trains on the embedded corpus in under 3 minutes on 2 idle cores (~0.38 s/step), fp32:
    # 400 steps of 2,048 tokens, the last third as warmdown. Unigram val_bpb on this corpus is 3.221; the
    # bar (25% lower) is 2.416. Measured (idle 2 cores): 138 s of training, val_bpb 2.432 / 2.258 / 2.179 at
    # steps 100 / 200 / 300, 2.004 sliding at the end (38% below the unigram); 200 steps would end at 2.141.
    # The 1.0611 record (R1; MODEL.md states it) as it ran: 11 blocks with 3..5 looped three times,
    # two-lane decoder from block 8, gated skips, R1's SmearGate and attention gate; 35,945,671 parameters.
    # (NUM_LAYERS, LOOP_START, LOOP_END and NUM_LOOPS default to R1's 11, 3, 5 and 2.)
    "frontier": dict(vocab_size=8192, use_crawler=0, mlp_mult=4.0, qk_gain_init=5.0, rope_inv_freq_bf16=True, bigram_vocab_size=0, inst_dim=0,
                     parallel_start_layer=8, skip_gates_enabled=True, smear_gate_enabled=True,
                     static_smear_enabled=False, sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5,
                     caseops_enabled=True, eval_mode="doc",
                     # R1's training as seed 42 ran it (TRAIN.md 7); calibration inside the 600 s (auto reserve)
                     seed=42, train_loader="packed", muon_row_normalize=True, muon_ns="polar", matrix_lr=0.026,
                     tied_embed_lr=0.03, scalar_lr=0.02, muon_momentum=0.97, muon_weight_decay=0.095,
                     embed_weight_decay=0.085, adam_weight_decay=0.02, beta2=0.99, warmdown_frac=0.85, min_lr=0.1,
                     enable_looping_at=0.35, ema_decay=0.9965, swa_every=0, grad_clip_mode="local",
                     val_loss_every=0, train_log_every=500, gptq_cal_loader="shuffled", gptq_cal_samples=768,
                     # R1's quantizer and container (QUANT.md): SDClip GPTQ, int7 embedding, int8 gate rows, LQER
                     quant_method="frontier", embed_clip_sigmas=14.0, mlp_clip_sigmas=11.5, gated_attn_quant_gate=True,
                     compressor="pergroup",
                     # its reported score: phased LoRA TTT (DATA_EVAL.md 4; R1's run values are the TTT defaults)
                     ttt_enabled=True),
    # Every frontier switch (model, data, training) at CPU size on the embedded corpus as CaseOps text (`python -m train.prepare --variant
    # sp8192_caseops`): 6 blocks, 2..3 looped, two-lane from block 4; head dim 64 and GQA 2:1 as R1 (the
    # Triton attention kernel takes head dims 64 and 128); scored document-isolated from the byte sidecars. R1's
    # training by step (frac = step / ITERATIONS): the loop switches on at step 140; the EMA's horizon (~100 steps) fits.
    "frontier-tiny": dict(seed=1337, use_crawler=0, num_layers=6, loop_start=2, loop_end=3,
                          model_dim=128, num_heads=2, num_kv_heads=1, mlp_mult=4.0, qk_gain_init=5.0,
                          rope_inv_freq_bf16=True, bigram_vocab_size=0, inst_dim=0, parallel_start_layer=4,
                          skip_gates_enabled=True, smear_gate_enabled=True, static_smear_enabled=False,
                          sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5, quant_method="frontier",
                          train_seq_len=256, train_batch_tokens=8 * 256, grad_accum_steps=1, iterations=400,
                          max_wallclock_seconds=0.0, warmdown_iters=130, warmup_steps=0, val_loss_every=100,
                          train_log_every=25, swa_every=0, muon_momentum_warmup_steps=100, compile_fullgraph=False,
                          eval_seq_len=256, eval_batch_seqs=64, gptq_cal_samples=32, gptq_cal_seq_len=256,
                          quant_small_numel=4096, vocab_size=8192, caseops_enabled=True, eval_mode="doc",
                          train_loader="packed", muon_row_normalize=True, muon_ns="polar", matrix_lr=0.026,
                          tied_embed_lr=0.03, scalar_lr=0.02, muon_momentum=0.97, muon_weight_decay=0.095,
                          embed_weight_decay=0.085, adam_weight_decay=0.02, beta2=0.99, warmdown_frac=0.85,
                          min_lr=0.1, enable_looping_at=0.35, ema_decay=0.99, grad_clip_mode="local",
                          gptq_cal_loader="shuffled", embed_clip_sigmas=14.0, mlp_clip_sigmas=11.5,
                          gated_attn_quant_gate=True, compressor="pergroup",
                          # TTT at CPU size: chunks of 128 in windows of 256 (R1's 48 take 2x the time), rank 8 at
                          # R1's alpha/rank, a larger lr for a model this short-trained. Measured on a 100-step
                          # artifact, 2 idle cores: 34 s for the 113 val documents, val_bpb 1.983 vs 2.077 scored
                          # document-isolated (chunks of 48: 71 s, 1.966)
                          ttt_enabled=True, ttt_lora_rank=8, ttt_lora_alpha=14.4, ttt_lora_lr=1e-3, ttt_chunk_size=128,
                          ttt_eval_seq_len=256, ttt_batch_size=16, phased_ttt_prefix_docs=60,
                          global_ttt_chunk_tokens=2048,
                          data_path="data/datasets/embedded_sp8192_caseops",
                          tokenizer_path="data/tokenizers/embedded_8192_bpe_caseops.model"),
    "tiny": dict(seed=1337, model_dim=128, num_heads=2, num_kv_heads=1, bigram_dim=64, inst_dim=16, train_seq_len=256,
                 train_batch_tokens=8 * 256, grad_accum_steps=1, iterations=400, max_wallclock_seconds=0.0,
                 warmdown_iters=130, warmup_steps=0, val_loss_every=100, train_log_every=25, swa_every=10,
                 muon_momentum_warmup_steps=100, compile_fullgraph=False,
                 eval_seq_len=256, eval_batch_seqs=64,
                 gptq_cal_samples=32, gptq_cal_seq_len=256, quant_small_numel=4096,
                 data_path="data/datasets/embedded_sp1024", tokenizer_path="data/tokenizers/embedded_1024_bpe.model"),
    # The crawler schedule of `ouroboros` (9 flat blocks in a U-Net around one shared block looped twice from
    # the first step, BigramHash, its SmearGate, XSA, the per-loop instruction) on the frontier's stack, each
    # value as `frontier` has it: R1's data (sp8192 CaseOps, scored document-isolated from the byte sidecars),
    # R1's training (packed rows, Polar-Express MuonEq-R, its LRs, decays and LR floor, EMA instead of SWA,
    # the clip per rank, shuffled calibration rows), R1's quantizer and container (SDClip GPTQ, int7
    # embedding, int8 gate rows, LQER, per-group coding) and the sparse attention-output gate. R1's other model
    # switches (gated skips, its SmearGate, two-lane blocks, the late recurrence) stay off: arms to try. Scored,
    # as frontier is, by phased LoRA TTT.
    "ouroboros-frontier": dict(vocab_size=8192, caseops_enabled=True, eval_mode="doc",
                               sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5,
                               train_loader="packed", muon_row_normalize=True, muon_ns="polar", matrix_lr=0.026,
                               tied_embed_lr=0.03, scalar_lr=0.02, muon_momentum=0.97, muon_weight_decay=0.095,
                               embed_weight_decay=0.085, adam_weight_decay=0.02, beta2=0.99, warmdown_frac=0.85,
                               min_lr=0.1, ema_decay=0.9965, swa_every=0, grad_clip_mode="local",
                               val_loss_every=0, train_log_every=500, gptq_cal_loader="shuffled",
                               gptq_cal_samples=768, quant_method="frontier", embed_clip_sigmas=14.0,
                               mlp_clip_sigmas=11.5, gated_attn_quant_gate=True, compressor="pergroup",
                               ttt_enabled=True),
    # `tiny`'s crawler model at CPU size with `frontier-tiny`'s stack (its EMA horizon, its data: `python -m
    # train.prepare --variant sp8192_caseops`).
    "ouroboros-frontier-tiny": dict(seed=1337, model_dim=128, num_heads=2, num_kv_heads=1, bigram_dim=64, inst_dim=16,
                                    train_seq_len=256, train_batch_tokens=8 * 256, grad_accum_steps=1,
                                    iterations=400, max_wallclock_seconds=0.0, warmdown_iters=130, warmup_steps=0,
                                    val_loss_every=100, train_log_every=25, muon_momentum_warmup_steps=100,
                                    compile_fullgraph=False, eval_seq_len=256, eval_batch_seqs=64,
                                    gptq_cal_samples=32, gptq_cal_seq_len=256, quant_small_numel=4096,
                                    vocab_size=8192, caseops_enabled=True, eval_mode="doc",
                                    sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5,
                                    train_loader="packed", muon_row_normalize=True, muon_ns="polar",
                                    matrix_lr=0.026, tied_embed_lr=0.03, scalar_lr=0.02, muon_momentum=0.97,
                                    muon_weight_decay=0.095, embed_weight_decay=0.085, adam_weight_decay=0.02,
                                    beta2=0.99, warmdown_frac=0.85, min_lr=0.1, ema_decay=0.99, swa_every=0,
                                    grad_clip_mode="local", gptq_cal_loader="shuffled", quant_method="frontier",
                                    embed_clip_sigmas=14.0, mlp_clip_sigmas=11.5, gated_attn_quant_gate=True,
                                    compressor="pergroup", ttt_enabled=True, ttt_lora_rank=8, ttt_lora_alpha=14.4,
                                    ttt_lora_lr=1e-3, ttt_chunk_size=128, ttt_eval_seq_len=256, ttt_batch_size=16,
                                    phased_ttt_prefix_docs=60, global_ttt_chunk_tokens=2048,
                                    data_path="data/datasets/embedded_sp8192_caseops",
                                    tokenizer_path="data/tokenizers/embedded_8192_bpe_caseops.model"),
}

# Accepted only at these values (the original's switches for features this project does not have).
FIXED = {f.name: f.default for f in fields(Config) if f.metadata.get("fixed")}

# The seed's two quantization switches, read only to set quant_method.
_LEGACY_QUANT = ("skip_gptq", "loop_aware_gptq")


def _legacy_quant_method(skip: bool | None, loop_aware: bool | None) -> str | None:
    """The method the seed's SKIP_GPTQ / LOOP_AWARE_GPTQ select (an unset one at the seed's default: 0 / 1).
    None when only SKIP_GPTQ=0 is given: any GPTQ method fits."""
    if skip:
        return "rtn"
    if loop_aware is None:
        return None
    return "loop_aware" if loop_aware else "gptq"


def _parse(name: str, kind, text: str):
    env = name.upper()
    text = text.strip()
    if name == "gptq_reserve_seconds" and text.lower() == "auto":
        return -1.0
    try:
        if kind is bool:
            return parse_flag(env, text)
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
        if kind is tuple:
            values = tuple(float(x) for x in text.split(",") if x.strip())
            if not values or not all(math.isfinite(v) for v in values):
                raise ValueError
            return values
        return text
    except ValueError:
        expected = {bool: "1/0, true/false, yes/no or on/off", int: "an integer", float: "a finite number",
                    tuple: "comma-separated numbers"}.get(kind, "a string")
        raise ConfigError(f"{env}={text!r}: expected {expected}") from None


def _validated(cfg: Config) -> Config:
    def bad(name, why):
        raise ConfigError(f"{name.upper()}={getattr(cfg, name)!r}: {why}")

    if cfg.preset not in PRESETS:
        bad("preset", f"must be one of {', '.join(repr(c) for c in PRESETS)}")
    for f in fields(cfg):
        value, check = getattr(cfg, f.name), f.metadata
        if check.get("fixed") and value != f.default:
            bad(f.name, f"only {f.default} is supported (this project does not implement that feature of the original)")
        if check.get("choices") and value not in check["choices"]:
            bad(f.name, f"must be one of {', '.join(repr(c) for c in check['choices'])}")
        if check.get("bound") == ">0" and not value > 0:
            bad(f.name, "must be > 0")
        if check.get("bound") == ">=0" and value < 0:
            bad(f.name, "must be >= 0")
    if cfg.model_dim % cfg.num_heads:
        bad("model_dim", f"must be divisible by NUM_HEADS={cfg.num_heads}")
    if cfg.num_heads % cfg.num_kv_heads:
        bad("num_heads", f"must be a multiple of NUM_KV_HEADS={cfg.num_kv_heads}")
    if cfg.rope_dims % 2 or cfg.rope_dims > cfg.head_dim:
        bad("rope_dims", f"must be even and at most the head dim {cfg.head_dim}")
    if cfg.rope_dims == 2 and cfg.train_seq_len > 1024:
        bad("rope_dims", "must be > 2 for the NTK base rule at TRAIN_SEQ_LEN > 1024")
    if len(cfg.crawler_loop_rope_scales) < cfg.crawler_loops:
        bad("crawler_loop_rope_scales", f"needs at least CRAWLER_LOOPS={cfg.crawler_loops} values")
    if any(s <= 0 for s in cfg.crawler_loop_rope_scales):
        bad("crawler_loop_rope_scales", "every scale must be > 0")
    if not 0.0 <= cfg.muon_momentum_warmup_start <= 1.0 or not 0.0 <= cfg.muon_momentum < 1.0:
        bad("muon_momentum", "momenta must lie in [0, 1)")
    if cfg.eval_stride > cfg.eval_seq_len:
        bad("eval_stride", f"must be at most EVAL_SEQ_LEN={cfg.eval_seq_len}")
    if cfg.bigram_vocab_size == 1:
        bad("bigram_vocab_size", "must be 0 (off) or at least 2 (the last bucket is reserved)")
    if not cfg.use_crawler:
        if cfg.inst_dim:
            bad("inst_dim", "the per-loop instruction is the crawler's: set INST_DIM=0 with USE_CRAWLER=0")
        if cfg.xsa_blocks:
            bad("xsa_blocks", "names the crawler: leave it empty with USE_CRAWLER=0")
        if not cfg.loop_start <= cfg.loop_end < cfg.num_layers:
            bad("loop_end", f"needs LOOP_START={cfg.loop_start} <= LOOP_END < NUM_LAYERS={cfg.num_layers}")
    if (cfg.smear_gate_enabled or cfg.sparse_attn_gate_enabled) and cfg.gate_window > cfg.model_dim:
        bad("gate_window", f"must be at most MODEL_DIM={cfg.model_dim}")
    for name in ("warmdown_frac", "min_lr", "enable_looping_at"):
        if getattr(cfg, name) > 1:
            bad(name, "is a fraction: must lie in [0, 1]")
    if cfg.ema_decay >= 1:
        bad("ema_decay", "must lie in [0, 1) (0: no EMA)")
    if cfg.ema_decay > 0 and cfg.swa_every > 0:
        bad("ema_decay", f"cannot be on with SWA_EVERY={cfg.swa_every}: both would replace the final weights; set "
                         "SWA_EVERY=0 (R1 keeps no SWA) or EMA_DECAY=0")
    if cfg.gptq_reserve_seconds < 0 and cfg.gptq_reserve_seconds != -1:
        bad("gptq_reserve_seconds", "must be 'auto' (stored as -1) or a number of seconds >= 0")
    if cfg.quant_method == "frontier" and cfg.compressor != "pergroup":
        bad("compressor", "QUANT_METHOD=frontier stores int7, int8 gate rows and LQER factors, which only "
                          "COMPRESSOR=pergroup holds")
    if cfg.val_doc_fraction > 1:
        bad("val_doc_fraction", "is a fraction: must lie in (0, 1]")
    if not (cfg.ttt_beta1 < 1 and cfg.ttt_beta2 < 1 and cfg.global_ttt_momentum < 1):
        bad("ttt_beta1", "TTT_BETA1, TTT_BETA2 and GLOBAL_TTT_MOMENTUM must lie in [0, 1)")
    if cfg.ttt_eval_seq_len < cfg.ttt_chunk_size:
        bad("ttt_eval_seq_len", f"the window must hold a chunk: at least TTT_CHUNK_SIZE={cfg.ttt_chunk_size}")
    if cfg.global_ttt_chunk_tokens < cfg.ttt_eval_seq_len:
        bad("global_ttt_chunk_tokens", f"must hold at least one sequence of TTT_EVAL_SEQ_LEN={cfg.ttt_eval_seq_len}")
    if cfg.gptq_block_size > GPTQ_MAX_BLOCK:  # checked at start-up, not after training, in calibration
        bad("gptq_block_size", f"must be at most {GPTQ_MAX_BLOCK} (the Triton GPTQ kernel keeps a block's columns "
                               "in registers)")
    return cfg


def _field_kinds() -> dict:
    kinds = {}
    for f in fields(Config):
        ann = f.type if isinstance(f.type, str) else f.type.__name__
        kinds[f.name] = {"int": int, "float": float, "bool": bool, "tuple": tuple, "str": str}[ann]
    return kinds


# R1's names for three of the seed's variables (TRAIN.md 7): either name sets the field; both must agree.
ENV_ALIASES = {"muon_weight_decay": "MUON_WD", "adam_weight_decay": "ADAM_WD", "embed_weight_decay": "EMBED_WD"}


def _env_value(environ, name: str, kind):
    """The parsed value of variable NAME (or of its R1 alias), or None when it is unset or blank."""
    given = {}
    for env in (name.upper(), ENV_ALIASES.get(name)):
        text = environ.get(env) if env else None
        if text is not None and text.strip() != "":
            given[env] = _parse(env.lower(), kind, text)
    if len(set(given.values())) > 1:
        raise ConfigError(" and ".join(f"{k}={environ[k].strip()!r}" for k in given) + " disagree: they name the "
                          "same setting; set one")
    return next(iter(given.values()), None)


def _quant_method_from_env(environ, current: str) -> str:
    """QUANT_METHOD, or the method the seed's SKIP_GPTQ / LOOP_AWARE_GPTQ select; both given must agree."""
    method = _env_value(environ, "quant_method", str)
    skip, loop_aware = (_env_value(environ, name, bool) for name in _LEGACY_QUANT)
    if skip is None and loop_aware is None:
        return current if method is None else method
    legacy = _legacy_quant_method(skip, loop_aware)
    given = " ".join(f"{name.upper()}={int(v)}" for name, v in zip(_LEGACY_QUANT, (skip, loop_aware)) if v is not None)
    if method is not None:
        if legacy is None and method == "rtn" or legacy is not None and method != legacy:
            meaning = "a GPTQ method" if legacy is None else f"QUANT_METHOD={legacy}"
            raise ConfigError(f"QUANT_METHOD={method!r} contradicts {given} (which means {meaning})")
        return method
    if legacy is None:  # SKIP_GPTQ=0 alone: keep the preset's method unless it is round-to-nearest
        return current if current != "rtn" else "loop_aware"
    return legacy


def default_preset() -> tuple[str, str]:
    """(preset, why) when PRESET is not set."""
    import torch

    if torch.cuda.is_available():
        return "ouroboros", "CUDA is available"
    return "tiny", "no CUDA device: the CPU default"


def from_env(environ=None, **overrides) -> Config:
    """Resolve a Config: preset, then environment variables, then keyword overrides (for tests)."""
    environ = os.environ if environ is None else environ
    preset = overrides.pop("preset", None) or environ.get("PRESET", "").strip() or default_preset()[0]
    if preset not in PRESETS:
        raise ConfigError(f"PRESET={preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset], preset=preset)
    kinds = _field_kinds()
    for name, kind in kinds.items():
        if name in ("preset", "quant_method"):
            continue
        value = _env_value(environ, name, kind)
        if value is not None:
            values[name] = value
    values["quant_method"] = _quant_method_from_env(environ, values.get("quant_method", Config.quant_method))
    for name, value in overrides.items():
        if name not in kinds:
            raise ConfigError(f"unknown configuration field {name!r}")
        values[name] = tuple(value) if kinds[name] is tuple else value
    # Paths nobody set follow the data the vocabulary and CASEOPS_ENABLED name (python -m train.download).
    variant = variant_for(values.get("vocab_size", Config.vocab_size), values.get("caseops_enabled", False))
    if variant is not None:
        root = values.get("data_dir", Config.data_dir)
        values.setdefault("data_path", str(VARIANTS[variant].data_path(root)))
        values.setdefault("tokenizer_path", str(VARIANTS[variant].tokenizer_path(root)))
    return _validated(Config(**values))


# ---- environment variables that are not settings ----

# Variables read outside Config: the preset, the seed's quantization pair, the kernel switches (kernels/),
# STRICT_ENV itself, the run's distributed timeout and checkpoint fallback (train/trainer.py), and what
# torchrun sets for each rank. With the Config fields these are every name a run reads.
OTHER_VARIABLES = ("PRESET", *(name.upper() for name in _LEGACY_QUANT), "KERNELS", "KERNELS_STRICT", "STRICT_ENV",
                   "DIST_TIMEOUT_SECONDS", "CHECKPOINT_FALLBACK_DIR",
                   "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                   "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                   "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_ELASTIC_WORKER_IDENTICAL")
OTHER_PREFIXES = ("TORCHELASTIC_",)  # torchrun's agent sets a family of these
KNOWN_VARIABLES = (frozenset(f.name.upper() for f in fields(Config)) | frozenset(OTHER_VARIABLES)
                   | frozenset(ENV_ALIASES.values()))
# Similarity (difflib ratio) from which an unknown name is taken for a typo of a known one: MODEL_DIMS and
# MODELDIM are ~0.95 from MODEL_DIM, while PATH is 0.62 from DATA_PATH and HOME, CUDA_*, OMP_* are further.
TYPO_SIMILARITY = 0.8


def misspelled_variables(environ=None) -> list[tuple[str, str]]:
    """(name, the known name it resembles) for each environment variable that looks like a typo of one of
    ours (KNOWN_VARIABLES): close to a known name but not equal to it, a lower-case one included."""
    import difflib

    environ = os.environ if environ is None else environ
    known = sorted(KNOWN_VARIABLES)
    found = []
    for name in sorted(environ):
        if name in KNOWN_VARIABLES or name.startswith(OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=TYPO_SIMILARITY)
        if close:
            found.append((name, close[0]))
    return found


def check_variable_names(environ=None) -> list[str]:
    """One warning line per misspelled variable ("MODEL_DIMS is not a setting; did you mean MODEL_DIM?");
    with STRICT_ENV=1 the first one raises ConfigError instead."""
    environ = os.environ if environ is None else environ
    strict = _env_value(environ, "strict_env", bool)
    lines = [f"{name} is not a setting; did you mean {known}?" for name, known in misspelled_variables(environ)]
    if lines and strict:
        raise ConfigError(lines[0] + " (STRICT_ENV=1 makes this an error)")
    return lines
