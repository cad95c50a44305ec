"""CrawlerGPT, the Ouroboros model (SPEC 3), and its configuration.

    import model
    net = model.build_model()                      # PRESET and the seed's variables from the environment
    net = model.build_model(preset="tiny")         # or a preset, with field overrides
    loss = net(ids, targets); logits = net(ids)
    for slot in net.schedule: ...                  # the block applications in forward order (block_schedule)
"""
from .config import PRESETS, QUANT_METHODS, Config, ConfigError, from_env
from .gpt import (CheckpointError, CrawlerGPT, Slot, block_schedule, build_model, calibration_mode,
                  count_parameters, from_seed_state_dict, load_checkpoint, param_groups, save_checkpoint)

__all__ = ["Config", "ConfigError", "PRESETS", "QUANT_METHODS", "from_env", "CheckpointError", "CrawlerGPT", "Slot",
           "block_schedule", "build_model", "calibration_mode", "count_parameters", "from_seed_state_dict",
           "load_checkpoint", "param_groups", "save_checkpoint"]
