"""Networks: forward shapes for 32/84 inputs and 1/3 channels; the meta model under functional_call."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

import network
from conftest import ON_CPU, device_tol

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("size", [32, pytest.param(84, marks=pytest.mark.slow)])   # 84 px: the whole suite's
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name,kw", [
    ("conv4", {}),
    ("conv4", {"pool": "max"}),
    ("conv4", {"batch_stats": True}),
    ("resnet10", {}),
    ("resnet18", {}),
])
def test_classifier_shapes(name, kw, size, channels, device):
    torch.manual_seed(0)
    model = network.build(name, 5, channels=channels, image_size=size, **kw).to(device)
    out = model(torch.rand(3, channels, size, size, device=device))
    assert out.shape == (3, 5) and torch.isfinite(out).all()


def test_conv4_max_pool_accepts_any_size(device):
    """The API-MH meta model sees 84x84 images but must also take other sizes (global max pool)."""
    model = network.build("conv4", 7, image_size=84, pool="max", batch_stats=True).to(device)
    for size in (32, 84, 50):
        assert model(torch.rand(2, 3, size, size, device=device)).shape == (2, 7)
    flat = network.build("conv4", 7, image_size=84).to(device)
    with pytest.raises(RuntimeError):       # the flatten head is tied to its image size
        flat(torch.rand(2, 3, 32, 32, device=device))


@pytest.mark.parametrize("size", [32, 84])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_shapes(size, channels, device):
    torch.manual_seed(0)
    g = network.build("generator", image_size=size, channels=channels, nz=256).to(device)
    x = g(torch.randn(4, 256, device=device))
    assert x.shape == (4, channels, size, size)
    assert x.min() >= 0 and x.max() <= 1                 # sigmoid output: images in [0, 1]
    before = [p.detach().clone() for p in g.parameters()]
    g.reset()
    assert any(not torch.equal(a, b) for a, b in zip(before, g.parameters()))   # fresh weights


def test_channels_last_generator_runs_channels_last_with_the_same_images(device):
    """recover() makes the generator channels-last on the CPU: then every layer runs in that layout
    (no copy between layers), with the images and gradients of the NCHW module (float64)."""
    torch.manual_seed(0)
    g = network.build("generator", image_size=32, channels=3, nz=16).double().to(device)
    g_cl = copy.deepcopy(g).to(memory_format=torch.channels_last)
    z = torch.randn(5, 16, dtype=torch.float64, device=device)
    layouts = []        # each layer's input and output
    for m in g_cl.body:
        m.register_forward_hook(lambda m, i, o: layouts.extend(
            t.is_contiguous(memory_format=torch.channels_last) for t in (i[0], o)))
    x, x_cl = g(z), g_cl(z)
    assert len(layouts) == 2 * len(g_cl.body) and all(layouts)
    assert torch.allclose(x, x_cl, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(x.square().sum(), list(g.parameters())),
                    torch.autograd.grad(x_cl.square().sum(), list(g_cl.parameters()))):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_generator_upconv_equals_upsample_then_conv(memory_format, device):
    """The fused layer is nearest x2 upsampling + 3x3 convolution: outputs and gradients (input and
    weight) equal in float64, on odd and even sides, with and without bias."""
    from torch import nn
    from network.generator import UpConv3x3
    torch.manual_seed(0)
    for bias, (h, w) in ((False, (8, 8)), (True, (5, 6))):
        fused = UpConv3x3(6, 4, bias=bias).double().to(device, memory_format=memory_format)
        plain = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(6, 4, 3, padding=1, bias=bias)).double().to(device)
        plain[1].load_state_dict(fused.state_dict())
        x = torch.randn(3, 6, h, w, dtype=torch.float64, device=device).contiguous(memory_format=memory_format)
        x.requires_grad_()
        g = torch.randn(3, 4, 2 * h, 2 * w, dtype=torch.float64, device=device)
        ya, yb = fused(x), plain(x)
        assert ya.shape == yb.shape and torch.allclose(ya, yb, rtol=0, atol=device_tol(1e-12, 1e-10))
        ga = torch.autograd.grad((ya * g).sum(), (x, *fused.parameters()))
        gb = torch.autograd.grad((yb * g).sum(), (x, *plain.parameters()))
        for a, b in zip(ga, gb):
            assert torch.allclose(a, b, rtol=0, atol=device_tol(1e-11, 1e-10))


def test_conv4_pools_before_its_relu_with_the_same_function_and_gradients(device):
    """Conv4 blocks run max-pool then ReLU: outputs and parameter gradients equal those of the usual
    ReLU-then-pool order (max commutes with the monotone ReLU), bit for bit."""
    from torch import nn
    torch.manual_seed(0)
    model = network.build("conv4", 5, image_size=32, batch_stats=True).to(device)
    usual = network.build("conv4", 5, image_size=32, batch_stats=True).to(device)
    for block in usual.features:
        block[2], block[3] = block[3], block[2]
    assert isinstance(model.features[0][2], nn.MaxPool2d) and isinstance(usual.features[0][2], nn.ReLU)
    usual.load_state_dict(model.state_dict())
    x = torch.randn(10, 3, 32, 32, device=device)
    outs = [m(x) for m in (model, usual)]
    assert torch.equal(*outs)
    grads = [torch.autograd.grad(o.square().sum(), list(m.parameters())) for o, m in zip(outs, (model, usual))]
    # cuDNN's weight gradients may sum in another order from one backward to the next
    same = torch.equal if ON_CPU else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7))
    assert all(same(a, b) for a, b in zip(*grads))


def test_unknown_architecture_is_one_line_error():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        network.build("vgg", 5)
    with pytest.raises(ValueError, match="unknown init"):
        network.build("conv4", 5, init="xavier")


@pytest.mark.parametrize("size,pool", [(32, "flatten"), (84, "max")])
def test_meta_model_functional_call(size, pool, device):
    torch.manual_seed(0)
    model = network.build("conv4", 5, image_size=size, pool=pool, batch_stats=True).to(device)
    assert list(model.buffers()) == []                  # a pure function of its parameters
    x, y = torch.rand(10, 3, size, size, device=device), torch.arange(5, device=device).repeat(2)
    params = dict(model.named_parameters())
    out = functional_call(model, params, (x,))
    assert torch.allclose(out, model(x), atol=1e-6)
    model.eval()                                         # batch statistics in eval mode too (transductive)
    assert torch.allclose(functional_call(model, params, (x,)), out, atol=1e-6)

    loss = torch.nn.functional.cross_entropy(out, y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    assert all(g is not None and g.shape == p.shape for g, p in zip(grads, params.values()))

    # One inner SGD step on a params dict changes the output, and the outer gradient flows back
    # through that step to the original parameters (second-order MAML).
    fast = {k: p - 0.1 * g for (k, p), g in zip(params.items(), grads)}
    out2 = functional_call(model, fast, (x,))
    assert not torch.allclose(out2, out)
    outer = torch.autograd.grad(torch.nn.functional.cross_entropy(out2, y), params["head.weight"])[0]
    assert torch.isfinite(outer).all() and outer.abs().sum() > 0


def test_api_batch_norm_uses_running_statistics_in_eval(device):
    """APIs (batch_stats=False) answer each image independently of the rest of the batch."""
    torch.manual_seed(0)
    api = network.build("conv4", 5, image_size=32).to(device)
    api(torch.rand(16, 3, 32, 32, device=device))        # train mode: updates the running stats
    api.eval()
    x = torch.rand(4, 3, 32, 32, device=device)
    assert torch.allclose(api(x)[:1], api(x[:1]), atol=1e-5)
