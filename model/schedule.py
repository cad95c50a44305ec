"""The block schedule: which physical block runs in which virtual slot, for both kinds of recurrence.

A model holds physical blocks and walks a plan of slots (one block application each, in forward order).
Two layouts build that plan from the config:

- the crawler (USE_CRAWLER=1, the Ouroboros entry): flat blocks split into an encoder and a decoder half,
  one shared crawler block looped CRAWLER_LOOPS times between them (its own RoPE scale and instruction
  per loop); decoder i adds encoder n_enc-1-i's output.
- looped layers (USE_CRAWLER=0, the 1.0611 record "R1"): NUM_LAYERS blocks where physical
  LOOP_START..LOOP_END run NUM_LOOPS+1 times in a row; the first half of the slots (rounded down) is the
  encoder, the rest the decoder, and decoder slot j pops the last kept encoder output while j < K, the
  skip count fixed from the looping plan (R1: [0,1,2,3,4,5,3,4 | 5,3,4,5,6,7,8,9,10], K = 8).

Each layout has a plan with recurrence on (the crawler's loops, the repeated segment) and one with it off
(the crawler once; every physical block once), and the model switches between them at run time
(`recurrence_active`). Decoder slots of physical index >= PARALLEL_START_LAYER (0: none) run two-lane.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .config import Config, ConfigError

ENCODER, CRAWLER, DECODER = "encoder", "crawler", "decoder"


class Rope(NamedTuple):
    """What a block's RoPE tables are built from: inv_freq_i = base^(-2i/rope_dims) / scale, with
    base^(-2i/rope_dims) first rounded to bf16 when inv_freq_bf16 (the original as it ran)."""
    base: float
    scale: float
    inv_freq_bf16: bool = False


@dataclass(frozen=True)
class Slot:
    """One block application, in forward order.

    blocks, index: the module applied, `getattr(model, blocks)[index]` (state-dict prefix `name`).
    kind: ENCODER, CRAWLER (loop `loop` of the shared block) or DECODER.
    position: its place in forward order, which is also its KV-cache slot (model/decode.py).
    rope: what its RoPE tables are built from (a Rope).
    loop: the pass of a repeated block (the crawler's loop, or the pass of a looped segment), else None.
    inst: the loop_inst_up row applied to x before the block (None: no instruction).
    push_skip: the block's output is kept for a decoder (encoder slots).
    skip: the skip row (skip_weights, skip_gates) with which the last kept output is merged before the
        block (None: none).
    xsa: XSA on the module (per physical block, so every pass of a repeated block agrees).
    parallel: the block runs two-lane (lane0: attention, lane1: MLP), its skip merged into lane0.
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
    parallel: bool = False

    @property
    def name(self) -> str:
        return f"{self.blocks}.{self.index}"


def block_schedule(config: Config, recurrence_active: bool = True) -> tuple[Slot, ...]:
    """The plan of `config`'s layout, with its recurrence on or off (module docstring)."""
    if config.use_crawler:
        plan = _crawler_schedule(config, config.crawler_loops if recurrence_active else 1)
    else:
        plan = _looped_schedule(config, config.num_loops if recurrence_active else 0)
    lanes = [slot.parallel for slot in plan]
    if True in lanes and not all(lanes[lanes.index(True):]):  # two lanes merge back only after the last slot
        raise ConfigError(f"PARALLEL_START_LAYER={config.parallel_start_layer}: the two-lane blocks must be the "
                          f"last slots, but {plan[lanes.index(False, lanes.index(True))].name} runs after them")
    return plan


def skip_slots(config: Config) -> int:
    """How many skip rows (skip_weights, skip_gates) the model holds: the recurrent plan's skipping decoders."""
    return sum(slot.skip is not None for slot in block_schedule(config))


def _parallel(config: Config, physical: int) -> bool:
    return 0 < config.parallel_start_layer <= physical


def _crawler_schedule(config: Config, loops: int) -> tuple[Slot, ...]:
    """Encoder blocks (each keeps its output), the crawler block once per loop, then decoder blocks.

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
               for k in range(loops)]
    decoder = [Slot("flat_blocks", n_enc + i, DECODER, n_enc + loops + i, flat_rope, xsa(n_enc + 1 + i),
                    skip=i if i < n_enc else None, parallel=_parallel(config, n_enc + i)) for i in range(n_dec)]
    return tuple(encoder + crawler + decoder)


def _looped_schedule(config: Config, loops: int) -> tuple[Slot, ...]:
    """Physical 0..LOOP_START-1, LOOP_START..LOOP_END `loops`+1 times, then the rest; the first half of the
    slots is the encoder. XSA on the last XSA_LAST_N physical blocks; plain RoPE base in every block."""
    L, start, end = config.num_layers, config.loop_start, config.loop_end
    physical = [*range(start), *[i for _ in range(loops + 1) for i in range(start, end + 1)], *range(end + 1, L)]
    passes = [None] * start + [k for k in range(loops + 1) for _ in range(start, end + 1)] + [None] * (L - end - 1)
    n_enc = len(physical) // 2
    skips = min(n_enc, _looped_skip_count(config))
    rope = Rope(config.rope_base, 1.0, config.rope_inv_freq_bf16)
    slots = []
    for position, (i, loop) in enumerate(zip(physical, passes)):
        xsa = i >= L - config.xsa_last_n
        if position < n_enc:
            slots.append(Slot("blocks", i, ENCODER, position, rope, xsa, loop=loop, push_skip=True))
        else:
            j = position - n_enc
            slots.append(Slot("blocks", i, DECODER, position, rope, xsa, loop=loop, skip=j if j < skips else None,
                              parallel=_parallel(config, i)))
    return tuple(slots)


def _looped_skip_count(config: Config) -> int:
    """K of the looped layout: min(encoder slots, decoder slots) of the plan with the loop on."""
    total = config.num_layers + config.num_loops * (config.loop_end - config.loop_start + 1)
    return min(total // 2, total - total // 2)


def describe(schedule: tuple[Slot, ...]) -> list[str]:
    """One line per slot, for DRY_RUN: position, block, part, pass, skip and lanes."""
    lines = []
    for slot in schedule:
        what = [f"slot {slot.position:>2}: {slot.name:<18} {slot.kind}"]
        if slot.loop is not None:
            what.append(f"pass {slot.loop}")
        if slot.push_skip:
            what.append("keeps its output")
        if slot.skip is not None:
            what.append(f"merges skip {slot.skip}")
        if slot.parallel:
            what.append("two-lane")
        if slot.xsa:
            what.append("xsa")
        lines.append(", ".join(what))
    return lines
