"""model/config.py: presets resolve (to the values they had before presets listed only their changes), the
seed's reproduce command is accepted as pasted, bad values stop at start-up with the variable named, the
original's fixed-only switches reject other values, and SKIP_GPTQ / LOOP_AWARE_GPTQ map to QUANT_METHOD."""
import dataclasses
import shlex
import tempfile

import pytest
import torch

import kernels.gptq
from model.config import FIXED, PRESETS, QUANT_METHODS, Config, ConfigError, from_env

# SPEC 3, "The seed's reproduce command", as users paste it.
REPRODUCE_COMMAND = """
SEED=444 MAX_WALLCLOCK_SECONDS=600 WARMDOWN_ITERS=2000 NUM_FLAT_LAYERS=9 NUM_CRAWLER_LAYERS=1
CRAWLER_LOOPS=2 USE_CRAWLER=1 COMPILE_FULLGRAPH=1 SKIP_GPTQ=0 LOOP_AWARE_GPTQ=1 QK_GAIN_INIT=4.0
GPTQ_CAL_SAMPLES=128 GPTQ_CAL_SEQ_LEN=2048 CRAWLER_LOOP_ROPE_SCALES=9,1,1 SKIP_EMA=1 MODEL_DIM=512
INST_DIM=32 CRAWLER_MLP_MULT=6.0 CRAWLER_TAP_DIM=0 ANCHOR_DIM=0 CRAWLER_MLP_CHOKE_DIM=0 XSA_LAST_N=11
BIGRAM_VOCAB_SIZE=2048 ROPE_DIMS=16 SWA_EVERY=50 MATRIX_LR=0.03 MLP_LEAKY_SLOPE=0.5
CRAWLER_MLP_LEAKY_SLOPE=0.5 torchrun --standalone --nproc_per_node=8 <script>
"""
REPRODUCE_ENV = dict(w.split("=", 1) for w in shlex.split(REPRODUCE_COMMAND.split("torchrun")[0]))

# Live variables, each with another valid value and the field value it must produce.
LIVE = {"SEED": ("7", "seed", 7), "MAX_WALLCLOCK_SECONDS": ("300", "max_wallclock_seconds", 300.0),
        "WARMDOWN_ITERS": ("100", "warmdown_iters", 100), "NUM_FLAT_LAYERS": ("5", "num_flat_layers", 5),
        "CRAWLER_LOOPS": ("3", "crawler_loops", 3), "QK_GAIN_INIT": ("1.5", "qk_gain_init", 1.5),
        "GPTQ_CAL_SAMPLES": ("16", "gptq_cal_samples", 16), "GPTQ_CAL_SEQ_LEN": ("512", "gptq_cal_seq_len", 512),
        "CRAWLER_LOOP_ROPE_SCALES": ("4,2", "crawler_loop_rope_scales", (4.0, 2.0)),
        "MODEL_DIM": ("256", "model_dim", 256), "INST_DIM": ("0", "inst_dim", 0),
        "CRAWLER_MLP_MULT": ("4", "crawler_mlp_mult", 4.0), "XSA_LAST_N": ("3", "xsa_last_n", 3),
        "BIGRAM_VOCAB_SIZE": ("4096", "bigram_vocab_size", 4096), "ROPE_DIMS": ("32", "rope_dims", 32),
        "SWA_EVERY": ("0", "swa_every", 0), "MATRIX_LR": ("0.02", "matrix_lr", 0.02),
        "MLP_LEAKY_SLOPE": ("0", "mlp_leaky_slope", 0.0), "CRAWLER_MLP_LEAKY_SLOPE": ("0.25", "crawler_mlp_leaky_slope", 0.25),
        "SKIP_GPTQ": ("1", "quant_method", "rtn"), "LOOP_AWARE_GPTQ": ("0", "quant_method", "gptq"),
        "COMPILE_FULLGRAPH": ("0", "compile_fullgraph", False), "USE_CRAWLER": ("0", "use_crawler", 0)}
# What a live variable's other value needs beside it: looped layers have no per-loop instruction.
LIVE_NEEDS = {"USE_CRAWLER": {"INST_DIM": "0"}}
FIXED_ENV = {"NUM_CRAWLER_LAYERS": "2", "SKIP_EMA": "0", "CRAWLER_TAP_DIM": "32",
             "ANCHOR_DIM": "16", "CRAWLER_MLP_CHOKE_DIM": "128"}


# Config.to_dict() of the `ouroboros` preset as commit cc7cd17 (before presets listed only their changes and
# before QUANT_METHOD) wrote it into checkpoints, artifacts and config.json.
STORED_OUROBOROS = {
    'preset': 'ouroboros', 'vocab_size': 1024, 'model_dim': 512, 'num_heads': 8, 'num_kv_heads': 4,
    'num_flat_layers': 9, 'crawler_loops': 2, 'crawler_loop_rope_scales': (9.0, 1.0, 1.0), 'mlp_mult': 3.0,
    'crawler_mlp_mult': 6.0, 'mlp_leaky_slope': 0.5, 'crawler_mlp_leaky_slope': 0.5, 'qk_gain_init': 4.0,
    'xsa_last_n': 11, 'xsa_blocks': '', 'inst_dim': 32, 'bigram_vocab_size': 2048, 'bigram_dim': 128,
    'rope_dims': 16, 'rope_base': 10000.0, 'logit_softcap': 30.0, 'tied_embed_init_std': 0.005,
    'train_seq_len': 2048, 'seed': 444, 'iterations': 20000, 'max_wallclock_seconds': 600.0,
    'warmdown_iters': 2000, 'warmup_steps': 20, 'train_batch_tokens': 786432, 'grad_accum_steps': 0,
    'val_loss_every': 1000, 'train_log_every': 200, 'matrix_lr': 0.03, 'tied_embed_lr': 0.035, 'scalar_lr': 0.025,
    'muon_momentum': 0.99, 'muon_momentum_warmup_start': 0.92, 'muon_momentum_warmup_steps': 1500,
    'muon_backend_steps': 5, 'muon_weight_decay': 0.04, 'adam_weight_decay': 0.04, 'beta1': 0.9, 'beta2': 0.95,
    'adam_eps': 1e-08, 'grad_clip_norm': 0.3, 'swa_every': 50, 'compile_fullgraph': True, 'eval_seq_len': 2048,
    'eval_stride': 64, 'eval_batch_seqs': 32, 'skip_gptq': False, 'loop_aware_gptq': True, 'gptq_cal_samples': 128,
    'gptq_cal_seq_len': 2048, 'gptq_reserve_seconds': -1.0, 'gptq_block_size': 128, 'gptq_damping': 0.01,
    'gptq_order': 'descending', 'gptq_inverse': 'cholesky', 'quant_small_numel': 65536,
    'data_path': 'data/datasets/fineweb10B_sp1024', 'tokenizer_path': 'data/tokenizers/fineweb_1024_bpe.model',
    'runs_dir': 'runs', 'run_id': '', 'dry_run': False, 'use_crawler': 1, 'num_crawler_layers': 1, 'skip_ema': 1,
    'crawler_tap_dim': 0, 'anchor_dim': 0, 'crawler_mlp_choke_dim': 0,
}
# Fields added since cc7cd17, all run control (no model, training or quantization value), at their defaults.
ADDED_SINCE = {"checkpoint_fallback_dir": tempfile.gettempdir(), "dist_timeout_seconds": 120.0}
# The other presets as cc7cd17 resolved them: what each differed in from its `ouroboros`.
STORED = {
    "ouroboros": STORED_OUROBOROS,
    "ouroboros-as-run": dict(STORED_OUROBOROS, preset="ouroboros-as-run", mlp_leaky_slope=0.0,
                             crawler_mlp_leaky_slope=0.0, xsa_blocks="crawler", inst_dim=0, swa_every=0,
                             gptq_block_size=64, gptq_damping=0.002, gptq_order="ascending", gptq_inverse="plain"),
    "tiny": dict(STORED_OUROBOROS, preset="tiny", model_dim=128, num_heads=2, num_kv_heads=1, inst_dim=16,
                 bigram_dim=64, train_seq_len=256, seed=1337, iterations=400, max_wallclock_seconds=0.0,
                 warmdown_iters=130, warmup_steps=0, train_batch_tokens=2048, grad_accum_steps=1,
                 val_loss_every=100, train_log_every=25, muon_momentum_warmup_steps=100, swa_every=10,
                 compile_fullgraph=False, eval_seq_len=256, eval_batch_seqs=64, gptq_cal_samples=32,
                 gptq_cal_seq_len=256, quant_small_numel=4096, data_path="data/datasets/embedded_sp1024",
                 tokenizer_path="data/tokenizers/embedded_1024_bpe.model"),
}

# Fields added since, as a config stored without them loads (their defaults: what ran before they existed),
# and what `ouroboros-as-run` sets them to now.
# R1's model switches and the looped layout (issue 20), off: what every stored config ran.
ADDED_LAYOUT = {"ln_scale": True, "num_layers": 11, "loop_start": 3, "loop_end": 5, "num_loops": 2,
                "parallel_start_layer": 0, "parallel_final_lane": "mean", "skip_gates_enabled": False,
                "smear_gate_enabled": False, "static_smear_enabled": True, "gate_window": 12,
                "sparse_attn_gate_enabled": False, "sparse_attn_gate_scale": 1.0, "sparse_attn_gate_init_std": 0.0,
                "tie_embeddings": 1, "rope_yarn": 0, "attn_out_gate_enabled": 0, "gated_attn_enabled": 0,
                "eval_mode": "sliding", "caseops_enabled": False}
# R1's training switches (issue 22), off: what every stored config ran.
ADDED_TRAINING = {"train_loader": "stream", "muon_row_normalize": False, "muon_ns": "quintic",
                  "embed_weight_decay": -1.0, "warmdown_frac": 0.0, "min_lr": 0.0, "enable_looping_at": 0.0,
                  "ema_decay": 0.0, "grad_clip_mode": "global", "gptq_cal_loader": "stream", "data_dir": "data"}
# R1's quantization switches (issue 23), at their defaults: unread by the crawler presets' methods.
ADDED_QUANT = {"matrix_bits": 6, "embed_bits": 7, "matrix_clip_sigmas": 12.85, "mlp_clip_sigmas": 10.0,
               "attn_clip_sigmas": 13.0, "embed_clip_sigmas": 20.0, "gated_attn_quant_gate": False,
               "lqer_enabled": True, "lqer_rank": 4, "lqer_top_k": 3, "lqer_factor_bits": 4,
               "lqer_asym_enabled": True, "lqer_asym_group": 64, "compressor": "ouroptz",
               "pergroup_coder": "auto"}
# Test-time training at evaluation (issue 24), off; its settings at R1's run values.
ADDED_TTT = {"ttt_enabled": False, "ttt_lora_rank": 80, "ttt_lora_alpha": 144.0, "ttt_warm_start_a": True,
             "ttt_lora_lr": 1e-4, "ttt_chunk_size": 48, "ttt_eval_seq_len": 2048, "ttt_batch_size": 64,
             "ttt_grad_steps": 1, "ttt_weight_decay": 0.5, "ttt_beta1": 0.0, "ttt_beta2": 0.99, "ttt_k_lora": True,
             "ttt_o_lora": True, "ttt_mlp_lora": True, "ttt_optimizer": "adam", "ttt_schedule": "dynamic",
             "ttt_static_lanes": 8, "ttt_compile": True, "phased_ttt_prefix_docs": 2500, "phased_ttt_num_phases": 3,
             "global_ttt_lr": 1e-3, "global_ttt_momentum": 0.9, "global_ttt_epochs": 1,
             "global_ttt_chunk_tokens": 32768, "global_ttt_batch_seqs": 32, "global_ttt_grad_clip": 1.0,
             "global_ttt_warmup_chunks": 0, "global_ttt_respect_doc_boundaries": True, "val_doc_fraction": 1.0}
ADDED_LAYOUT.update(ADDED_TRAINING, **ADDED_QUANT, **ADDED_TTT)
ADDED = {"rope_inv_freq_bf16": False, "micro_batch_grads": "mean", **ADDED_LAYOUT}
ADDED_AS_RUN = {"rope_inv_freq_bf16": True, "micro_batch_grads": "sum", **ADDED_LAYOUT}


@pytest.mark.parametrize("preset", sorted(STORED))
def test_presets_resolve_to_the_values_they_had(preset):
    want = {k: v for k, v in STORED[preset].items() if k not in ("skip_gptq", "loop_aware_gptq")}
    want["quant_method"] = "loop_aware"  # SKIP_GPTQ=0 LOOP_AWARE_GPTQ=1
    want.update(ADDED_AS_RUN if preset == "ouroboros-as-run" else ADDED)
    want.update(ADDED_SINCE)
    got = from_env({}, preset=preset).to_dict()
    assert set(got) == set(want)
    assert {k: got[k] for k in got if got[k] != want[k]} == {}, preset  # field by field


@pytest.mark.parametrize("preset", sorted(STORED))
def test_configs_stored_before_quant_method_still_load(preset):
    """Checkpoints and artifacts keep skip_gptq / loop_aware_gptq in their stored config (JSON: lists)."""
    stored = {k: list(v) if isinstance(v, tuple) else v for k, v in STORED[preset].items()}
    assert Config.from_dict(stored) == from_env({}, preset=preset).replace(**ADDED)
    for skip, loop_aware, method in [(True, True, "rtn"), (True, False, "rtn"), (False, False, "gptq"),
                                     (False, True, "loop_aware")]:
        cfg = Config.from_dict(dict(stored, skip_gptq=skip, loop_aware_gptq=loop_aware))
        assert cfg.quant_method == method
    with pytest.raises(ConfigError, match=r"QUANT_METHOD='gptq' contradicts the stored skip_gptq=True"):
        Config.from_dict(dict(stored, skip_gptq=True, quant_method="gptq"))


def test_presets_hold_only_what_differs_from_the_defaults():
    defaults = Config()
    assert PRESETS["ouroboros"] == {}  # the defaults are the seed's reproduce command
    for name, values in PRESETS.items():
        same = [k for k, v in values.items() if getattr(defaults, k) == v]
        assert not same, f"preset {name} repeats defaults {same}"


@pytest.mark.parametrize("env, method", [
    ({}, "loop_aware"),
    ({"SKIP_GPTQ": "1"}, "rtn"), ({"SKIP_GPTQ": "1", "LOOP_AWARE_GPTQ": "1"}, "rtn"),
    ({"SKIP_GPTQ": "0", "LOOP_AWARE_GPTQ": "1"}, "loop_aware"), ({"SKIP_GPTQ": "0"}, "loop_aware"),
    ({"LOOP_AWARE_GPTQ": "0"}, "gptq"), ({"SKIP_GPTQ": "0", "LOOP_AWARE_GPTQ": "0"}, "gptq"),
    ({"QUANT_METHOD": "rtn"}, "rtn"), ({"QUANT_METHOD": "gptq"}, "gptq"),
    ({"QUANT_METHOD": "gptq", "SKIP_GPTQ": "0"}, "gptq"), ({"QUANT_METHOD": "gptq", "LOOP_AWARE_GPTQ": "0"}, "gptq"),
    ({"QUANT_METHOD": "rtn", "SKIP_GPTQ": "1"}, "rtn"), ({"SKIP_GPTQ": " "}, "loop_aware"),
])
def test_quant_method_from_the_seeds_switches(env, method):
    assert from_env(dict(env, PRESET="tiny")).quant_method == method


def test_skip_gptq_alone_keeps_a_gptq_method():
    assert from_env({"SKIP_GPTQ": "0"}, preset="tiny", quant_method="gptq").quant_method == "gptq"  # override last
    assert from_env({"SKIP_GPTQ": "0", "QUANT_METHOD": "gptq"}, preset="tiny").quant_method == "gptq"


@pytest.mark.parametrize("env, pattern", [
    ({"QUANT_METHOD": "gptq", "SKIP_GPTQ": "1"},
     r"^QUANT_METHOD='gptq' contradicts SKIP_GPTQ=1 \(which means QUANT_METHOD=rtn\)"),
    ({"QUANT_METHOD": "rtn", "SKIP_GPTQ": "0"}, r"^QUANT_METHOD='rtn' contradicts SKIP_GPTQ=0"),
    ({"QUANT_METHOD": "gptq", "SKIP_GPTQ": "0", "LOOP_AWARE_GPTQ": "1"},
     r"^QUANT_METHOD='gptq' contradicts SKIP_GPTQ=0 LOOP_AWARE_GPTQ=1 \(which means QUANT_METHOD=loop_aware\)"),
    ({"QUANT_METHOD": "loop_aware", "LOOP_AWARE_GPTQ": "0"},
     r"^QUANT_METHOD='loop_aware' contradicts LOOP_AWARE_GPTQ=0"),
    ({"QUANT_METHOD": "awq"}, r"^QUANT_METHOD='awq': must be one of 'rtn', 'gptq', 'loop_aware'"),
    ({"SKIP_GPTQ": "maybe"}, r"^SKIP_GPTQ='maybe': expected 1/0, true/false, yes/no or on/off"),
])
def test_quant_method_contradictions_name_both_variables(env, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_env(dict(env, PRESET="tiny"))


def test_checks_are_field_metadata():
    checks = {f.name: f.metadata for f in dataclasses.fields(Config) if f.metadata}
    assert checks["gptq_order"]["choices"] == kernels.gptq.ORDERS  # defined once, in kernels/gptq.py
    assert checks["gptq_inverse"]["choices"] == kernels.gptq.INVERSES
    assert checks["quant_method"]["choices"] == QUANT_METHODS
    assert FIXED == {k: getattr(Config(), k) for k, m in checks.items() if m["fixed"]}
    for name, check in checks.items():
        if check["bound"]:
            bad, message = (-1, "must be >= 0") if check["bound"] == ">=0" else (0, "must be > 0")
            with pytest.raises(ConfigError, match=rf"^{name.upper()}={bad}: {message}$"):
                from_env({}, preset="tiny", **{name: bad})


def test_reproduce_command_parses_to_every_variable():
    assert len(REPRODUCE_ENV) == 28
    assert set(REPRODUCE_ENV) == set(LIVE) | set(FIXED_ENV)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_reproduce_command_is_accepted_on_every_preset(preset):
    if from_env({}, preset=preset).ema_decay > 0:  # the seed's SWA_EVERY=50 and the preset's EMA: one must go
        with pytest.raises(ConfigError, match="EMA_DECAY=.*: cannot be on with SWA_EVERY=50"):
            from_env(dict(REPRODUCE_ENV, PRESET=preset))
        cfg = from_env(dict(REPRODUCE_ENV, PRESET=preset, EMA_DECAY="0"))
    else:
        cfg = from_env(dict(REPRODUCE_ENV, PRESET=preset))
    assert cfg.preset == preset
    assert (cfg.seed, cfg.model_dim, cfg.inst_dim, cfg.xsa_last_n, cfg.mlp_leaky_slope) == (444, 512, 32, 11, 0.5)
    assert cfg.crawler_loop_rope_scales == (9.0, 1.0, 1.0) and cfg.quant_method == "loop_aware"
    assert cfg.compile_fullgraph is True


def test_ouroboros_preset_is_the_reproduce_command():
    assert from_env(dict(REPRODUCE_ENV, PRESET="ouroboros")) == from_env({}, preset="ouroboros")


@pytest.mark.parametrize("env_name", sorted(LIVE))
def test_live_variables_change_their_field(env_name):
    text, field, value = LIVE[env_name]
    base = from_env(dict(REPRODUCE_ENV, PRESET="ouroboros"))
    cfg = from_env(dict(REPRODUCE_ENV, PRESET="ouroboros", **{env_name: text, **LIVE_NEEDS.get(env_name, {})}))
    assert getattr(cfg, field) == value != getattr(base, field)


def test_looped_layers_refuse_the_crawlers_instruction():
    with pytest.raises(ConfigError, match=r"^INST_DIM=32: the per-loop instruction is the crawler's"):
        from_env(dict(REPRODUCE_ENV, PRESET="ouroboros", USE_CRAWLER="0"))


@pytest.mark.parametrize("env_name", sorted(FIXED_ENV))
def test_fixed_only_variables_reject_other_values(env_name):
    assert getattr(from_env({env_name: str(FIXED[env_name.lower()])}, preset="tiny"), env_name.lower()) == FIXED[env_name.lower()]
    with pytest.raises(ConfigError, match=rf"^{env_name}=.*only {FIXED[env_name.lower()]} is supported"):
        from_env({env_name: FIXED_ENV[env_name]}, preset="tiny")


@pytest.mark.parametrize("env, pattern", [
    ({"MODEL_DIM": "five hundred"}, r"^MODEL_DIM='five hundred': expected an integer"),
    ({"MATRIX_LR": "nan"}, r"^MATRIX_LR='nan': expected a finite number"),
    ({"CRAWLER_LOOP_ROPE_SCALES": "9,x"}, r"^CRAWLER_LOOP_ROPE_SCALES='9,x': expected comma-separated numbers"),
    ({"COMPILE_FULLGRAPH": "maybe"}, r"^COMPILE_FULLGRAPH='maybe': expected 1/0, true/false, yes/no or on/off"),
    ({"PRESET": "huge"}, r"^PRESET='huge': unknown preset"),
    ({"XSA_BLOCKS": "encoder"}, r"^XSA_BLOCKS='encoder': must be one of"),
    ({"MODEL_DIM": "-512"}, r"^MODEL_DIM=-512: must be > 0"),
    ({"INST_DIM": "-1"}, r"^INST_DIM=-1: must be >= 0"),
    ({"NUM_HEADS": "3"}, r"^MODEL_DIM=128: must be divisible by NUM_HEADS=3"),
    ({"ROPE_DIMS": "15"}, r"^ROPE_DIMS=15: must be even"),
    ({"CRAWLER_LOOPS": "4", "CRAWLER_LOOP_ROPE_SCALES": "9,1"}, r"^CRAWLER_LOOP_ROPE_SCALES=.*needs at least CRAWLER_LOOPS=4"),
    ({"CRAWLER_LOOP_ROPE_SCALES": "9,0"}, r"^CRAWLER_LOOP_ROPE_SCALES=.*every scale must be > 0"),
    ({"EVAL_STRIDE": "4096"}, r"^EVAL_STRIDE=4096: must be at most EVAL_SEQ_LEN=256"),
    ({"GPTQ_BLOCK_SIZE": "512"}, r"^GPTQ_BLOCK_SIZE=512: must be at most 256 \(the Triton GPTQ kernel"),
])
def test_bad_values_fail_fast_naming_the_variable(env, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_env(dict({"PRESET": "tiny"}, **env))


def test_presets_resolve_in_order():
    for name, values in PRESETS.items():
        cfg = from_env({}, preset=name)
        assert cfg.preset == name
        assert all(getattr(cfg, k) == v for k, v in values.items()), name
    # defaults < preset < environment < keyword overrides
    assert Config().num_heads == 8 and from_env({}, preset="tiny").num_heads == 2
    assert from_env({"PRESET": "tiny", "NUM_HEADS": "4"}).num_heads == 4
    assert from_env({"PRESET": "tiny", "NUM_HEADS": "4"}, num_heads=1).num_heads == 1
    assert from_env({"PRESET": "tiny", "NUM_HEADS": "  "}).num_heads == 2  # blank means unset
    as_run = from_env({}, preset="ouroboros-as-run")
    assert (as_run.inst_dim, as_run.xsa_blocks, as_run.mlp_leaky_slope, as_run.swa_every) == (0, "crawler", 0.0, 0)


def test_default_preset_follows_the_device():
    expected = "ouroboros" if torch.cuda.is_available() else "tiny"
    assert from_env({}).preset == expected


def test_derived_values():
    cfg = from_env({}, preset="ouroboros")
    assert (cfg.head_dim, cfg.num_encoder_layers, cfg.num_decoder_layers) == (64, 4, 5)
    assert cfg.flat_rope_base == pytest.approx(10000 * 2 ** (16 / 14)) == pytest.approx(22_082, abs=1)
    assert from_env({}, preset="tiny").flat_rope_base == 10000.0  # TRAIN_SEQ_LEN 256 <= 1024: no NTK rescale


def test_dict_round_trip_and_env_names():
    cfg = from_env({"PRESET": "tiny", "CRAWLER_LOOP_ROPE_SCALES": "3,2.5"})
    assert Config.from_dict(cfg.to_dict()) == cfg
    as_lists = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}  # as JSON gives it back
    assert Config.from_dict(as_lists) == cfg
    assert cfg.env_dict()["CRAWLER_LOOP_ROPE_SCALES"] == "3,2.5"
    with pytest.raises(ConfigError, match="unknown configuration fields"):
        Config.from_dict(dict(cfg.to_dict(), flux_capacitor=1))
    with pytest.raises(ConfigError, match=r"^XSA_LAST_N=-2"):
        cfg.replace(xsa_last_n=-2)
