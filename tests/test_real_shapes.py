"""Every Triton op at the shapes the real run uses, against its reference with the same bars as the small
odd shapes of its own test file (forward and every gradient, bf16 and fp32). CUDA only: `make gpu-check`
runs this file first; on the CPU the interpreter would take hours at these sizes.

One GPU's share of the 8-GPU step: 48 sequences of 2048 tokens (M = 98,304), model dim 512, MLP hidden
1536 (flat blocks) and 3072 (the crawler), 8 query and 4 KV heads of 64, vocab 1024; int6 at M = 1 and 16
(decoding) and 98,304; GPTQ on a 512 x 1536 layer.
"""
import pytest
import torch

from conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="real shapes run on a GPU (make gpu-check)")

BATCH, SEQ, DIM, VOCAB = 48, 2048, 512, 1024
TOKENS = BATCH * SEQ
BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("hidden, dtype", [(1536, BF16), (3072, BF16), (1536, FP32), (3072, FP32)])
def test_mlp(hidden, dtype):
    from test_mlp import _compare_to_reference

    _compare_to_reference((BATCH, SEQ), DIM, hidden, 0.5, dtype)


@pytest.mark.parametrize("xsa, dtype", [(True, BF16), (False, BF16), (True, FP32), (False, FP32)])
def test_attention(xsa, dtype):
    from test_attention import _compare_to_reference

    _compare_to_reference(BATCH, SEQ, 8, 4, 64, xsa, dtype)


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_head(dtype):
    from test_head import _compare_to_reference

    _compare_to_reference(TOKENS, DIM, VOCAB, dtype)


@pytest.mark.parametrize("op", ["mix_norm", "add_norm", "rms_norm"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "autocast"])
def test_norm(op, precision):
    from test_norm import _compare_to_reference

    _compare_to_reference(op, (BATCH, SEQ), DIM, precision)


@pytest.mark.parametrize("m", [1, 16, TOKENS])
@pytest.mark.parametrize("n, k", [(1536, DIM), (DIM, 1536)])
def test_int6(m, n, k):
    from kernels.int6 import int6_matmul_reference, int6_matmul_torch, int6_matmul_triton, pack_int6_planes
    from test_int6 import _layer, assert_bf16_close, assert_fp32_close

    codes, scale = _layer(n, k, seed=m + n)
    packed = pack_int6_planes(codes)
    x = torch.randn(m, k, device=DEVICE)
    assert_fp32_close(int6_matmul_triton(x, packed, scale, k), int6_matmul_reference(x, packed, scale, k),
                      f"int6 fp32 M={m} {n}x{k}")
    xb = x.bfloat16().requires_grad_()
    out = int6_matmul_triton(xb, packed, scale, k)
    ref_x = xb.detach().float().requires_grad_()
    ref = int6_matmul_reference(ref_x, packed, scale, k)
    plain_x = xb.detach().clone().requires_grad_()
    plain = int6_matmul_torch(plain_x, packed, scale, k)
    assert_bf16_close(out, plain, ref, f"int6 bf16 M={m} {n}x{k}")
    dy = torch.randn(m, n, device=DEVICE)
    out.backward(dy.bfloat16())
    ref.backward(dy.bfloat16().float())
    plain.backward(dy.bfloat16())
    assert_bf16_close(xb.grad, plain_x.grad, ref_x.grad, f"int6 dx bf16 M={m} {n}x{k}")


@pytest.mark.parametrize("block_size, order, inverse, damping", [(128, "descending", "cholesky", 0.01),
                                                                 (64, "ascending", "plain", 0.002)])
def test_gptq(block_size, order, inverse, damping):
    from kernels.gptq import quantize_layer_triton
    from quant.gptq import quantize_layer, row_scales
    from test_gptq import _calibration, _weight, compare_codes

    h = _calibration(1536, dead=[5, 700], seed=1)
    w = _weight(DIM, 1536, 0.05, seed=2)
    scale = row_scales(w)
    options = dict(block_size=block_size, order=order, inverse=inverse, damping=damping)
    compare_codes(quantize_layer_triton(w, h, scale, **options), quantize_layer(w, h, scale, **options),
                   f"GPTQ {DIM}x1536 {options}")
