"""Loading an artifact as a model: the float model rebuilt from its stored config and dequantized tensors,
or with its int6 layers as kernels.int6.QuantLinear (the model surgery lives here, not in the file format).
"""
from __future__ import annotations

from pathlib import Path

import torch

import model as model_lib
from kernels.int6 import QuantLinear
from model.config import Config, ConfigError
from model.blocks import MLP

from .artifact import Artifact, read_artifact
from .scheme import KIND_INT6, TIED_EMBEDDING, ArtifactError, dequantize_state_dict

TIED_EMBEDDING_WEIGHT = f"{TIED_EMBEDDING}.weight"


def load_model(path: str | Path, device="cpu", quant_linear: bool | None = None):
    """Rebuild a fresh model from an artifact. Returns (model, config).

    quant_linear (default: on when `device` is CUDA): every int6 nn.Linear becomes a
    kernels.int6.QuantLinear holding the stored codes (6 bits per weight in memory, the fused
    dequant-matmul kernel on the triton backend), and MLPs whose fc/proj were replaced run unfused,
    through those modules. Off: the weights dequantized to fp32 in plain nn.Linear (the reference path).
    """
    artifact, config = read_model_artifact(path)
    return model_from_artifact(artifact, config, device, quant_linear), config


def model_from_artifact(artifact: Artifact, config: Config, device="cpu", quant_linear: bool | None = None):
    """load_model's second half, for an artifact already read (the eval clock times the two apart)."""
    device = torch.device(device)
    if quant_linear is None:
        quant_linear = device.type == "cuda"
    with torch.device("meta"):  # no random init to overwrite (seconds for the full models, inside the eval clock)
        net = model_lib.build_model(config)
    state = {name: t.float().contiguous() for name, t in dequantize_state_dict(artifact.tensors).items()}
    if config.quant_method == "frontier" and TIED_EMBEDDING_WEIGHT in state:  # R1 keeps the corrected embedding bf16
        state[TIED_EMBEDDING_WEIGHT] = state[TIED_EMBEDDING_WEIGHT].bfloat16().float()
    net.load_state_dict(state, strict=True, assign=True)
    if quant_linear:
        use_quant_linear(net, artifact.tensors)
    return net.to(device)


def read_model_artifact(path: str | Path) -> tuple[Artifact, Config]:
    """read_artifact, then the checks only the model can make: the stored config builds a model, and that
    model's tensors are the stored ones, name for name and shape for shape. Raises ArtifactError naming the
    file (and the tensor). Builds on the meta device: no memory, no init."""
    artifact = read_artifact(path)
    try:
        config = Config.from_dict(artifact.config)
    except (ConfigError, TypeError) as err:  # ConfigError names the field but not the file
        raise ArtifactError(f"{path}: its stored config cannot be used: {err}") from None
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in model_lib.build_model(config).state_dict().items()}
    stored = artifact.tensors
    if set(stored) != set(expected):
        raise ArtifactError(f"{path}: tensors do not match the model built from its config: missing "
                            f"{sorted(set(expected) - set(stored))}, unexpected {sorted(set(stored) - set(expected))}")
    for name, shape in expected.items():
        if tuple(stored[name].shape) != shape:
            raise ArtifactError(f"{path}: tensor {name!r} is stored with shape {list(stored[name].shape)}, but the "
                                f"model its stored config describes expects {list(shape)}: the config and the "
                                f"tensors disagree")
    return artifact, config


def use_quant_linear(net: torch.nn.Module, tensors: dict) -> list[str]:
    """Swap every nn.Linear whose weight is stored int6 in `tensors` for QuantLinear.from_codes(codes, scale)
    and mark the MLPs that hold one unfused (their fused path would dequantize `.weight` on every call).
    Returns the swapped layers' names."""
    swapped = []
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            stored = tensors.get(f"{full}.weight")
            if isinstance(child, torch.nn.Linear) and stored is not None and stored.kind == KIND_INT6 \
                    and stored.lqer is None:  # a low-rank correction needs the dense weight
                layer = QuantLinear.from_codes(stored.codes, stored.scale)
                setattr(module, child_name, layer.to(child.weight.device))
                swapped.append(full)
        if isinstance(module, MLP) and (isinstance(module.fc, QuantLinear) or isinstance(module.proj, QuantLinear)):
            module.unfused = True
    return swapped
