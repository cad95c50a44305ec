"""train/step.py, the step every caller shares: micro-batch accumulation, the finite check that stops
before the weights change, the profiler phase ranges, and validate() restoring the model's mode."""
import pytest
import torch
from torch.profiler import profile

from model import build_model, from_env
from train.evaluate import validate
from train.step import PROFILE_PREFIX, Optimizers, TrainingDiverged, TrainStep

SMALL = dict(model_dim=64, num_heads=1, num_kv_heads=1, num_flat_layers=2, crawler_loops=1, bigram_vocab_size=256,
             bigram_dim=32, inst_dim=8)


def _model_and_batches(seed=0, seqs=4, seq_len=32):
    cfg = from_env(environ={}, preset="tiny", **SMALL)
    torch.manual_seed(seed)
    net = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (seqs, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return cfg, net, ids[:, :-1], ids[:, 1:]


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


class _Recorder:
    """An optimizer stand-in: records the schedule it was given and the gradients it was asked to apply."""

    def __init__(self, net):
        self.net, self.calls, self.grads = net, [], None

    def set_schedule(self, step, multiplier):
        self.calls.append(("schedule", step, multiplier))

    def step(self):
        self.calls.append(("step",))
        self.grads = {n: p.grad.clone() for n, p in self.net.named_parameters()}

    def zero_grad(self):
        self.calls.append(("zero_grad",))
        self.net.zero_grad(set_to_none=True)


def test_two_micro_batches_step_like_one_batch_of_both():
    """accum=2 over two halves: the mean loss and the mean gradient (loss/accum) of one full batch."""
    cfg, net, x, y = _model_and_batches()
    whole = _Recorder(net)
    loss_whole, norm_whole = TrainStep(net, net, whole, lambda: (x, y))(3, 0.5)
    assert whole.calls == [("schedule", 3, 0.5), ("step",), ("zero_grad",)]
    halves = iter([(x[:2], y[:2]), (x[2:], y[2:])])
    split = _Recorder(net)
    loss_split, norm_split = TrainStep(net, net, split, lambda: next(halves), accum=2)(3, 0.5)
    assert loss_split == pytest.approx(loss_whole, rel=1e-5) and norm_split == pytest.approx(norm_whole, rel=1e-4)
    for name, grad in split.grads.items():
        torch.testing.assert_close(grad, whole.grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="accum=0"):
        TrainStep(net, net, whole, lambda: (x, y), accum=0)


def test_clip_scales_the_gradient_to_the_norm():
    cfg, net, x, y = _model_and_batches()
    free, clipped = _Recorder(net), _Recorder(net)
    _, norm = TrainStep(net, net, free, lambda: (x, y))(0, 1.0)
    _, norm_again = TrainStep(net, net, clipped, lambda: (x, y), grad_clip_norm=norm / 4)(0, 1.0)
    assert norm_again == pytest.approx(norm, rel=1e-6)  # the norm before clipping is what is returned
    for name, grad in clipped.grads.items():
        torch.testing.assert_close(grad, free.grads[name] / 4, rtol=1e-4, atol=1e-7, msg=name)


def test_non_finite_loss_raises_before_the_weights_change():
    cfg, net, x, y = _model_and_batches()
    optimizers = Optimizers(net, cfg, "cpu")
    with torch.no_grad():
        net.skip_weights.fill_(float("nan"))  # a NaN that reaches the loss but is not a Muon/AdamW input alone
    before = _state(net)
    step = TrainStep(net, net, optimizers, lambda: (x, y), grad_clip_norm=cfg.grad_clip_norm)
    with pytest.raises(TrainingDiverged, match=r"step 5: train_loss=nan grad_norm=nan"):
        step(4, 1.0)
    for name, tensor in _state(net).items():
        assert torch.equal(tensor.nan_to_num(), before[name].nan_to_num()), name
    assert all(p.grad is None for p in net.parameters())
    assert not optimizers.muon.state and not optimizers.adam.state  # no optimizer step was taken


def test_step_opens_the_phase_ranges_the_ledger_groups_by():
    cfg, net, x, y = _model_and_batches(seqs=1, seq_len=16)
    step = TrainStep(net, net, Optimizers(net, cfg, "cpu"), lambda: (x, y))
    with profile() as prof:
        step(0, 1.0)
    names = {e.name for e in prof.events()}
    phases = {"step", "forward", "backward", "clip", "muon", "adamw", "zero_grad"}
    assert {PROFILE_PREFIX + p for p in phases} <= names, names


def test_validate_scores_in_eval_mode_and_restores_the_mode():
    from train.evaluate import evaluate_bpb

    cfg, net, x, _ = _model_and_batches()
    tokens = x.reshape(-1)
    luts = (torch.ones(cfg.vocab_size, dtype=torch.int16), torch.zeros(cfg.vocab_size, dtype=torch.bool),
            torch.zeros(cfg.vocab_size, dtype=torch.bool))
    seen = []

    def forward(ids):
        seen.append(net.training)
        return net(ids)
    net.train()
    loss, bpb = validate(forward, net, tokens, luts, seq_len=32, stride=None, batch_seqs=2, device="cpu")
    assert net.training and seen and not any(seen)
    with torch.no_grad():
        net.eval()
        assert (loss, bpb) == evaluate_bpb(net, tokens, luts, 32, batch_seqs=2)
    validate(net, net, tokens, luts, seq_len=32, stride=None, batch_seqs=2, device="cpu")
    assert not net.training
