"""The model (SPEC 3 for the crawler, MODEL.md for looped layers: R1) and its configuration.

    import model
    net = model.build_model()                      # PRESET and the seed's variables from the environment
    net = model.build_model(preset="tiny")         # or a preset, with field overrides
    loss = net(ids, targets); logits = net(ids)
    for slot in net.schedule: ...                  # the block applications in forward order (block_schedule)
    net = model.from_record_state_dict(sd)         # R1's banked checkpoint as the `frontier` model
"""
from .config import PRESETS, QUANT_METHODS, Config, ConfigError, from_env
from .gpt import (GPT, CheckpointError, build_model, calibration_mode, count_parameters, from_seed_state_dict,
                  load_checkpoint, param_groups, save_checkpoint)
from .schedule import Slot, block_schedule


def __getattr__(name: str):
    """R1's checkpoint format (model/record.py) loads on first use: a training run never reads it, so the bundled
    train_gpt.py leaves it out (quant/bundle.py LEFT_OUT)."""
    if name in ("from_record_state_dict", "to_record_state_dict"):
        from . import record

        return getattr(record, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")

__all__ = ["Config", "ConfigError", "PRESETS", "QUANT_METHODS", "from_env", "CheckpointError", "GPT", "Slot",
           "block_schedule", "build_model", "calibration_mode", "count_parameters", "from_record_state_dict",
           "from_seed_state_dict", "load_checkpoint", "param_groups", "save_checkpoint", "to_record_state_dict"]
