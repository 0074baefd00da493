"""The original's recovery and KD behaviour by default, the project's former variants as options:
boundary_student, zo_space, inversion_augment (synthesis.recover) and kd_augment (methods.kd)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import methods.kd as kd
import synthesis.recover as rec
from dataset import normalize, random_crop_flip
from dataset.specs import DatasetSpec
from synthesis import ZOConfig
from synthesis.recover import recover

from conftest import DEVICE

STD = (0.2, 0.4, 0.8)           # distinct per channel: a pixel-space perturbation is then visibly anisotropic
MEAN = (0.3, 0.5, 0.7)


def tiny_spec(size: int = 8) -> DatasetSpec:
    return DatasetSpec("tiny", "tiny", size, 3, MEAN, STD, (3, 0, 0), 0, "", 1)


class FakeAPI:
    """softmax(W n) on normalised images n; records every batch it is asked about."""

    def __init__(self, way: int = 3, size: int = 8, white_box: bool = False, seed: int = 0):
        self.spec = tiny_spec(size)
        self.classes = list(range(way))
        self.device = DEVICE
        self.white_box = white_box
        g = torch.Generator().manual_seed(seed)     # drawn on the CPU: the same weights on any device
        self.w = (torch.randn(way, 3 * size * size, generator=g) * 0.05).to(DEVICE)
        self.calls: list[torch.Tensor] = []

    def logits(self, xn: torch.Tensor) -> torch.Tensor:
        return xn.flatten(1) @ self.w.t()

    def __call__(self, xn: torch.Tensor) -> torch.Tensor:
        self.calls.append(xn.detach().clone())
        p = F.softmax(self.logits(xn), 1)
        return p if self.white_box else p.detach()

    @property
    def queries(self) -> int:
        return sum(len(c) for c in self.calls)


class CountingStudent:
    """A linear student on [0, 1] images that records the batch size of each call."""

    def __init__(self, way: int = 3, size: int = 8):
        self.theta = (torch.randn(way, 3 * size * size, generator=torch.Generator().manual_seed(1)) * 0.05).to(DEVICE)
        self.theta.requires_grad_()
        self.sizes: list[int] = []
        self.grad_enabled: list[bool] = []

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x01.shape[0])
        self.grad_enabled.append(torch.is_grad_enabled())
        return x01.flatten(1) @ self.theta.t()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


# ------------------------------------------------------------------ boundary_student

def test_clean_student_runs_once_per_step_on_the_clean_batch():
    api, st = FakeAPI(), CountingStudent()
    steps, q, n = 3, 6, 3 * 2
    recover(api, 2, steps=steps, zo=ZOConfig(q=q, mu=0.005, numsplit=3), student=st, adv=1.0, nz=8,
            generator=gen())
    assert st.sizes == [n] * steps
    assert api.queries == steps * (q + 1) * n                 # the query count does not change

    api, st = FakeAPI(), CountingStudent()
    recover(api, 2, steps=steps, zo=ZOConfig(q=q, mu=0.005, numsplit=3), student=st, adv=1.0, nz=8,
            generator=gen(), boundary_student="perturbed")
    assert sum(st.sizes) == steps * (q + 1) * n and len(st.sizes) == steps * (q + 1)
    assert api.queries == steps * (q + 1) * n


def test_white_box_student_is_detached_unless_perturbed():
    st = CountingStudent()
    recover(FakeAPI(white_box=True), 2, steps=2, zo=None, student=st, adv=1.0, nz=8, generator=gen())
    assert st.sizes == [6, 6] and st.grad_enabled == [False, False]
    st = CountingStudent()
    recover(FakeAPI(white_box=True), 2, steps=2, zo=None, student=st, adv=1.0, nz=8, generator=gen(),
            boundary_student="perturbed")
    assert st.sizes == [6, 6] and st.grad_enabled == [True, True]
    assert st.theta.grad is None


def test_bad_option_values_raise():
    with pytest.raises(ValueError, match="boundary_student"):
        recover(FakeAPI(), 1, steps=1, zo=ZOConfig(q=1), boundary_student="noisy")
    with pytest.raises(ValueError, match="zo_space"):
        recover(FakeAPI(), 1, steps=1, zo=ZOConfig(q=1), zo_space="latent")
    with pytest.raises(ValueError, match="inversion_augment"):
        kd.KDSettings(inversion_augment="task")


# ------------------------------------------------------------------ zo_space

def perturbation_norms(api: FakeAPI, n: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(|n' - n| per perturbed copy, |(n' - n) * std| per copy) for a one-step recovery's API calls."""
    clean, rest = api.calls[0], torch.cat(api.calls[1:])
    assert clean.shape[0] == n and rest.shape[0] == q * n
    diff = (rest.reshape(q, n, -1) - clean.reshape(1, n, -1)).reshape(q * n, *clean.shape[1:])
    std = torch.tensor(STD, device=clean.device).view(1, 3, 1, 1)
    return diff.flatten(1).norm(dim=1), (diff * std).flatten(1).norm(dim=1)


def test_perturbations_have_radius_mu_in_the_chosen_space():
    mu, q, n = 0.01, 5, 6
    api = FakeAPI()
    recover(api, 2, steps=1, zo=ZOConfig(q=q, mu=mu, numsplit=2), nz=8, generator=gen())
    in_norm, in_pixels = perturbation_norms(api, n, q)
    torch.testing.assert_close(in_norm, torch.full_like(in_norm, mu), rtol=2e-3, atol=0)
    assert not torch.allclose(in_pixels, torch.full_like(in_pixels, mu), rtol=0.05)
    std, mean = (torch.tensor(v, device=DEVICE).view(1, 3, 1, 1) for v in (STD, MEAN))
    x01 = api.calls[0] * std + mean
    assert x01.min() > -1e-5 and x01.max() < 1 + 1e-5      # the clean call is a normalised [0, 1] image

    api = FakeAPI()
    recover(api, 2, steps=1, zo=ZOConfig(q=q, mu=mu, numsplit=2), nz=8, generator=gen(), zo_space="pixel")
    in_norm, in_pixels = perturbation_norms(api, n, q)     # n' - n = mu u / std: mu once scaled back by std
    torch.testing.assert_close(in_pixels, torch.full_like(in_pixels, mu), rtol=2e-3, atol=0)
    assert (in_norm > 1.2 * mu).all()


@pytest.mark.parametrize("zo_space", ["normalized", "pixel"])
def test_estimate_is_the_gradient_of_the_augmented_image(zo_space, monkeypatch):
    """The estimate handed to the surrogate is dL/dx~ for the [0, 1] image x~ (after the chain rule
    through the normaliser): compared with autograd on the fake API's smooth loss."""
    seen = {}
    real = rec.surrogate

    def spy(x, g):
        seen["x"], seen["g"] = x.detach().clone(), g.detach().clone()
        return real(x, g)
    monkeypatch.setattr(rec, "surrogate", spy)
    api = FakeAPI(seed=3)
    per_class, q = 2, 6000                  # d = 192: expected cosine ~ sqrt(q / (q + d)) ~ 0.98
    recover(api, per_class, steps=1, zo=ZOConfig(q=q, mu=1e-3, numsplit=4), nz=8, generator=gen(2),
            zo_space=zo_space)
    x = seen["x"].double().requires_grad_()
    target = torch.arange(3, device=DEVICE).repeat_interleave(per_class)
    w = api.w.double()
    xn = normalize(x, MEAN, STD)
    F.cross_entropy(xn.flatten(1) @ w.t(), target, reduction="sum").backward()
    g, true = seen["g"].double().flatten(1), x.grad.flatten(1)
    cos = F.cosine_similarity(g, true, dim=1)
    assert (cos > 0.9).all(), cos
    proj = (g * true).sum(1) / (true * true).sum(1)          # ~1 when the scale (1 / std) is right
    assert ((proj > 0.85) & (proj < 1.15)).all(), proj


# ------------------------------------------------------------------ inversion_augment

def crop_flip_params(x: torch.Tensor, out: torch.Tensor, pad: int) -> list[set]:
    """For each image, the (row offset, column offset, flip) draws that explain out[i] from x[i]."""
    xp = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    found = []
    for i in range(len(x)):
        ok = set()
        for oy in range(2 * pad + 1):
            for ox in range(2 * pad + 1):
                crop = xp[i, :, oy:oy + h, ox:ox + w]
                for flip in (False, True):
                    if torch.equal(crop.flip(-1) if flip else crop, out[i]):
                        ok.add((oy, ox, flip))
        assert ok, f"image {i} is not a crop/flip of its input"
        found.append(ok)
    return found


def test_batch_mode_draws_one_crop_and_flip_for_the_whole_batch():
    x = torch.rand(16, 3, 8, 8, device=DEVICE)
    draws = set()
    for seed in range(12):
        found = crop_flip_params(x, random_crop_flip(x, pad=2, generator=gen(seed), per="batch"), pad=2)
        common = set.intersection(*found)
        assert len(common) == 1                              # one draw explains every image
        draws |= common
    assert len(draws) > 3 and {f for *_, f in draws} == {False, True}
    per_image = crop_flip_params(x, random_crop_flip(x, pad=2, generator=gen(0), per="image"), pad=2)
    assert not set.intersection(*per_image)                  # 16 independent draws never all agree here
    xg = x.clone().requires_grad_()
    random_crop_flip(xg, per="batch").sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="per"):
        random_crop_flip(x, per="pixel")


def test_recover_passes_its_inversion_augment_option(monkeypatch):
    modes = []
    real = rec.random_crop_flip
    monkeypatch.setattr(rec, "random_crop_flip", lambda x, **k: modes.append(k.get("per")) or real(x, **k))
    recover(FakeAPI(), 1, steps=2, zo=ZOConfig(q=1), nz=8, generator=gen())
    recover(FakeAPI(), 1, steps=1, zo=ZOConfig(q=1), nz=8, generator=gen(), inversion_augment="image")
    assert modes == ["batch", "batch", "image"]


# ------------------------------------------------------------------ kd_augment

def run_kd_task(monkeypatch, kd_augment: bool):
    from methods.maml import meta_params
    from methods.meta_train import MetaInput
    from network import build

    recovered, augmented = [], []
    real_recover, real_aug = kd.recover, kd.random_crop_flip

    def spy_recover(*a, **k):
        out = real_recover(*a, **k)
        recovered.append(out[0].clone())
        return out

    def spy_aug(x, **k):
        out = real_aug(x, **k)
        augmented.append((x, out.clone(), k.get("per")))
        return out
    monkeypatch.setattr(kd, "recover", spy_recover)
    monkeypatch.setattr(kd, "random_crop_flip", spy_aug)
    api = FakeAPI(size=16)
    torch.manual_seed(0)
    model = build("conv4", 3, image_size=16, batch_stats=True).to(DEVICE)
    prep = MetaInput(16, 3, MEAN, STD)
    s = kd.KDSettings(num_sup_kd=2, num_qur_kd=3, inner_update_num_kd=1, generate_iterations=1,
                      zo=ZOConfig(q=2, numsplit=1), kd_augment=kd_augment)
    out = kd.kd_task(model, meta_params(model), api, s, prep, boundary=True, generator=gen())
    return api, out, recovered, augmented


def test_kd_sets_are_cropped_and_flipped_once_each(monkeypatch):
    api, out, recovered, augmented = run_kd_task(monkeypatch, kd_augment=True)
    assert len(recovered) == 2 and len(augmented) == 2        # one draw for S, one for Q, per task
    for (src, aug, per), rx in zip(augmented, recovered):
        assert per == "batch" and torch.equal(src, rx)
        target_call = normalize(aug, MEAN, STD)                # the API's targets are taken on S~ / Q~
        assert any(c.shape == target_call.shape and torch.allclose(c, target_call, atol=1e-6) for c in api.calls)
    # what the task hands on (the memory's images) is un-augmented
    assert torch.equal(out.support[0], recovered[0]) and torch.equal(out.query[0], recovered[1])

    api, out, recovered, augmented = run_kd_task(monkeypatch, kd_augment=False)
    assert augmented == [] and len(recovered) == 2
