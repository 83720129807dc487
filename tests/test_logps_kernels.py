"""The Triton token-logp passes equal log_softmax in float64: logps, entropies and gradients (GPU only)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from flywheel.trainer import logps_kernels  # noqa: E402
from flywheel.trainer.logprobs import token_logps_and_entropy  # noqa: E402

# The CPU only runs these under TRITON_INTERPRET=1 (conftest skips them there otherwise).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QWEN_VOCAB = 151_936
# (rows, vocabulary): one row; a few hundred rows of an odd vocabulary that no block divides; Qwen's.
SHAPES = [(1, QWEN_VOCAB), (300, 1000), (200, QWEN_VOCAB)]


def random_batch(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """Logits spread like an LM head's (some rows peaked, some flat), token ids and an upstream gradient
    that is zero on a quarter of the rows, as on padding."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.rand(rows, 1, generator=gen) * 6
    logits = (torch.randn(rows, vocab, generator=gen) * spread).to(dtype)
    token_ids = torch.randint(0, vocab, (rows,), generator=gen)
    grad_logps = torch.randn(rows, generator=gen) * (torch.rand(rows, generator=gen) > 0.25)
    return logits.to(DEVICE), token_ids.to(DEVICE), grad_logps.to(DEVICE)


def reference(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, grad_logps: torch.Tensor):
    """logps, entropies and d(Σ grad·logps)/d logits from log_softmax in float64."""
    scaled = logits.double().requires_grad_() / temperature
    log_probs = scaled.log_softmax(-1)
    probs = log_probs.exp()
    entropy = -torch.where(probs > 0, probs * log_probs, 0.0).sum(-1)
    logps = log_probs.gather(-1, token_ids[:, None]).squeeze(-1)
    (grad_logits,) = torch.autograd.grad(logps, scaled, grad_logps.double())
    return logps.detach(), entropy.detach(), grad_logits / temperature


def kernel_passes(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, grad_logps: torch.Tensor,
                  with_entropy: bool = True):
    """logps, entropies and the logits' gradient from the two kernels."""
    logsumexp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    logps = torch.empty_like(logsumexp)
    entropy = torch.empty_like(logsumexp) if with_entropy else None
    logps_kernels.forward(logits, token_ids, temperature, logsumexp, logps, entropy)
    grad_logits = torch.empty_like(logits)
    logps_kernels.backward(logits, token_ids, temperature, logsumexp, grad_logps, grad_logits)
    return logps, entropy, grad_logits


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logps_entropy_and_gradient_match_log_softmax(shape, temperature, dtype):
    logits, token_ids, grad_logps = random_batch(*shape, dtype)
    ref_logps, ref_entropy, ref_grad = reference(logits, token_ids, temperature, grad_logps)

    logps, entropy, grad_logits = kernel_passes(logits, token_ids, temperature, grad_logps)

    torch.testing.assert_close(logps.double(), ref_logps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-4, atol=1e-4)
    assert grad_logits.dtype == dtype
    # float32 math then one rounding to the logits' dtype: within one unit in the last place of it.
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grad_logits.double(), ref_grad, rtol=ulp, atol=1e-9)
    assert (grad_logits[grad_logps == 0] == 0).all()


@pytest.mark.gpu
def test_masked_vocabulary_gives_finite_entropy():
    logits, token_ids, grad_logps = random_batch(4, 1000, torch.float32)
    logits[:, 500:] = float("-inf")
    token_ids %= 500
    ref_logps, ref_entropy, _ = reference(logits, token_ids, 1.0, grad_logps)

    logps, entropy, _ = kernel_passes(logits, token_ids, 1.0, grad_logps)

    torch.testing.assert_close(logps.double(), ref_logps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_no_rows_and_no_entropy():
    logits = torch.zeros(0, 1000, dtype=torch.bfloat16, device=DEVICE)
    token_ids = torch.zeros(0, dtype=torch.long, device=DEVICE)

    logps, entropy, grad_logits = kernel_passes(logits, token_ids, 0.7, torch.zeros(0, device=DEVICE),
                                                with_entropy=False)

    assert logps.shape == (0,) and entropy is None and grad_logits.shape == (0, 1000)


@pytest.mark.gpu
def test_gpu_logits_take_the_kernels_through_autograd():
    logits, token_ids, grad_logps = random_batch(6, 1000, torch.bfloat16)
    ref_logps, ref_entropy, ref_grad = reference(logits, token_ids, 0.7, grad_logps)
    leaf = logits.view(2, 3, 1000).clone().requires_grad_()

    logps, entropy = token_logps_and_entropy(leaf, token_ids.view(2, 3), temperature=0.7, with_entropy=True)
    logps.backward(grad_logps.view(2, 3))

    assert logps.dtype == entropy.dtype == torch.float32 and not entropy.requires_grad
    torch.testing.assert_close(logps.flatten().double(), ref_logps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.flatten().double(), ref_entropy, rtol=1e-4, atol=1e-4)
    assert leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(leaf.grad.view(6, 1000).double(), ref_grad, rtol=2**-7, atol=1e-9)
