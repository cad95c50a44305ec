"""model/config.py: presets resolve, the seed's reproduce command is accepted as pasted, bad values stop
at start-up with the variable named, and the original's fixed-only switches reject other values."""
import shlex

import pytest
import torch

from model.config import FIXED, PRESETS, Config, ConfigError, from_env

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
        "SKIP_GPTQ": ("1", "skip_gptq", True), "LOOP_AWARE_GPTQ": ("0", "loop_aware_gptq", False),
        "COMPILE_FULLGRAPH": ("0", "compile_fullgraph", False)}
FIXED_ENV = {"USE_CRAWLER": "0", "NUM_CRAWLER_LAYERS": "2", "SKIP_EMA": "0", "CRAWLER_TAP_DIM": "32",
             "ANCHOR_DIM": "16", "CRAWLER_MLP_CHOKE_DIM": "128"}


def test_reproduce_command_parses_to_every_variable():
    assert len(REPRODUCE_ENV) == 28
    assert set(REPRODUCE_ENV) == set(LIVE) | set(FIXED_ENV)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_reproduce_command_is_accepted_on_every_preset(preset):
    cfg = from_env(dict(REPRODUCE_ENV, PRESET=preset))
    assert cfg.preset == preset
    assert (cfg.seed, cfg.model_dim, cfg.inst_dim, cfg.xsa_last_n, cfg.mlp_leaky_slope) == (444, 512, 32, 11, 0.5)
    assert cfg.crawler_loop_rope_scales == (9.0, 1.0, 1.0) and cfg.skip_gptq is False and cfg.compile_fullgraph is True


def test_ouroboros_preset_is_the_reproduce_command():
    assert from_env(dict(REPRODUCE_ENV, PRESET="ouroboros")) == from_env({}, preset="ouroboros")


@pytest.mark.parametrize("env_name", sorted(LIVE))
def test_live_variables_change_their_field(env_name):
    text, field, value = LIVE[env_name]
    base = from_env(dict(REPRODUCE_ENV, PRESET="ouroboros"))
    cfg = from_env(dict(REPRODUCE_ENV, PRESET="ouroboros", **{env_name: text}))
    assert getattr(cfg, field) == value != getattr(base, field)


@pytest.mark.parametrize("env_name", sorted(FIXED_ENV))
def test_fixed_only_variables_reject_other_values(env_name):
    assert getattr(from_env({env_name: str(FIXED[env_name.lower()])}, preset="tiny"), env_name.lower()) == FIXED[env_name.lower()]
    with pytest.raises(ConfigError, match=rf"^{env_name}=.*only {FIXED[env_name.lower()]} is supported"):
        from_env({env_name: FIXED_ENV[env_name]}, preset="tiny")


@pytest.mark.parametrize("env, pattern", [
    ({"MODEL_DIM": "five hundred"}, r"^MODEL_DIM='five hundred': expected an integer"),
    ({"MATRIX_LR": "nan"}, r"^MATRIX_LR='nan': expected a finite number"),
    ({"CRAWLER_LOOP_ROPE_SCALES": "9,x"}, r"^CRAWLER_LOOP_ROPE_SCALES='9,x': expected comma-separated numbers"),
    ({"COMPILE_FULLGRAPH": "maybe"}, r"^COMPILE_FULLGRAPH='maybe': expected 0 or 1"),
    ({"PRESET": "huge"}, r"^PRESET='huge': unknown preset"),
    ({"XSA_BLOCKS": "encoder"}, r"^XSA_BLOCKS='encoder': must be one of"),
    ({"MODEL_DIM": "-512"}, r"^MODEL_DIM=-512: must be > 0"),
    ({"INST_DIM": "-1"}, r"^INST_DIM=-1: must be >= 0"),
    ({"NUM_HEADS": "3"}, r"^MODEL_DIM=128: must be divisible by NUM_HEADS=3"),
    ({"ROPE_DIMS": "15"}, r"^ROPE_DIMS=15: must be even"),
    ({"CRAWLER_LOOPS": "4", "CRAWLER_LOOP_ROPE_SCALES": "9,1"}, r"^CRAWLER_LOOP_ROPE_SCALES=.*needs at least CRAWLER_LOOPS=4"),
    ({"CRAWLER_LOOP_ROPE_SCALES": "9,0"}, r"^CRAWLER_LOOP_ROPE_SCALES=.*every scale must be > 0"),
    ({"EVAL_STRIDE": "4096"}, r"^EVAL_STRIDE=4096: must be at most EVAL_SEQ_LEN=256"),
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
