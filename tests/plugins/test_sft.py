import math

import torch

from dare_plugins.sft.loss import forward_noise, masked_diffusion_loss


def test_masked_diffusion_loss_hand_computed():
    """Two rows, vocab 3.

    Row 0: answer length 2, p_mask 0.5, masked position 1 (target 2), logits (0, 0, ln 2)
        CE = -log(2/4) = ln 2; L0 = ln2 / 0.5 / 2 = ln 2.
    Row 1: answer length 4, p_mask 0.25, masked positions 0 (target 0, logits 0,0,0: CE ln 3)
        and 2 (target 1, logits (0, ln 2, 0): CE = -log(2/4) = ln 2);
        L1 = (ln3 + ln2) / 0.25 / 4 = ln 6.
    """
    logits = torch.zeros(2, 3, 3)
    logits[0, 1, 2] = math.log(2)
    logits[1, 2, 1] = math.log(2)
    targets = torch.tensor([[0, 2, 0], [0, 0, 1]])
    masked = torch.tensor([[False, True, False], [True, False, True]])
    loss = masked_diffusion_loss(logits, targets, masked, torch.tensor([0.5, 0.25]), torch.tensor([2, 4]))
    torch.testing.assert_close(loss, torch.tensor([math.log(2), math.log(6)]))


def test_forward_noise_keeps_prompt_and_depends_only_on_row_seed():
    ids = torch.arange(40).reshape(2, 20)
    loss_mask = torch.arange(20)[None].expand(2, 20) >= 5
    noisy, masked, p = forward_noise(ids, loss_mask, torch.tensor([7, 8]), mask_id=99)
    assert not masked[:, :5].any()
    assert torch.equal(noisy[masked], torch.full((int(masked.sum()),), 99))
    assert torch.equal(noisy[~masked], ids[~masked])
    # row 1 alone with the same seed gets the same noise
    n1, m1, p1 = forward_noise(ids[1:], loss_mask[1:], torch.tensor([8]), mask_id=99)
    assert torch.equal(n1[0], noisy[1]) and p1[0] == p[1]
    assert (0.001 <= p).all() and (p <= 1).all()


def test_mask_rate_follows_p_mask():
    ids = torch.zeros(64, 400, dtype=torch.long)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    _, masked, p = forward_noise(ids, loss_mask, torch.arange(64), mask_id=1)
    torch.testing.assert_close(masked.float().mean(1), p, atol=0.08, rtol=0)
