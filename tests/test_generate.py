"""Generation from the artifact: the KV-cached decode against the full forward, the artifact's int6 layers as
QuantLinear against the dequantized model, sampling, and the `python -m quant.generate` CLI.

The decode tests use a small random model with noise on every weight (zero-init tensors such as the bigram
table and the instruction up-projections would hide a wrong previous-token or per-loop path); the generation
tests use an artifact quantized from the trained tiny_run model.
"""
import math

import pytest
import sentencepiece as spm
import torch

import kernels
import model
from kernels.int6 import QuantLinear
from model.decode import KVCache, decode_step
from model.blocks import MLP
from quant import artifact as art
from quant import generate as gen
from quant.load import load_model
from quant.scheme import quantize_state_dict

# fp32 decode vs fp32 forward: the only difference is the summation order of the softmax and matmuls
# (measured max |diff| ~1e-5 on logits of magnitude ~10); a wrong position, mask or previous token is O(1).
ATOL = RTOL = 1e-4


def _noisy(cfg, seed=0):
    torch.manual_seed(seed)
    net = model.build_model(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 2 else 0.05))
    return net


@pytest.fixture(scope="module")
def small():
    """XSA on every block, a live instruction per loop, 2 crawler loops with RoPE scales 9 and 1, GQA 4:2,
    2 encoder + 3 decoder blocks (the last decoder block has no skip)."""
    cfg = model.from_env(environ={}, preset="tiny", model_dim=64, num_heads=4, num_kv_heads=2, num_flat_layers=5,
                         bigram_vocab_size=256, bigram_dim=32, inst_dim=8, crawler_loops=2,
                         crawler_loop_rope_scales=(9.0, 1.0), xsa_last_n=11, quant_small_numel=1024)
    schedule = model.block_schedule(cfg)
    assert all(slot.xsa for slot in schedule) and cfg.crawler_loop_rope_scales[0] != cfg.crawler_loop_rope_scales[1]
    assert [slot.skip for slot in schedule if slot.kind == "decoder"] == [0, 1, None]
    return cfg, _noisy(cfg)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decode steps are hundreds of tiny ops, where a second intra-op thread only adds synchronization; when
    another process holds a core its spin-waits made this file 25x slower (measured on a loaded 2-core
    machine: 5 s with one thread, 2 minutes with two). Module-scoped, so the fixtures below run with it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def torch_backend():
    """Each test runs on the PyTorch path unless it switches on its own; the environment's choice is restored."""
    kernels.set_backend("torch")
    yield
    kernels.set_backend(None)


def _decode_in_chunks(net, ids, chunks):
    cache = KVCache(net, ids.shape[0], ids.shape[1])
    out, pos = [], 0
    for n in chunks:
        out.append(decode_step(net, ids[:, pos:pos + n], cache))
        pos += n
    assert pos == ids.shape[1] and cache.length == pos
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("chunks", [[1] * 24, [7, 1, 1, 3, 1, 11]], ids=["token-by-token", "prefill-then-mixed"])
def test_kv_cached_decode_equals_full_forward_at_every_position(small, chunks):
    cfg, net = small
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, sum(chunks)))
    with torch.no_grad():
        full = net(ids)
    decoded = _decode_in_chunks(net, ids, chunks)
    assert decoded.shape == full.shape and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, full, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("broken", ["no context", "previous hidden lost", "previous token lost"])
def test_the_comparison_sees_a_broken_cache(small, broken):
    """Negative controls: the tolerance above is tight enough to catch each way a cache can go wrong."""
    cfg, net = small
    torch.manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        full = net(ids)
    cache = KVCache(net, 1, 12)
    decode_step(net, ids[:, :11], cache)
    if broken == "no context":
        cache.reset()
    elif broken == "previous hidden lost":  # the smear gate blends in the previous token's hidden
        last_ids, last_e, last_h = cache.last
        cache.last = (last_ids, last_e, torch.zeros_like(last_h))
    else:  # the bigram bucket hashes the previous token
        last_ids, last_e, last_h = cache.last
        cache.last = ((last_ids + 1) % cfg.vocab_size, last_e, last_h)
    diff = (decode_step(net, ids[:, 11:], cache) - full[:, 11:]).abs().max().item()
    assert diff > 100 * ATOL, f"{broken}: the decode still matched the forward (max diff {diff:.2e})"


def test_decode_refuses_bad_input(small):
    cfg, net = small
    cache = KVCache(net, 2, 8)
    with pytest.raises(ValueError, match=r"ids_new has batch 1, the cache was built for 2"):
        decode_step(net, torch.zeros(1, 3, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match=r"ids_new must be \[batch, n_new\]"):
        decode_step(net, torch.zeros(2, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {cfg.vocab_size}\)"):
        decode_step(net, torch.full((2, 1), cfg.vocab_size), cache)
    decode_step(net, torch.zeros(2, 6, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match=r"3 new tokens after 6 cached exceed the cache's max_len=8"):
        decode_step(net, torch.zeros(2, 3, dtype=torch.int64), cache)
    assert cache.length == 6  # a refused step changes nothing


# ---------------------------------------------------------------- the artifact's int6 layers as QuantLinear

def _artifact(net, cfg, path, config_dict=None):
    quantized = quantize_state_dict(net.state_dict(), cfg.quant_small_numel)  # round-to-nearest
    art.write_artifact(path, quantized, config_dict or cfg.to_dict(), quality=5)  # a scratch file: size irrelevant
    return quantized


def _int6_layers(cfg):
    return 6 * (cfg.num_flat_layers + 1)


def test_quant_linear_model_matches_the_dequantized_model(small, tmp_path):
    cfg, net = small
    path = tmp_path / "small.ptz"
    quantized = _artifact(net, cfg, path)
    dequantized, _ = load_model(path)  # CPU default: the fp32 reference
    swapped, _ = load_model(path, quant_linear=True)
    assert not any(isinstance(m, QuantLinear) for m in dequantized.modules())
    layers = {name: m for name, m in swapped.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == _int6_layers(cfg)
    for name, layer in layers.items():  # the stored codes, kept 6-bit (3 bytes per 4 weights)
        stored = quantized[f"{name}.weight"]
        assert torch.equal(layer.codes(), stored.codes) and torch.equal(layer.scale, stored.scale), name
        assert layer.packed.dtype == torch.uint8 and layer.packed.shape[0] == 3
    assert not any(n.endswith(("mlp.fc.weight", "attn.c_q.weight")) for n, _ in swapped.named_parameters())
    assert all(m.unfused for m in swapped.modules() if isinstance(m, MLP))
    torch.manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(swapped(ids), dequantized(ids), atol=1e-5, rtol=1e-5)
        # and the cached decode runs on it (QuantLinear through block.mlp and the attention projections)
        torch.testing.assert_close(_decode_in_chunks(swapped, ids, [20, 1, 1, 10]), dequantized(ids),
                                   atol=ATOL, rtol=RTOL)


def test_quant_linear_triton_kernel_matches_the_dequantized_model(tmp_path):
    """KERNELS=triton (the interpreter on CPU): the int6 kernel in every layer, including the M = 1 decode path."""
    # head_dim 64: the smallest the attention kernel takes
    cfg = model.from_env(environ={}, preset="tiny", model_dim=64, num_heads=1, num_kv_heads=1, num_flat_layers=2,
                         bigram_vocab_size=64, bigram_dim=16, inst_dim=4, crawler_loops=2, quant_small_numel=256)
    net = _noisy(cfg, seed=4)
    path = tmp_path / "smallest.ptz"
    _artifact(net, cfg, path)
    dequantized, _ = load_model(path)
    swapped, _ = load_model(path, quant_linear=True)
    assert sum(isinstance(m, QuantLinear) for m in swapped.modules()) == _int6_layers(cfg)
    torch.manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        reference = dequantized(ids)  # torch backend
        kernels.set_backend("triton")
        logits = swapped(ids)
        decoded = _decode_in_chunks(swapped, ids, [13, 1, 1, 1])
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(decoded, reference, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA default of load_model")
def test_load_model_uses_quant_linear_by_default_on_cuda(small, tmp_path):
    cfg, net = small
    path = tmp_path / "small.ptz"
    _artifact(net, cfg, path)
    swapped, _ = load_model(path, "cuda")
    assert sum(isinstance(m, QuantLinear) for m in swapped.modules()) == _int6_layers(cfg)


# ---------------------------------------------------------------- sampling

def test_sample_next_greedy_and_top_k():
    torch.manual_seed(6)
    logits = torch.randn(1, 50) * 2
    assert gen.sample_next(logits, 0.0, 0, None).item() == logits.argmax().item()
    assert gen.sample_next(logits, 1.0, 1, None).item() == logits.argmax().item()
    # top-k 3 at temperature 0.7: draws follow softmax(logits/0.7) renormalized over the 3 largest
    g = torch.Generator().manual_seed(7)
    draws = gen.sample_next(logits.expand(20000, -1), 0.7, 3, g)
    top = logits[0].topk(3).indices
    assert set(draws.unique().tolist()) <= set(top.tolist())
    expected = (logits[0, top] / 0.7).softmax(-1)
    observed = torch.stack([(draws == t).float().mean() for t in top])
    torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)  # ~4.5 binomial std devs at n = 20000


@pytest.mark.parametrize("temperature, top_k, message", [(-0.5, 0, "temperature=-0.5: must be >= 0"),
                                                         (math.nan, 0, "temperature=nan"),
                                                         (1.0, -1, "top_k=-1: must be >= 0")])
def test_sample_next_refuses_bad_settings(temperature, top_k, message):
    with pytest.raises(ValueError, match=message):
        gen.sample_next(torch.zeros(1, 4), temperature, top_k, None)


# ---------------------------------------------------------------- generation from the trained artifact

@pytest.fixture(scope="module")
def trained_artifact(request, tmp_path_factory):
    """(artifact path, QuantLinear model, tokenizer) from the tiny_run model, quantized by round-to-nearest."""
    run_dir = request.getfixturevalue("tiny_run")
    net = model.load_checkpoint(run_dir / "final_model.pt")
    path = tmp_path_factory.mktemp("generate") / art.ARTIFACT_NAME
    _artifact(net, net.config, path)
    swapped, cfg = load_model(path, quant_linear=True)
    return path, swapped.eval(), spm.SentencePieceProcessor(model_file=cfg.tokenizer_path)


def _full_forward_generation(net, prompt, n, temperature, top_k, seed):
    """The reference: recompute the whole sequence's logits for every new token, draw from the same generator."""
    g = torch.Generator().manual_seed(seed)
    ids = prompt
    for _ in range(n):
        with torch.no_grad():
            logits = net(ids)[:, -1]
        ids = torch.cat((ids, gen.sample_next(logits, temperature, top_k, g)[:, None]), dim=1)
    return ids[:, prompt.shape[1]:]


def test_generation_is_deterministic_and_matches_the_full_forward(trained_artifact):
    _, net, sp = trained_artifact
    prompt = torch.tensor([gen.encode_prompt(sp, "The President said that")])
    first = gen.generate(net, prompt, 24, temperature=1.0, top_k=20, seed=123)
    again = gen.generate(net, prompt, 24, temperature=1.0, top_k=20, seed=123)
    other = gen.generate(net, prompt, 24, temperature=1.0, top_k=20, seed=124)
    assert first.tokens.shape == (1, 24)
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, other.tokens)
    assert torch.equal(first.tokens, _full_forward_generation(net, prompt, 24, 1.0, 20, seed=123))
    greedy = gen.generate(net, prompt, 12, temperature=0.0)
    assert torch.equal(greedy.tokens, _full_forward_generation(net, prompt, 12, 0.0, 0, seed=0))
    assert math.isfinite(first.tokens_per_second) and first.tokens_per_second > 0


def test_generation_stops_at_bos(trained_artifact):
    _, net, sp = trained_artifact
    prompt = torch.tensor([gen.encode_prompt(sp, "Hello")])
    greedy = gen.generate(net, prompt, 6, temperature=0.0).tokens[0].tolist()
    stopped = gen.generate(net, prompt, 6, temperature=0.0, stop_id=greedy[2])  # the 3rd token as the stop token
    assert stopped.stopped_at_bos and stopped.tokens[0].tolist() == greedy[:3]


def test_prompt_starts_with_bos_like_training_documents(trained_artifact):
    _, _, sp = trained_artifact
    assert gen.encode_prompt(sp, "Hello world") == [1] + sp.encode("Hello world")
    assert gen.encode_prompt(sp, "") == [1]


def test_cli_prints_text_and_tokens_per_second(trained_artifact, capsys):
    path, _, _ = trained_artifact
    argv = ["--artifact", str(path), "--prompt", "The", "--tokens", "8", "--seed", "5", "--no-stop", "--device", "cpu"]
    assert gen.main(argv) == 0
    first = capsys.readouterr().out
    assert gen.main(argv) == 0
    second = capsys.readouterr().out
    text, stats = first.rsplit("\n[", 1)
    assert text.startswith("The") and text == second.rsplit("\n[", 1)[0]  # same seed, same text
    assert "8 tokens" in stats and "tokens/s on cpu, dequantized fp32 weights" in stats


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 QuantLinear decode on CUDA")
def test_cuda_decode_on_quant_linear_is_within_the_bf16_forward_error(trained_artifact):
    """On CUDA the artifact decodes through QuantLinear's M = 1 kernel under bf16 autocast: its error against
    the fp32 dequantized forward is held to twice the error of the bf16 full forward (Triton kernels too)."""
    path, _, _ = trained_artifact
    reference_net, cfg = load_model(path, "cpu", quant_linear=False)
    net, _ = load_model(path, "cuda")
    torch.manual_seed(8)
    ids = torch.randint(0, cfg.vocab_size, (1, 64))
    with torch.no_grad():
        reference = reference_net(ids)
        kernels.set_backend("triton")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            forward = net(ids.cuda()).float().cpu()
            decoded = _decode_in_chunks(net, ids.cuda(), [40] + [1] * 24).float().cpu()

    def rel_rms(x):
        return ((x - reference).pow(2).mean() / reference.pow(2).mean()).sqrt().item()

    assert torch.isfinite(decoded).all()
    assert rel_rms(decoded) <= 2 * rel_rms(forward) + 1e-3, (rel_rms(decoded), rel_rms(forward))


def test_cli_errors_name_what_is_missing(trained_artifact, small, tmp_path, capsys):
    path, _, _ = trained_artifact
    assert gen.main(["--artifact", str(tmp_path / "nope.ptz")]) == 2
    assert f"artifact {tmp_path / 'nope.ptz'}: no such file" in capsys.readouterr().err
    assert gen.main(["--artifact", str(path), "--tokenizer", str(tmp_path / "tok.model")]) == 2
    assert f"tokenizer {tmp_path / 'tok.model'}: no such file (from --tokenizer" in capsys.readouterr().err
    cfg, net = small  # an artifact whose stored TOKENIZER_PATH does not exist
    stored = dict(cfg.to_dict(), tokenizer_path=str(tmp_path / "gone.model"))
    _artifact(net, cfg, tmp_path / "small.ptz", stored)
    assert gen.main(["--artifact", str(tmp_path / "small.ptz")]) == 2
    assert "gone.model: no such file (the artifact's stored TOKENIZER_PATH" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.ptz"
    corrupt.write_bytes(path.read_bytes()[:-10])
    assert gen.main(["--artifact", str(corrupt)]) == 2
    assert f"{corrupt}: truncated" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse refuses it
        gen.main(["--artifact", str(path), "--temperature", "-1"])
    assert stop.value.code == 2
    assert "argument --temperature: must be a finite number >= 0, got '-1'" in capsys.readouterr().err
