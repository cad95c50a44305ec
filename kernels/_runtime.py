"""What every kernel family needs to know about where it runs, and the one input policy of its entry points.

INTERPRET is read once, when kernels/ is imported: TRITON_INTERPRET=1 must be set before that, because
@triton.jit reads it when a kernel is defined. No Triton kernels here.
"""
import contextlib
import functools
import inspect
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The one reading of an on/off variable (KERNELS_STRICT here; STRICT_ENV, DRY_RUN and every boolean setting
# through model/config.py): these words, any case, and nothing else.
FLAG_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_flag(name: str, text: str) -> bool:
    """`text` as an on/off value of variable `name`; ValueError naming both for anything but FLAG_WORDS."""
    value = FLAG_WORDS.get(text.strip().lower())
    if value is None:
        raise ValueError(f"{name}={text!r}: expected 1/0, true/false, yes/no or on/off")
    return value


def env_flag(name: str, default: bool = False) -> bool:
    """Environment variable `name` as a flag (parse_flag); unset or blank: `default`."""
    text = os.environ.get(name, "")
    return default if not text.strip() else parse_flag(name, text)


def check_kernel_device(where: str, name: str, device: torch.device) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter; say which when neither."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return
    raise ValueError(f"{where}: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                     f"before kernels/ is imported), got {name} on {device}")


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """Inside, CUDA matmuls and cuDNN use TF32 exactly when `enabled`; the previous flags come back on exit.

    The trainer turns it on for its run; fp32 checks (the self-test, the test suite) turn it off, since an
    fp32 reference computed in TF32 is not an fp32 reference."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def input_policy(op: str, check, *, autocast: tuple = (), contiguous: tuple = (), autocast_output: str | None = None):
    """Decorate a family's Triton entry point (what kernels/__init__ dispatches to) with the input policy
    every Triton op shares. On each call, in this order:

    1. Autocast. PyTorch does not autocast custom ops, so under autocast the floating tensors named in
       `autocast` are cast to the autocast dtype, as F.linear would (fp64 stays fp64, as autocast leaves it).
       `autocast_output` names a keyword-only parameter of the entry that receives the dtype of its
       autocast-sensitive output: the autocast dtype when autocast is on, else the first argument's dtype.
    2. Validation, once: check(op, ...) gets the arguments it names (after the cast) and raises a
       ValueError that names the bad argument. The custom ops, their fakes and the launchers below the
       entry trust what it passed and do not check again.
    3. The device: the first argument must be where a Triton kernel runs (check_kernel_device).
    4. Layout: the tensors named in `contiguous` are made contiguous, for kernels that index them densely.

    The device of the first argument decides the autocast state. Everything here is plain Python over
    shapes and dtypes, so torch.compile(fullgraph=True) traces it and keeps the op as one node.
    """
    def decorate(entry):
        params = inspect.signature(entry).parameters
        positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
        checked = [n for n in inspect.signature(check).parameters if n in params]
        first = positional[0]

        @functools.wraps(entry)
        def guarded(*args, **kwargs):
            if len(args) > len(positional):
                raise TypeError(f"{op}: takes {len(positional)} positional arguments ({', '.join(positional)}), "
                                f"got {len(args)}")
            values = {**defaults, **dict(zip(positional, args)), **kwargs}
            lead = values[first]
            device_type = lead.device.type if isinstance(lead, torch.Tensor) else None
            amp = (torch.get_autocast_dtype(device_type)
                   if device_type is not None and torch.is_autocast_enabled(device_type) else None)
            if amp is not None:
                for name in autocast:
                    t = values[name]
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                        values[name] = t.to(amp)
            if autocast_output is not None:
                values[autocast_output] = amp if amp is not None else values[first].dtype
            check(op, **{name: values[name] for name in checked})
            check_kernel_device(op, first, values[first].device)
            for name in contiguous:
                if values[name] is not None:
                    values[name] = values[name].contiguous()
            return entry(**values)
        return guarded
    return decorate
