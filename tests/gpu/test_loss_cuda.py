"""On CUDA, the memory-efficient MTP loss gives the naive loss's value and its gradients, in fp32 and in
bf16 (tests/unit/test_loss.py on CPU)."""

from dataclasses import replace

import pytest
import torch

from mtp_pretrain.build import build_model
from mtp_pretrain.config import ModelConfig, MTPConfig
from mtp_pretrain.model.mtp_model import transformer_config
from tests.builders import VOCAB, random_batch
from tests.numerics import EPS32, EPS_BF16, assert_same_gradient, assert_within_ulps

N = 4


def _naive_and_efficient(cfg: ModelConfig, chunk: int, bf16: bool) -> list[torch.nn.Module]:
    """Both loss paths over the same weights, built on the GPU (bf16: megatron's params_dtype, as training)."""
    torch.manual_seed(0)
    naive = MTPConfig(n=N, memory_efficient=False, loss_weights=[1.0 + 0.5 * i for i in range(N)])
    mtps = (naive, replace(naive, memory_efficient=True, chunk_size=chunk))
    models = [build_model(cfg, m, VOCAB, transformer_config(cfg, m, bf16=bf16)).cuda() for m in mtps]
    models[1].load_state_dict(models[0].state_dict())
    return models


@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_memory_efficient_gradients_equal_naive_on_cuda(dist_world, tiny_model_cfg, chunk, bf16):
    models = _naive_and_efficient(tiny_model_cfg, chunk, bf16)
    tokens, valid = (t.cuda() for t in random_batch(tiny_model_cfg, N, padded=True))
    losses = []
    for model in models:
        loss, _ = model(tokens, valid)
        (2.5 * loss).backward()  # an outer scale (grad accumulation, loss scaling) reaches every gradient
        losses.append(loss.float())
    grads = [dict(m.named_parameters()) for m in models]
    assert grads[0].keys() == grads[1].keys()
    if not bf16:
        # fp32 (TF32 off, tests/gpu/conftest.py): the CPU test's bounds, reordered CE sums over <= 72
        # positions per head (16 ulps of the loss) and reordered per-chunk dW sums (assert_same_gradient)
        torch.testing.assert_close(losses[1], losses[0], rtol=16 * EPS32, atol=0)
        for name, p in grads[1].items():
            assert_same_gradient(p.grad, grads[0][name].grad, name)
        return
    # bf16: the CE is fp32 in both paths over the same bf16 logits, other matmul shapes when chunked
    # (cuBLAS may round a chunk's logits differently by one bf16 ulp): 2 bf16 ulps of the loss
    torch.testing.assert_close(losses[1], losses[0], rtol=2 * EPS_BF16, atol=0)
    # bf16 gradients: both paths sum the heads' contributions in bf16 in another order (n=4 heads, chunks),
    # each sum rounding by half a bf16 ulp of the running total, carried back through the blocks: 8 bf16
    # ulps of each tensor's largest entry (6%; measured <= 1.7 with CPU bf16 kernels); a missing head or a
    # wrong scale is off by 25% or more
    for name, p in grads[1].items():
        assert_within_ulps(p.grad.float(), grads[0][name].grad.float(), 8, eps=EPS_BF16, name=name)
