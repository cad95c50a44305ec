"""Phased LoRA test-time training at evaluation: R1's reported score (DATA_EVAL.md 4), legal by construction.

Documents start at each BOS and end at the next one (inclusive: a document's last target is the next BOS).
They go in batches of TTT_BATCH_SIZE, sorted by length, the queue longest first. Each document of a batch
has its own LoRA adapters (model/lora.py) and is read chunk by chunk (TTT_CHUNK_SIZE targets, a window of
at most TTT_EVAL_SEQ_LEN of its own tokens): a chunk is scored first, then, unless it is the document's
last, one AdamW step on that chunk's loss adapts the document's adapters for its next chunk. Three times
(PHASED_TTT_NUM_PHASES, at PHASED_TTT_PREFIX_DOCS·k/K documents scored) every rank pauses and SGD trains all
weights on the shortest documents already scored, document-isolated, then scoring goes on with the new weights.

Legality (DATA_EVAL.md 5): a target's distribution comes from the artifact, its own document's earlier
tokens and documents scored before it; nothing is scored twice; every target of the kept val tokens is
scored once. `python -m train.legality --mode ttt` checks it by perturbation.

Work sharing: TTT_SCHEDULE=dynamic hands the queue out through an atomic counter in torch.distributed's
store (any number of hosts); static puts queue entry i on rank i mod world and carries the warm A along
TTT_STATIC_LANES fixed lanes (entry i on lane i mod lanes), so the score is the same on every run and for
any number of ranks that divides the lanes. The fp64 sums are all-reduced at the end.

Differences from R1, on purpose: work goes through the process group's store, not lock files in a local
temp folder; the static schedule exists; the warm A of a fresh adapter set comes from a generator seeded by
SEED (and the rank or lane), not from whatever the CPU generator held; the embedding trains in fp32 in the
global SGD (R1's is bf16); R1's bf16 autocast applies on CUDA only.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.lora import TTTLoRA
from train.data import document_segments
from train.evaluate import autocast_for, target_bytes

BOS_ID = 1
_CALLS = itertools.count()  # every rank evaluates the same number of times: a store key per evaluation


@dataclass(frozen=True)
class Doc:
    """Tokens [start, start + length) of the val stream: a BOS, the document, and the next BOS if any."""
    start: int
    length: int

    @property
    def targets(self) -> int:
        return self.length - 1


def find_docs(tokens: torch.Tensor, bos_id: int = BOS_ID, fraction: float = 1.0) -> list[Doc]:
    """The documents of a val stream (DATA_EVAL.md 4.2): one per BOS, through the next BOS inclusive, the
    last to the end. A stream that does not start with a BOS gets a first document from position 0, so
    every target is some document's. VAL_DOC_FRACTION keeps the first fraction of them."""
    n = tokens.numel()
    starts = (tokens == bos_id).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    ends = starts[1:] + [n - 1]
    docs = [Doc(s, e - s + 1) for s, e in zip(starts, ends) if e > s]
    return docs[:max(1, int(len(docs) * fraction))]


def batch_queue(docs: list[Doc], batch_size: int) -> tuple[list[list[int]], list[int]]:
    """(batches, queue): documents sorted by length (stable) in batches of batch_size (row b the b-th shortest),
    and the batch indices longest batch first (stable)."""
    order = sorted(range(len(docs)), key=lambda i: docs[i].length)
    batches = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
    queue = sorted(range(len(batches)), key=lambda j: -docs[batches[j][-1]].length)
    return batches, queue


def phase_boundaries(num_docs: int, prefix_docs: int, num_phases: int) -> list[int]:
    """Documents scored before each global SGD phase: floor(P·k/K), P = min(#docs, PHASED_TTT_PREFIX_DOCS)."""
    p = min(num_docs, prefix_docs)
    return [p * k // num_phases for k in range(1, num_phases + 1)]


def chunk_windows(doc: Doc, k: int, chunk: int, window: int) -> tuple[int, int, int] | None:
    """(lo, e, first): chunk k of a document scores its targets [chunk·k, e) from the window of its tokens
    [lo, e) (targets lo+1..e), the scored ones the window's last e - chunk·k; None past its last chunk."""
    chunks = -(-doc.targets // chunk)
    if k >= chunks:
        return None
    e = doc.targets if k == chunks - 1 else chunk * (k + 1)
    return max(0, e - window), e, chunk * k


@dataclass
class TTTResult:
    val_loss: float
    val_bpb: float
    targets: int
    docs: int
    seconds: dict = field(default_factory=dict)   # score_forward, adapter_backward, optimizer, global_sgd, total
    phases: list = field(default_factory=list)    # per phase: docs scored at the pause, docs trained on, steps, s


class Clock:
    """Seconds per part (the TTT loop's, the eval clock's), synchronizing CUDA so work is charged where it ran."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        if self.cuda:
            torch.cuda.synchronize()
        self.t = time.perf_counter()

    def lap(self, part: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self.t
        self.t = now


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Queue:
    """Which queue entries this rank scores, and when the ranks pause for a global phase (pauses are collective:
    every rank takes part in each, in order).

    dynamic: entries claimed from an atomic counter in the process group's store; after each batch (until the
    last phase) the scored-document counter grows, the first rank to see it reach the phase's boundary raises
    the phase's flag, and every rank pauses after its batch in flight (R1's rule, without lock files); a rank
    with nothing left to claim waits for the flag. static: entry i on rank i mod world; phase k pauses after the
    entry whose documents reach its boundary, and at least one entry after the previous pause, which is
    where one rank under the dynamic rule pauses too."""

    def __init__(self, sizes: list[int], boundaries: list[int], static: bool, rank: int, world: int, key: str):
        self.sizes, self.boundaries, self.static = sizes, boundaries, static
        self.world, self.position = world, rank - world
        self.store, self.next_local, self.scored_local = None, 0, 0
        if static:
            reach, total, self.pause_after = [], 0, []
            for size in sizes:
                total += size
                reach.append(total)
            for b in boundaries:
                at = next((i for i, r in enumerate(reach) if r >= b), len(sizes) - 1)
                if self.pause_after:
                    at = max(at, self.pause_after[-1] + 1)
                self.pause_after.append(min(at, len(sizes) - 1))
        elif world > 1:
            self.store = dist.PrefixStore(f"ttt/{key}/", dist.distributed_c10d._get_default_store())

    def claim(self, phase: int) -> int | None:
        """The next queue position this rank scores; None: pause now (static) or nothing is left."""
        if self.static:
            nxt = self.position + self.world
            if nxt >= len(self.sizes) or (phase < len(self.boundaries) and nxt > self.pause_after[phase]):
                return None
            self.position = nxt
            return nxt
        if self.store is None:
            i, self.next_local = self.next_local, self.next_local + 1
        else:
            i = self.store.add("next", 1) - 1
        return i if i < len(self.sizes) else None

    def after_batch(self, docs: int, phase: int) -> bool:
        """Count a finished batch's documents (until the last phase); True: pause now."""
        if self.static or phase >= len(self.boundaries):
            return False
        if self.store is None:
            self.scored_local += docs
            return self.scored_local >= self.boundaries[phase]
        if self.store.add("scored", docs) >= self.boundaries[phase]:
            self.store.set(f"pause{phase}", "1")
        return self.store.check([f"pause{phase}"])

    def wait_for_pause(self, phase: int) -> None:
        """Nothing left to claim and a phase to come: the phase is due once every batch in flight is counted."""
        if self.store is not None:
            if self.store.add("scored", 0) >= self.boundaries[phase]:
                self.store.set(f"pause{phase}", "1")
            self.store.wait([f"pause{phase}"])


def _adamw(lora: TTTLoRA, cfg, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(lora.parameters(), lr=cfg.ttt_lora_lr, betas=(cfg.ttt_beta1, cfg.ttt_beta2), eps=1e-10,
                             weight_decay=cfg.ttt_weight_decay, fused=device.type == "cuda")


def _generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator on `device` seeded by a tuple of ints (their hash is the same in every process)."""
    return torch.Generator(device).manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)


def score_batch(forward, lora: TTTLoRA, cfg, docs: list[Doc], tokens: torch.Tensor, luts, val_bytes, sums,
                device: torch.device, clock: Clock, observe=None, trim_rows: bool = True) -> None:
    """One batch (documents shortest first), chunk by chunk: score chunk k of every document with the current
    adapters, add it to sums (fp64 [nll, bytes, targets]), then TTT_GRAD_STEPS AdamW steps on the chunk losses
    of the documents that have a later chunk. B starts at 0 and the optimizer fresh; A is as the caller left it.

    Row b holds its window left-aligned, right-padded with id 0, all rows as wide as the longest window of
    chunk k. A chunk's scored targets always lie in the last TTT_CHUNK_SIZE positions of that width, so only
    those positions go through the head, and (trim_rows) rows whose document has ended (a prefix: the
    shortest) are left out of the forward; both change no number. A compiled forward keeps every row, as R1
    does: a row count it has not seen would be a recompilation."""
    chunk, window = cfg.ttt_chunk_size, cfg.ttt_eval_seq_len
    optimizer = _adamw(lora, cfg, device)
    lora.reset_B()
    chunks = [-(-d.targets // chunk) for d in docs]
    for k in range(max(chunks)):
        first = sum(c <= k for c in chunks) if trim_rows else 0   # documents finished before chunk k
        active = docs[first:]
        rows, width = len(active), min(chunk * (k + 1), window)
        x = torch.zeros(rows, width, dtype=torch.long)
        y = torch.zeros(rows, width, dtype=torch.long)
        at = torch.zeros(rows, width, dtype=torch.long)      # each position's target index in the val stream
        scored = torch.zeros(rows, width, dtype=torch.bool)
        for b, doc in enumerate(active):
            if (w := chunk_windows(doc, k, chunk, window)) is None:
                continue  # a finished document (rows kept): padding, nothing scored
            lo, e, start = w
            n = e - lo
            x[b, :n] = tokens[doc.start + lo:doc.start + e]
            y[b, :n] = tokens[doc.start + lo + 1:doc.start + e + 1]
            at[b, :n] = torch.arange(doc.start + lo + 1, doc.start + e + 1)
            scored[b, n - (e - start):n] = True
        # the scored positions, as the head's last `chunk` outputs see them
        x, y, at, scored = x.to(device), y[:, -chunk:].to(device), at[:, -chunk:], scored[:, -chunk:]
        scored_d = scored.to(device)
        train_rows = torch.tensor([c > k + 1 for c in chunks[first:]], device=device)  # a later chunk to read
        train = bool(train_rows.any()) and cfg.ttt_grad_steps > 0
        lora.use_rows(first)
        for step in range(cfg.ttt_grad_steps if train else 1):
            with torch.set_grad_enabled(train), autocast_for(device):
                logits = forward(x, lora=lora, tail=chunk)
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(rows, chunk)
            clock.lap("score_forward")
            if step == 0:  # score first, with the adapters as they were before this chunk
                with torch.no_grad():
                    picked = nll[scored_d]
                    sums[0] += picked.double().sum()
                    if val_bytes is None:
                        sums[1] += target_bytes(x[:, -chunk:][scored_d], y[scored_d], luts).sum().double()
                    else:
                        sums[1] += val_bytes[at[scored]].to(device).sum().double()
                    sums[2] += picked.numel()
                    if observe is not None:
                        observe(at[scored], logits[scored_d].detach().float(), picked.detach())
            if not train:
                break
            # then adapt on the chunk just scored: the sum over training rows of the chunk's mean loss (a
            # non-last chunk fills the last `chunk` positions; a document's last chunk is never trained)
            loss = (nll * train_rows[:, None]).sum() / chunk
            loss.backward()
            clock.lap("adapter_backward")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clock.lap("optimizer")
    lora.use_rows(0)


def global_sgd(model: torch.nn.Module, stream: torch.Tensor, cfg, device: torch.device, log=None) -> int:
    """R1's global phase (DATA_EVAL.md 4.6) on the concatenated scored documents `stream`: chunks of
    GLOBAL_TTT_CHUNK_TOKENS, the last skipped; in chunk c this rank's share of its TTT_EVAL_SEQ_LEN sequences,
    document-isolated, the training forward's mean loss; gradients summed over ranks and divided by the world,
    clipped to GLOBAL_TTT_GRAD_CLIP; SGD with momentum over every weight, lr cosine from GLOBAL_TTT_LR to 0.
    Returns the number of steps."""
    rank, world = _rank_world()
    n, size, seq = stream.numel(), cfg.global_ttt_chunk_tokens, cfg.ttt_eval_seq_len
    steps = -(-(n - 1) // size) - 1
    if steps <= 0:
        return 0
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=cfg.global_ttt_lr, momentum=cfg.global_ttt_momentum)
    model.train()
    try:
        for c in range(steps):
            lr = cfg.global_ttt_lr * 0.5 * (1 + math.cos(math.pi * c / steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            start = c * size
            sequences = (min(start + size, n - 1) - start) // seq
            mine = range(sequences * rank // world, sequences * (rank + 1) // world)
            for m in range(mine.start, mine.stop, cfg.global_ttt_batch_seqs):
                count = min(cfg.global_ttt_batch_seqs, mine.stop - m)
                lo = start + m * seq
                x = stream[lo:lo + count * seq].to(device)
                y = stream[lo + 1:lo + count * seq + 1].to(device)
                cu = document_segments(x, seq) if cfg.global_ttt_respect_doc_boundaries else \
                    torch.arange(0, x.numel() + 1, seq, dtype=torch.int32, device=device)
                with autocast_for(device):
                    loss = model(x[None], y[None], cu_seqlens=cu)
                loss.backward()
            for p in params:  # a rank without a sequence this chunk still takes part in the sum
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if world > 1:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
            torch.nn.utils.clip_grad_norm_(params, cfg.global_ttt_grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if log is not None and (c % 50 == 0 or c == steps - 1):
                log(f"tttg: step {c + 1}/{steps} lr:{lr:.3g} loss:{loss.item() if mine else float('nan'):.4f}")
    finally:
        model.eval()
        for p in params:
            p.requires_grad_(False)
    return steps


def evaluate_ttt(model: torch.nn.Module, val_tokens: torch.Tensor, luts, cfg, *, device, val_bytes=None, observe=None,
                 forward=None, log=None, key: str = "run") -> TTTResult:
    """val_loss and val_bpb of `model` (the artifact's, dequantized) under phased LoRA TTT over val_tokens (the
    kept val stream). The model's weights change (global phases): pass a copy you may lose. forward: the callable
    that runs model(ids, lora=...) (a compiled one), else the model. observe(targets_at, logits, nll): called with
    every scored chunk (train/legality.py). key names this evaluation's counters in the process group's store."""
    device = torch.device(device)
    forward = forward or model
    rank, world = _rank_world()
    static = cfg.ttt_schedule == "static"
    if static and cfg.ttt_static_lanes % world:
        raise ValueError(f"TTT_STATIC_LANES={cfg.ttt_static_lanes} must be a multiple of the {world} ranks with "
                         f"TTT_SCHEDULE=static")
    clock = Clock(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    docs = find_docs(val_tokens, BOS_ID, cfg.val_doc_fraction)
    batches, queue = batch_queue(docs, cfg.ttt_batch_size)
    boundaries = phase_boundaries(len(docs), cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    work = _Queue([len(batches[j]) for j in queue], boundaries, static, rank, world, f"{key}{next(_CALLS)}")
    luts = tuple(t.to(device) for t in luts)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    scored_docs: list[tuple[int, int, int, int]] = []   # (batch, row, start, length), for the global phases
    lanes: dict[int, list[torch.Tensor]] = {}          # warm A per lane (dynamic: this rank's one lane, 0)

    def adapters(rows: int, *seed) -> TTTLoRA:
        return TTTLoRA(model, rows, cfg.ttt_lora_rank, cfg.ttt_lora_alpha, cfg.ttt_k_lora, cfg.ttt_o_lora,
                       cfg.ttt_mlp_lora, generator=_generator(device, cfg.seed, *seed), device=device)

    reusable, phase, result_phases = None, 0, []
    while True:
        position = work.claim(phase)
        if position is None:
            if phase >= len(boundaries):
                break
            work.wait_for_pause(phase)
            phase = _pause(model, cfg, device, phase, boundaries, scored_docs, val_tokens, result_phases, clock, log)
            lanes.clear()  # fresh adapters after a phase
            continue
        batch = batches[queue[position]]
        lane = position % cfg.ttt_static_lanes if static else 0
        who = -1 if static else rank  # static: nothing may depend on the rank
        if len(batch) == cfg.ttt_batch_size:
            if reusable is None:  # made once, its A drawn as a fresh lane's would be
                reusable = adapters(len(batch), phase, lane, who, position)
            elif lane in lanes and cfg.ttt_warm_start_a:
                reusable.load_a_state(lanes[lane])
            else:
                reusable.reset_A(_generator(device, cfg.seed, phase, lane, who, position))
            lora = reusable
        else:  # a batch of another size: a fresh set of its own
            lora = adapters(len(batch), phase, -2, position)
        score_batch(forward, lora, cfg, [docs[i] for i in batch], val_tokens, luts, val_bytes, sums, device, clock,
                    observe, trim_rows=forward is model)
        if lora is reusable:
            lanes[lane] = lora.a_state()
        if phase < len(boundaries):
            scored_docs += [(queue[position], row, docs[i].start, docs[i].length) for row, i in enumerate(batch)]
        if work.after_batch(len(batch), phase):
            phase = _pause(model, cfg, device, phase, boundaries, scored_docs, val_tokens, result_phases, clock, log)
            lanes.clear()
    if world > 1:
        dist.all_reduce(sums)
    nll, nbytes, count = sums.tolist()
    clock.lap("score_forward")
    seconds = dict(clock.seconds)
    seconds["total"] = sum(seconds.values())
    return TTTResult(nll / count, nll / (math.log(2) * nbytes), int(count), len(docs), seconds, result_phases)


def _pause(model, cfg, device, phase: int, boundaries: list[int], scored_docs: list, tokens: torch.Tensor,
           phases: list, clock: Clock, log) -> int:
    """A global phase: gather every rank's scored documents, keep the first boundaries[phase] by (batch, row),
    i.e. the shortest, and train every weight on them. Returns the next phase's index."""
    clock.lap("score_forward")
    world = _rank_world()[1]
    everyone = [scored_docs]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, scored_docs)
    pooled = sorted(d for part in everyone for d in part)
    kept = pooled[:boundaries[phase]]
    stream = torch.cat([tokens[start:start + length] for _, _, start, length in kept]) if kept else tokens[:0]
    steps = global_sgd(model, stream, cfg, device, log)
    clock.lap("global_sgd")
    phases.append(dict(scored=len(pooled), trained=len(kept), steps=steps))
    if log is not None:
        log(f"ttpp: phase {phase + 1}/{len(boundaries)} pd:{len(pooled)} gd:{len(kept)} steps:{steps}")
    return phase + 1


def compile_warmup(forward, model: torch.nn.Module, cfg, device: torch.device) -> None:
    """R1's compile warmup: a batch of adapters and its AdamW, forward + backward + step at the two widths TTT
    runs most (a chunk, and the full window) on random ids, never val tokens; everything is then dropped."""
    generator = torch.Generator(device).manual_seed(cfg.seed)
    lora = TTTLoRA(model, cfg.ttt_batch_size, cfg.ttt_lora_rank, cfg.ttt_lora_alpha, cfg.ttt_k_lora, cfg.ttt_o_lora,
                   cfg.ttt_mlp_lora, generator=generator, device=device)
    optimizer = _adamw(lora, cfg, device)
    for width in (cfg.ttt_chunk_size, cfg.ttt_eval_seq_len):
        ids = torch.randint(0, cfg.vocab_size, (cfg.ttt_batch_size, width), device=device, generator=generator)
        with autocast_for(device):
            logits = forward(ids, lora=lora)
        nll = F.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten(), reduction="none")
        nll.view(cfg.ttt_batch_size, width)[:, :cfg.ttt_chunk_size].mean(1).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
