"""synthesis/screen.py (--recovery screen): dead-leaves candidates are valid images drawn from the generator alone;
screening keeps, for each class, distinct candidates of the lowest recovery loss (better than what it
discards), costs exactly screen_candidates queries per recovered image (a visit exactly visit_cost), and
hands the boundary term's student whole sets; the flag refuses what it cannot do."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.config import Config, visit_cost
from core.errors import FlagError
from methods.checks import check
from methods.kd import kd_task
from methods.maml import meta_params
from synthesis.recover import per_image_loss
from synthesis.screen import dead_leaves, screen

from helpers import CountingStudent, FakeAPI, demo_prep, gen, meta_model, random_api

pytestmark = pytest.mark.fast


def test_dead_leaves_are_images_drawn_from_the_generator_alone():
    a = dead_leaves(64, 16, 3, gen(0), gen(0).device)
    b = dead_leaves(64, 16, 3, gen(0), gen(0).device)
    c = dead_leaves(64, 16, 3, gen(1), gen(1).device)
    assert a.shape == (64, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # occluding leaves: most images hold more than a background colour, and images differ from each other
    assert (a.flatten(2).std(2).mean(1) > 0.01).float().mean() > 0.8
    assert a.flatten(1).std(0).mean() > 0.1


def test_the_textured_prior_adds_texture_and_noise_and_leaves_the_plain_prior_as_it_was():
    plain = dead_leaves(64, 16, 3, gen(0), gen(0).device)
    again = dead_leaves(64, 16, 3, gen(0), gen(0).device, textured=False)
    tex = dead_leaves(64, 16, 3, gen(0), gen(0).device, textured=True)
    assert torch.equal(plain, again)                               # the default draws are unchanged
    assert tex.shape == plain.shape and 0 <= tex.min() and tex.max() <= 1
    assert torch.equal(tex, dead_leaves(64, 16, 3, gen(0), gen(0).device, textured=True))
    # stripes, checkerboards and noise: neighbouring pixels differ far more often than in flat leaves
    def edges(x):
        return ((x[..., 1:] - x[..., :-1]).abs() > 0.05).float().mean()
    assert edges(tex) > 3 * edges(plain)


def _screen(api, per_class=3, candidates=40, spread=1, **kw):
    cfg = Config(ZO=True, q=4, generate_iterations=2, recovery="screen", screen_candidates=candidates,
                 screen_spread=spread)
    return screen(api, per_class, cfg, generator=gen(0), **kw)


def test_screening_keeps_distinct_low_loss_candidates_of_each_class_at_its_queries():
    api = FakeAPI(way=4, size=8)
    x, y = _screen(api)
    assert x.shape == (4 * 3, 3, 8, 8) and y.tolist() == [c for c in range(4) for _ in range(3)]
    assert api.queries == 40 * 4 * 3                              # screen_candidates per recovered image
    assert len({tuple(v.tolist()) for v in x.flatten(1)}) == len(x)     # no candidate serves two classes
    # every kept image is better for its class than the median candidate the API saw
    seen = torch.cat(api.calls)
    probs = F.softmax(api.logits(seen), 1)
    spec = api.spec
    xn = (x - torch.tensor(spec.mean).view(1, -1, 1, 1).to(x)) / torch.tensor(spec.std).view(1, -1, 1, 1).to(x)
    kept_loss = per_image_loss(F.softmax(api.logits(xn), 1), y.to(xn.device))
    median = torch.stack([per_image_loss(probs, torch.full((len(seen),), c, device=probs.device)).median()
                          for c in range(4)])
    assert (kept_loss < median[y.to(median.device)]).all()


def test_the_first_class_gets_the_best_candidates_and_zero_takes_the_inversions_count():
    api = FakeAPI(way=2, size=8)
    x, y = _screen(api, per_class=2, candidates=50)
    seen = torch.cat(api.calls)
    loss0 = per_image_loss(F.softmax(api.logits(seen), 1), torch.zeros(len(seen), dtype=torch.long,
                                                                        device=seen.device))
    best_two = loss0.topk(2, largest=False).values
    spec = api.spec
    xn = (x[:2] - torch.tensor(spec.mean).view(1, -1, 1, 1).to(x)) / torch.tensor(spec.std).view(1, -1, 1, 1).to(x)
    got = per_image_loss(F.softmax(api.logits(xn), 1), torch.zeros(2, dtype=torch.long, device=xn.device))
    assert torch.allclose(got.sort().values, best_two.sort().values, atol=1e-6)
    api = FakeAPI(way=2, size=8)
    _screen(api, per_class=1, candidates=0)
    assert api.queries == (4 + 1) * 2 * 2                         # (q + 1) x generate_iterations per image


def test_the_boundary_student_sees_whole_sets_and_changes_the_choice():
    student = CountingStudent(way=3, size=8)
    plain, _ = _screen(FakeAPI(way=3, size=8), per_class=2, candidates=100)
    bound, _ = _screen(FakeAPI(way=3, size=8), per_class=2, candidates=100, student=student, adv=50.0)
    assert set(student.sizes) == {3 * 2}
    assert not torch.equal(plain, bound)


def test_a_screening_visit_costs_exactly_visit_cost_and_trains_no_generator():
    api = random_api(classes=[3, 9, 11, 20, 40])
    model = meta_model()
    cfg = Config(ZO=True, q=4, generate_iterations=2, num_sup_kd=2, num_qur_kd=2, inner_update_num_kd=1, adv=1.0,
                 recovery="screen", screen_candidates=7)
    out = kd_task(model, meta_params(model), api, cfg, demo_prep(), boundary=True, generator=gen(0))
    assert api.queries == visit_cost(cfg) == 5 * (2 + 2) * (7 + 1)
    assert out.recovery_steps == 0 and out.support[0].shape == (10, 3, 32, 32)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_spread_draws_each_set_at_random_among_the_best_candidates():
    kept, _ = _screen(FakeAPI(way=3, size=8), per_class=2, candidates=60)
    wide, _ = _screen(FakeAPI(way=3, size=8), per_class=2, candidates=60, spread=5)
    again, _ = _screen(FakeAPI(way=3, size=8), per_class=2, candidates=60, spread=5)
    best10, _ = _screen(FakeAPI(way=3, size=8), per_class=10, candidates=12)
    assert torch.equal(wide, again) and not torch.equal(wide, kept)
    assert len({tuple(v.tolist()) for v in wide.flatten(1)}) == len(wide)
    # every drawn image is among its class's ten best (the same candidates: the draws come first)
    pool = {c: {tuple(v.tolist()) for v in best10[10 * c:10 * (c + 1)].flatten(1)} for c in range(3)}
    assert all(tuple(v.tolist()) in pool[i // 2] for i, v in enumerate(wide.flatten(1)))


def test_spread_is_refused_without_screening_or_beyond_the_candidates():
    with pytest.raises(FlagError, match="--screen_spread draws"):
        check(Config(dataset="demo", screen_spread=3))
    with pytest.raises(FlagError, match="--screen_spread 30"):
        check(Config(dataset="demo", recovery="screen", screen_candidates=20, screen_spread=30))


def test_screening_with_a_meta_generator_is_refused():
    cfg = Config(dataset="demo", ZO=True, recovery="screen", meta_generator=True)
    with pytest.raises(FlagError, match="--recovery screen"):
        check(cfg)


def test_screen_memory_hands_on_more_distinct_images_per_class_at_no_query():
    api = random_api(classes=[3, 9, 11, 20, 40])
    model = meta_model()
    kw = dict(ZO=True, q=4, generate_iterations=2, num_sup_kd=2, num_qur_kd=2, inner_update_num_kd=1,
              recovery="screen", screen_candidates=7)
    plain = kd_task(model, meta_params(model), api, Config(**kw), demo_prep(), boundary=False, generator=gen(0))
    cost = api.queries
    api = random_api(classes=[3, 9, 11, 20, 40])
    out = kd_task(model, meta_params(model), api, Config(**kw, screen_memory=4), demo_prep(), boundary=False,
                  generator=gen(0))
    assert api.queries == cost and plain.spare is None
    assert torch.equal(out.support[0], plain.support[0]) and torch.equal(out.loss, plain.loss)
    x, y = out.spare
    assert x.shape == (5 * 4, 3, 32, 32) and y.tolist() == [c for c in (3, 9, 11, 20, 40) for _ in range(4)]
    rows = {tuple(v.tolist()) for v in torch.cat([x, out.support[0]]).flatten(1)}
    assert len(rows) == 5 * (4 + 2)                                  # no spare repeats a support image


def test_screen_memory_beyond_the_candidates_is_refused():
    cfg = Config(dataset="demo", ZO=True, recovery="screen", screen_candidates=2, num_sup_kd=5, screen_memory=6)
    with pytest.raises(FlagError, match="--screen_memory 6"):
        check(cfg)


@pytest.mark.slow
def test_a_screening_run_fills_the_memory_with_its_spares_and_counts_its_queries(demo_root, demo_pool, tmp_path):
    """main.py with --recovery screen --screen_memory: each visit adds a support, a query and a spare batch
    to each of its API's classes, and the run spends exactly visit_cost per visit."""
    from main import parse_args
    from methods.meta_train import train
    from helpers import TINY, last_ck, run_memory
    out = str(tmp_path / "screen")
    argv = [*TINY, "--data_root", demo_root, "--pretrained_path_prefix", demo_pool, "--out_dir", out,
            "--episode_train", "8", "--val_interval", "8", "--save_interval", "8", "--recovery", "screen",
            "--screen_candidates", "6", "--screen_memory", "3"]
    cfg = parse_args(argv)
    train(cfg)
    state = last_ck(out)["state"]
    assert state["api_visits"] > 0 and state["api_queries"] == state["api_visits"] * visit_cost(cfg)
    mem = run_memory(out)
    sizes = {c: [b.shape[0] for _, b in buf] for c, buf in mem._store.items()}
    # support, query, spares (TINY: 2 + 3), visit after visit; the ring buffer (4 batches) drops the oldest
    cycle = " ".join(["2 3 3"] * 4)
    assert all(len(s) >= 3 and " ".join(map(str, s)) in cycle for s in sizes.values())
    assert sum(s.count(3) for s in sizes.values()) > sum(s.count(2) for s in sizes.values())


def test_screening_at_another_size_shows_the_api_its_own_size():
    """API-MH's shared size: candidates are made at image_size, the API sees them resized to its own."""
    api = FakeAPI(way=2, size=8)
    x, _ = _screen(api, per_class=1, candidates=10, image_size=16)
    assert x.shape == (2, 3, 16, 16) and {tuple(c.shape[1:]) for c in api.calls} == {(3, 8, 8)}


def test_screen_memory_without_screening_is_refused_and_the_recipe_can_go_back_to_inversion():
    with pytest.raises(FlagError, match="add --recovery screen"):
        check(Config(dataset="demo", ZO=True, screen_memory=3))
    from main import parse_args
    cfg = parse_args(["--preset", "demo", "--recipe", "improved", "--recovery", "invert"])
    check(cfg)                                   # the recipe's --screen_candidates is left unused
    assert visit_cost(cfg) == 100 * (40 * 21 + 1)
