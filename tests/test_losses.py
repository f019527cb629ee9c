"""Each loss against a small hand-computed reference; gather-with-gradient against one large batch."""

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.losses import gather_with_grad, itc_loss, itg_loss, itm_loss, lm_labels, lm_loss, sample_hard_negatives


def test_itc_two_pairs_by_hand():
    # Two images with two queries each, two texts; unit vectors in 2-D.
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    temp = torch.tensor(0.5)
    # max over queries: image0 vs text0 = 1, vs text1 = 1; image1 vs text0 = 0.6, vs text1 = 0.8
    s = torch.tensor([[1.0, 1.0], [0.6, 0.8]]) / 0.5
    i2t = (-math.log(math.exp(s[0, 0]) / (math.exp(s[0, 0]) + math.exp(s[0, 1])))
           - math.log(math.exp(s[1, 1]) / (math.exp(s[1, 0]) + math.exp(s[1, 1])))) / 2
    t2i = (-math.log(math.exp(s[0, 0]) / (math.exp(s[0, 0]) + math.exp(s[1, 0])))
           - math.log(math.exp(s[1, 1]) / (math.exp(s[0, 1]) + math.exp(s[1, 1])))) / 2
    out = itc_loss(img, txt, temp)
    assert out["itc_loss"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    torch.testing.assert_close(out["sim_i2t"], s)
    torch.testing.assert_close(out["sim_t2i"], s.T)


def test_itc_label_smoothing_by_hand():
    img = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    eps = 0.2
    # each row: logits [1, 0]/1 (correct first) -> smoothed targets [1-eps+eps/2, eps/2]
    logp = torch.tensor([1.0, 0.0]).log_softmax(0)
    want = -((1 - eps / 2) * logp[0] + (eps / 2) * logp[1])
    got = itc_loss(img, txt, torch.tensor(1.0), label_smoothing=eps)["itc_loss"]
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_hard_negatives_never_pick_the_positive_and_follow_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.tensor([[5.0, 4.0, -9.0], [0.0, 5.0, -9.0], [-9.0, 4.0, 5.0]])
    picks = torch.stack([sample_hard_negatives(sim, sim.T, g)[0] for _ in range(300)])
    assert not (picks == torch.arange(3)).any()
    assert (picks[:, 0] == 1).float().mean() > 0.99  # text 0's hardest other image is image 1
    again = sample_hard_negatives(sim, sim.T, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(again, sample_hard_negatives(sim, sim.T, torch.Generator().manual_seed(7))))
    ids = torch.tensor([10, 10, 11])  # images 0 and 1 are the same picture: both positives for texts 0, 1
    for _ in range(50):
        neg_img, _ = sample_hard_negatives(sim, sim.T, g, image_ids=ids, all_image_ids=ids)
        assert neg_img[0] == 2 and neg_img[1] == 2


def test_itm_by_hand():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])
    lp = logits.log_softmax(-1)
    want = -(lp[0, 1] + lp[1, 0] + lp[2, 0]) / 3
    assert itm_loss(logits)["itm_loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_itg_and_lm_by_hand():
    logits = torch.log(torch.tensor([[[0.1, 0.7, 0.2], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4]]]))
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[1, 1, 0]])  # the last token is padding
    assert itg_loss(logits, ids, mask, label_smoothing=0.0)["itg_loss"].item() == pytest.approx(-math.log(0.7), rel=1e-6)
    labels = lm_labels(ids, torch.ones_like(ids), torch.tensor([2]))  # prompt = first two tokens
    assert labels.tolist() == [[-100, -100, 2]]
    assert lm_loss(logits, labels)["lm_loss"].item() == pytest.approx(-math.log(0.25), rel=1e-6)


def _worker(rank, world, init_file, x_all, txt_all, temp, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    B = x_all.shape[0] // world
    x = x_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    t = txt_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    loss = itc_loss(F.normalize(x, dim=-1), F.normalize(t, dim=-1), temp, rank, world)["itc_loss"]
    loss.backward()
    from safetensors.torch import save_file

    save_file({"gx": x.grad, "gt": t.grad, "loss": loss.detach()[None]}, os.path.join(out_dir, f"{rank}.safetensors"))
    dist.destroy_process_group()


def test_gather_with_gradient_matches_one_big_batch():
    torch.manual_seed(0)
    world, B = 2, 3
    x_all, txt_all, temp = torch.randn(world * B, 4, 5), torch.randn(world * B, 5), torch.tensor(0.1)
    x = x_all.clone().requires_grad_(True)
    t = txt_all.clone().requires_grad_(True)
    big = itc_loss(F.normalize(x, dim=-1), F.normalize(t, dim=-1), temp)["itc_loss"]
    big.backward()
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, os.path.join(d, "init"), x_all, txt_all, temp, d), nprocs=world,
                           start_method="spawn")
        from safetensors.torch import load_file

        res = [load_file(os.path.join(d, f"{r}.safetensors")) for r in range(world)]
    # DDP averages per-rank gradients over ranks: (1/W) * rank's gradient == the big batch's gradient.
    for r in range(world):
        torch.testing.assert_close(res[r]["gx"] / world, x.grad[r * B : (r + 1) * B], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(res[r]["gt"] / world, t.grad[r * B : (r + 1) * B], atol=1e-6, rtol=1e-5)
    assert sum(float(r["loss"]) for r in res) / world == pytest.approx(big.item(), rel=1e-5)


def test_gather_is_identity_on_one_process():
    x = torch.randn(2, 3)
    assert gather_with_grad(x, 0, 1) is x
