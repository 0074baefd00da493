"""synthesis/recover.py: generator inversion. It recovers images an API assigns to their target classes (white-box
and zero-order), costs the queries it should, and keeps the original's behaviour by default with the former
variants as options: boundary_student (the student once per step on the clean batch), zo_space
(perturbations in the normalised space), inversion_augment (one crop/flip per batch); the settings come
from the Config; `python -m synthesis` inverts one API of a pool."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import accel
import synthesis.recover as rec
from core.config import Config
from core.errors import FlagError
from dataset import normalize
from synthesis import APIPool
from synthesis.recover import per_image_loss, recover

from conftest import DEVICE, run_cli
from helpers import MEAN, STD, CountingStudent, FakeAPI, gen, random_api

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow

ZO = dict(ZO=True, mu=0.005)


# ------------------------------------------------------------------ settings, queries, what comes back

def test_recover_reads_its_settings_from_the_config_and_costs_q_plus_one_queries_per_image():
    api = FakeAPI()
    stats = {}
    x, y = recover(api, 2, Config(ZO=True, q=5, numsplit=2, generate_iterations=3, keep_best="image"), generator=gen(),
                   stats=stats)
    assert x.shape == (6, 3, 8, 8) and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [0, 0, 1, 1, 2, 2]                             # relative labels, grouped by class
    assert api.queries == 3 * (5 + 1) * 6                               # generate_iterations steps
    assert stats["best_loss"] <= stats["final_loss"] + 1e-6             # each image keeps its best step
    api = FakeAPI()
    recover(api, 2, Config(ZO=True, q=5, meta_generator=True, meta_generator_steps=2), generator=gen())
    assert api.queries == 2 * (5 + 1) * 6                               # meta_generator_steps with it
    api = FakeAPI()
    recover(api, 1, Config(ZO=True, q=5), steps=1, generator=gen())
    assert api.queries == 6 * 3
    api = FakeAPI(white_box=True)
    recover(api, 2, Config(ZO=False), steps=4, generator=gen())
    assert api.queries == 4 * 6                                          # white-box: one query per image


def test_recover_is_reproducible_from_its_generator():
    torch.manual_seed(0)
    a, _ = recover(FakeAPI(), 2, Config(ZO=True, q=3), steps=2, generator=gen(1))
    torch.manual_seed(0)
    b, _ = recover(FakeAPI(), 2, Config(ZO=True, q=3), steps=2, generator=gen(1))
    torch.manual_seed(0)
    c, _ = recover(FakeAPI(), 2, Config(ZO=True, q=3), steps=2, generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_black_box_api_refuses_white_box_recovery(device):
    api = random_api(device=device)
    with pytest.raises(ValueError, match="white_box=True"):
        recover(api, 2, Config(ZO=False), steps=1)


def test_recover_starts_from_and_returns_its_state():
    api = FakeAPI()
    first = {}
    recover(api, 2, Config(ZO=True, q=2, numsplit=1), steps=2, generator=gen(1), final=first)
    assert first["z"].shape == (6, 256) and set(first["generator"]) >= {"fc.weight", "fc.bias"}
    same = {}
    recover(api, 2, Config(ZO=True, q=2, numsplit=1), steps=0, init=first, final=same)
    assert torch.equal(same["z"], first["z"])
    assert all(torch.equal(same["generator"][k], v) for k, v in first["generator"].items())


def test_per_image_loss_is_ce_minus_the_boundary_term_where_api_and_student_agree():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    y = torch.tensor([0, 0])
    s = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.8, 0.1, 0.1]]))    # agrees with the API on image 0 only
    ce = -torch.log(torch.tensor([0.7, 0.1]))
    torch.testing.assert_close(per_image_loss(p, y), ce)
    l1 = per_image_loss(p, y, s, adv=2.0, distance="l1")
    torch.testing.assert_close(l1, ce - 2.0 * torch.tensor([0.4, 0.0]))
    kl = per_image_loss(p, y, s, adv=1.0, distance="kl")
    want0 = (p[0] * (p[0].log() - s[0])).sum()
    torch.testing.assert_close(kl, ce - torch.stack([want0, torch.tensor(0.0)]))
    torch.testing.assert_close(per_image_loss(p, y, s, adv=0.0), ce)   # adv 0: no boundary term


# ------------------------------------------------------------------ boundary_student

def test_clean_student_runs_once_per_step_on_the_clean_batch():
    api, st = FakeAPI(), CountingStudent()
    steps, q, n = 3, 6, 3 * 2
    recover(api, 2, Config(q=q, numsplit=3, **ZO), steps=steps, student=st, adv=1.0, generator=gen())
    assert st.sizes == [n] * steps
    assert api.queries == steps * (q + 1) * n                 # the query count does not change

    api, st = FakeAPI(), CountingStudent()
    recover(api, 2, Config(q=q, numsplit=3, boundary_student="perturbed", **ZO), steps=steps, student=st, adv=1.0,
            generator=gen())
    assert sum(st.sizes) == steps * (q + 1) * n and len(st.sizes) == steps * (q + 1)
    assert api.queries == steps * (q + 1) * n
    api, st = FakeAPI(), CountingStudent()
    recover(api, 2, Config(q=q, **ZO), steps=steps, student=st, adv=0.0, generator=gen())
    assert st.sizes == []                                     # no boundary term: no student


def test_white_box_student_is_detached_unless_perturbed():
    st = CountingStudent()
    recover(FakeAPI(white_box=True), 2, Config(ZO=False), steps=2, student=st, adv=1.0, generator=gen())
    assert st.sizes == [6, 6] and st.grad_enabled == [False, False]
    st = CountingStudent()
    recover(FakeAPI(white_box=True), 2, Config(ZO=False, boundary_student="perturbed"), steps=2, student=st,
            adv=1.0, generator=gen())
    assert st.sizes == [6, 6] and st.grad_enabled == [True, True]
    assert st.theta.grad is None


@pytest.mark.parametrize("boundary_student", ["clean", "perturbed"])
def test_recover_leaves_a_students_graph_alone(boundary_student, device):
    theta = (torch.randn(5, 3 * 32 * 32, device=device) * 0.01).requires_grad_()
    student = lambda x01: x01.flatten(1) @ theta.t()        # noqa: E731 (f_theta', part of a graph)
    recover(random_api(device=device, white_box=True), 2, Config(ZO=False, boundary_student=boundary_student),
            steps=2, student=student, adv=1.0)
    recover(random_api(device=device), 2, Config(ZO=True, q=3, numsplit=2, boundary_student=boundary_student),
            steps=2, student=student, adv=1.0)
    assert theta.grad is None


def test_bad_option_values_raise():
    for name in ("boundary_student", "zo_space", "inversion_augment"):
        with pytest.raises(FlagError, match=name):
            Config(**{name: "noisy"})


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
    recover(api, 2, Config(ZO=True, q=q, mu=mu, numsplit=2), steps=1, generator=gen())
    in_norm, in_pixels = perturbation_norms(api, n, q)
    torch.testing.assert_close(in_norm, torch.full_like(in_norm, mu), rtol=2e-3, atol=0)
    assert not torch.allclose(in_pixels, torch.full_like(in_pixels, mu), rtol=0.05)
    std, mean = (torch.tensor(v, device=DEVICE).view(1, 3, 1, 1) for v in (STD, MEAN))
    x01 = api.calls[0] * std + mean
    assert x01.min() > -1e-5 and x01.max() < 1 + 1e-5      # the clean call is a normalised [0, 1] image

    api = FakeAPI()
    recover(api, 2, Config(ZO=True, q=q, mu=mu, numsplit=2, zo_space="pixel"), steps=1, generator=gen())
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
    recover(api, per_class, Config(ZO=True, q=q, mu=1e-3, numsplit=4, zo_space=zo_space), steps=1, generator=gen(2))
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

def test_recover_passes_its_inversion_augment_option(monkeypatch):
    modes = []
    real = rec.random_crop_flip
    monkeypatch.setattr(rec, "random_crop_flip", lambda x, **k: modes.append(k.get("per")) or real(x, **k))
    recover(FakeAPI(), 1, Config(ZO=True, q=1), steps=2, generator=gen())
    recover(FakeAPI(), 1, Config(ZO=True, q=1, inversion_augment="image"), steps=1, generator=gen())
    assert modes == ["batch", "batch", "image"]


# ------------------------------------------------------------------ inversion of a pretrained API

def target_acc(api, images, labels):
    norm = accel.affine_normalizer(api.spec.mean, api.spec.std, api.spec.image_size, api.device)
    return 100.0 * int((api(norm(images)).argmax(1) == labels).sum()) / len(labels)     # exact: 18/20 is 90.0


# Bars: chance is 20% (5 classes); the untrained generator scores 15-30% (measured after one step).
# Measured on a demo pool like demo_pool (3 conv4 APIs, 4 images/class, 20 steps, AMD EPYC): white-box 100%.
# ZO (q=20), APIs 0-2 x seeds 0-2: 55-95% keeping the best batch (the original's keep_best "batch": one
# step's whole batch), 85-100% keeping each image's best step (keep_best "image"); replacing the estimate by
# a random vector gives 10-35% (the best-step selection alone does some random search), negating it 0-20%.
WHITE_BOX_BAR, ZO_BAR, ZO_IMAGE_BAR = 90.0, 50.0, 80.0


def test_inversion_white_box_recovers_target_classes(demo_pool):
    pool = APIPool.load(demo_pool, "demo", "conv4", 5, 3, DEVICE, white_box=True)
    api = pool.get("demo", "conv4", 0)
    torch.manual_seed(0)
    stats = {}
    x, y = recover(api, 4, Config(ZO=False), steps=20, generator=gen(0), stats=stats)
    assert x.shape == (20, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [c for c in range(5) for _ in range(4)]
    assert api.queries == 20 * 20
    assert target_acc(api, x, y) >= WHITE_BOX_BAR
    assert stats["best_loss"] <= stats["final_loss"] + 1e-6


def test_inversion_zero_order_recovers_target_classes(demo_pool):
    pool = APIPool.load(demo_pool, "demo", "conv4", 5, 3, DEVICE)
    api = pool.get("demo", "conv4", 1)
    torch.manual_seed(0)
    x, y = recover(api, 4, Config(ZO=True, q=20, mu=0.005, numsplit=2), steps=20, generator=gen(0))
    assert api.queries == 20 * 20 * (20 + 1)
    assert target_acc(api, x, y) >= ZO_BAR
    torch.manual_seed(0)
    x, y = recover(api, 4, Config(ZO=True, q=20, mu=0.005, numsplit=2, keep_best="image"), steps=20, generator=gen(0))
    assert target_acc(api, x, y) >= ZO_IMAGE_BAR


@pytest.mark.slow
def test_cli_inverts_one_api_and_saves_a_grid(demo_pool, tmp_path):
    out = str(tmp_path / "grid.png")
    proc = run_cli(["-m", "synthesis", "--dataset", "demo", "--pre_backbone", "conv4", "--api", "2",
                    "--pretrained_path_prefix", demo_pool, "--ZO", "--q", "5", "--numsplit", "2",
                    "--generate_iterations", "3", "--num_per_class", "3", "--out", out, "--no_progress"])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(res) == {"target_acc", "api_queries", "seconds"}
    assert res["api_queries"] == 3 * 15 * (5 + 1) and 0 <= res["target_acc"] <= 100
    from PIL import Image
    w, h = Image.open(out).size
    assert (w, h) == (3 * 34 + 2, 5 * 34 + 2)          # 3 images per row, one row per class
    from core.errors import PoolError
    from synthesis.__main__ import main
    with pytest.raises(PoolError, match="python pretrain.py --dataset demo --pre_backbone resnet18"):
        main(["--dataset", "demo", "--pre_backbone", "resnet18", "--pretrained_path_prefix", demo_pool, "--out", out])


def test_cli_refuses_a_mixed_pool_and_bad_counts():
    from synthesis.__main__ import main
    with pytest.raises(FlagError, match="^--dataset and --pre_backbone name one pool folder here; mix is for main.py$"):
        main(["--dataset", "mix", "--pre_backbone", "mix"])
    with pytest.raises(FlagError, match="--num_per_class must be at least 1"):
        main(["--num_per_class", "0"])


# ----------------------------------------------------------------------------- the original's choices (switches)

class LogitAPI(FakeAPI):
    """FakeAPI answering logits, as the original's API (the network itself) does."""
    output = "logits"

    def __call__(self, xn):
        self.calls.append(xn.detach().clone())
        return self.logits(xn).detach()


def test_an_api_answering_logits_gives_ce_and_the_boundary_l1_on_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    student = torch.tensor([[1.0, 0.5, 0.0], [2.0, 0.0, 0.0]])
    target = torch.tensor([0, 1])
    loss = per_image_loss(logits, target, student, adv=0.5, logits=True)
    ce = F.cross_entropy(logits, target, reduction="none")
    agree = torch.tensor([1.0, 0.0])                                  # argmax 0 = 0; 1 != 0
    l1 = (logits - student).abs().sum(1)                              # on logits, not probabilities
    torch.testing.assert_close(loss, ce - 0.5 * agree * l1)
    probs_loss = per_image_loss(F.softmax(logits, 1), target, student, adv=0.5)
    torch.testing.assert_close(probs_loss[1], ce[1], rtol=1e-5, atol=1e-6)    # no agreement: CE alone, either way
    assert not torch.allclose(probs_loss[0], loss[0])


def test_recovery_reads_an_apis_answers_as_what_it_says_they_are(monkeypatch):
    seen = []
    real = rec.per_image_loss
    monkeypatch.setattr(rec, "per_image_loss", lambda *a: (seen.append((a[0], a[-1])), real(*a))[1])
    for api, logits in ((LogitAPI(), True), (FakeAPI(), False)):
        seen.clear()
        recover(api, 2, Config(ZO=True, q=4), steps=2, generator=gen())
        assert seen and all(flag is logits for _, flag in seen)
        # logits are not probabilities: rows need not sum to one
        assert all(torch.allclose(x.sum(1), torch.ones(len(x))) != logits for x, _ in seen[:1])


def test_keep_best_batch_keeps_the_whole_batch_of_the_step_with_the_lowest_objective(monkeypatch):
    """The original keeps the images of one step: the step whose scalar objective (in zero-order mode
    the surrogate mean_i <n_i, g_i>, in the space the estimate was taken in) was the lowest."""
    seen = []
    real = rec.zo_grad

    def recording(loss_of, xin, *a, **k):
        g, loss = real(loss_of, xin, *a, **k)
        seen.append(float((xin.flatten(1) * g.flatten(1)).sum(1).mean()))
        return g, loss
    monkeypatch.setattr(rec, "zo_grad", recording)
    images = []
    real_g = rec.network.build

    def build(*a, **k):
        g = real_g(*a, **k)
        forward = g.forward
        def recording_forward(z):
            out = forward(z)
            images.append(out.detach().clone())
            return out
        g.forward = recording_forward
        return g
    monkeypatch.setattr(rec.network, "build", build)
    x, _ = recover(FakeAPI(), 2, Config(ZO=True, q=4, keep_best="batch"), steps=5, generator=gen())
    best = min(range(len(seen)), key=seen.__getitem__)
    torch.testing.assert_close(x, images[best].contiguous())
    xi, _ = recover(FakeAPI(), 2, Config(ZO=True, q=4, keep_best="image"), steps=5, generator=gen())
    assert x.shape == xi.shape


def test_a_generator_larger_than_the_api_is_seen_through_a_random_window():
    """API-MH with one shared generator: images at the generator's size, the API queried on windows of its own."""
    api = FakeAPI(size=8)
    x, _ = recover(api, 2, Config(ZO=True, q=2), steps=2, generator=gen(), image_size=12)
    assert x.shape == (6, 3, 12, 12)
    assert {tuple(c.shape[1:]) for c in api.calls} == {(3, 8, 8)}


def test_total_variation_is_the_mean_squared_neighbour_difference():
    x = torch.zeros(2, 1, 2, 3)
    x[0, 0, :, 1] = 1.0                     # a bright column: 4 of 6 horizontal pairs differ by 1, no vertical
    assert rec.total_variation(x).tolist() == pytest.approx([0.0 + 4 / 4, 0.0])


def _with_and_without(prior: str, lam: float, per_class: int) -> tuple[dict, dict]:
    """Small zero-order recoveries from the same seeds with the prior off and at weight lam: (images, queries)."""
    out, queries = {}, {}
    for w in (0.0, lam):
        api = FakeAPI()
        torch.manual_seed(0)
        out[w], _ = recover(api, per_class, Config(ZO=True, q=5, generate_iterations=20, Glr=0.01, keep_best="image",
                                                   **{prior: w}), generator=gen(3))
        queries[w] = api.queries
    return out, queries


def test_prior_tv_smooths_the_recovered_images_at_the_same_queries():
    """--prior_tv: an exact gradient on G's images, no query; a strong one leaves smoother images."""
    out, queries = _with_and_without("prior_tv", 1e4, 2)
    assert queries[0.0] == queries[1e4]
    assert rec.total_variation(out[1e4]).mean() < 0.5 * rec.total_variation(out[0.0]).mean()


def test_class_similarity_is_the_mean_cosine_of_same_class_pairs():
    a, b = torch.rand(3, 4, 4), torch.rand(3, 4, 4)
    x = torch.stack([a, a, a, b, -b + 1, b])        # class 0: three copies; class 1: b, its negative, b
    sim = rec.class_similarity(x, 3)
    assert sim[0].item() == pytest.approx(1.0, abs=1e-5)
    assert sim[1].item() == pytest.approx((1 - 1 - 1) / 3, abs=1e-5)       # pairs: (b,-b) (b,b) (-b,b)
    assert rec.class_similarity(x, 1).abs().sum() == 0


def test_prior_diversity_spreads_a_class_at_the_same_queries():
    """--prior_diversity: an exact gradient on G's images, no query; a strong one leaves a class's images
    less alike."""
    out, queries = _with_and_without("prior_diversity", 50.0, 3)
    assert queries[0.0] == queries[50.0]
    assert rec.class_similarity(out[50.0], 3).mean() < rec.class_similarity(out[0.0], 3).mean() - 0.1
