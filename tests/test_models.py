import math

import torch
import torch.nn.functional as F
from torch import nn

import paper
import reptile
from models import OmniglotModel


def test_point_grad_to_sets_self_minus_target():
    torch.manual_seed(0)
    model, target = OmniglotModel(5), OmniglotModel(5)
    model.point_grad_to(target)  # allocates the gradients
    for param, target_param in zip(model.parameters(), target.parameters()):
        torch.testing.assert_close(param.grad, param.detach() - target_param.detach(), rtol=0, atol=0)
    target = model.clone()
    with torch.no_grad():
        for param in target.parameters():
            param.add_(1.0)
    model.point_grad_to(target)  # overwrites the earlier gradient, does not accumulate
    for param in model.parameters():
        torch.testing.assert_close(param.grad, torch.full_like(param, -1.0))


def test_sgd_step_after_point_grad_to_interpolates():
    torch.manual_seed(0)
    model, target = OmniglotModel(5), OmniglotModel(5)
    before = [p.detach().clone() for p in model.parameters()]
    model.point_grad_to(target)
    torch.optim.SGD(model.parameters(), lr=0.25).step()
    for old, new, goal in zip(before, model.parameters(), target.parameters()):
        torch.testing.assert_close(new.detach(), old + 0.25 * (goal.detach() - old))


def test_output_shapes_and_logits():
    model = OmniglotModel(20)
    flat, square = torch.rand(7, 784), torch.rand(7, 1, 28, 28)
    assert model(flat).shape == (7, 20)
    torch.testing.assert_close(model(flat), model(flat.view(7, 1, 28, 28)))
    assert model(square).shape == (7, 20)
    assert model.features(square).shape == (7, 256)
    logits = model(square)  # raw scores: a loss takes them as they are (reptile.summed_cross_entropy)
    assert not torch.allclose(logits.exp().sum(dim=1), torch.ones(7))


def test_batchnorm_always_uses_the_batch_statistics():
    torch.manual_seed(0)
    model = OmniglotModel(5)
    images = torch.rand(8, 1, 28, 28)
    model.train()
    model(torch.rand(8, 1, 28, 28) * 5)  # would move running statistics, if there were any
    model.eval()
    torch.testing.assert_close(model(images), model.train()(images))
    assert not any("running" in name for name, _ in model.named_buffers())
    # The prediction for one image depends on the batch it comes in.
    assert not torch.allclose(model(images)[:1], model(torch.cat([images[:1], images[:1] * 0]))[:1])


def test_clone_is_independent():
    model = OmniglotModel(5)
    copy = model.clone()
    assert next(copy.parameters()).device == next(model.parameters()).device
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.equal(next(copy.parameters()), next(model.parameters()))


def tensorflow_same_padding_forward(model: OmniglotModel, images: torch.Tensor) -> torch.Tensor:
    """The model's forward pass with TensorFlow's padding='same' (the odd pixel padded at the bottom and right)."""
    x = images
    for conv, batchnorm, relu in model.features[:4]:
        size = x.shape[-1]
        total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
        before = total // 2
        after = total - before
        x = relu(batchnorm(F.conv2d(F.pad(x, (before, after, before, after)), conv.weight, conv.bias, stride=2)))
    return model.classifier(x.flatten(1))


def test_our_padding_is_tensorflows_on_images_rotated_by_180_degrees():
    torch.manual_seed(0)
    ours, tensorflows = OmniglotModel(5), OmniglotModel(5)
    with torch.no_grad():
        for block, turned_block in zip(ours.features[:4], tensorflows.features[:4]):
            turned_block[0].weight.copy_(block[0].weight.rot90(2, dims=(2, 3)))
            turned_block[0].bias.copy_(block[0].bias)
        weight = ours.classifier.weight.view(5, 64, 2, 2).rot90(2, dims=(2, 3))
        tensorflows.classifier.weight.copy_(weight.reshape(5, 256))
        tensorflows.classifier.bias.copy_(ours.classifier.bias)
    images = torch.rand(6, 1, 28, 28)
    expected = tensorflow_same_padding_forward(tensorflows, images.rot90(2, dims=(2, 3)))
    torch.testing.assert_close(ours(images), expected)
    # Without the rotation the two paddings differ.
    assert not torch.allclose(ours(images), tensorflow_same_padding_forward(ours, images), atol=1e-3)


def test_each_block_normalises_with_the_batch_statistics_and_tensorflows_epsilon():
    torch.manual_seed(0)
    model = OmniglotModel(5)
    with torch.no_grad():
        for block in model.features[:4]:
            block[1].weight.uniform_(0.5, 1.5)
            block[1].bias.uniform_(-0.5, 0.5)
    images = torch.rand(6, 1, 28, 28)
    x = images
    for conv, batchnorm, _ in model.features[:4]:  # written out: (x - batch mean) / sqrt(batch variance + eps)
        x = conv(x)
        mean, variance = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        x = torch.relu((x - mean) / torch.sqrt(variance + paper.BATCHNORM_EPS) * batchnorm.weight.view(1, -1, 1, 1)
                       + batchnorm.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(model(images), model.classifier(x.flatten(1)), rtol=1e-4, atol=1e-5)


def test_the_maml_papers_network_averages_the_last_map_over_its_positions():
    torch.manual_seed(0)
    model, images = OmniglotModel(5, maml=True), torch.rand(3, 1, 28, 28)
    assert model.features(images).shape == (3, 64)
    last_map = model.features[:4](images)
    torch.testing.assert_close(model(images), model.classifier(last_map.mean(dim=(2, 3))))


def test_the_maml_papers_network_learns_batchnorm_offsets_but_no_scales_and_only_in_the_meta_update():
    torch.manual_seed(0)
    model = OmniglotModel(20, maml=True)
    batch_norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    assert len(batch_norms) == 4 and all(norm.weight is None and norm.bias is not None for norm in batch_norms)
    offsets = {name for name, param in model.named_parameters() if any(param is norm.bias for norm in batch_norms)}
    assert model.meta_only == offsets and len(offsets) == 4
    assert len(reptile.inner_parameters(model)) == len(list(model.parameters())) - 4
    with torch.no_grad():
        for norm in batch_norms:
            norm.bias.uniform_(-0.5, 0.5)
    images = torch.rand(6, 1, 28, 28)
    x = images
    for conv, batch_norm, _ in model.features[:4]:  # written out: (x - batch mean) / sqrt(batch variance + eps) + b
        x = conv(x)
        mean, variance = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        x = torch.relu((x - mean) / torch.sqrt(variance + paper.BATCHNORM_EPS) + batch_norm.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(model(images), model.classifier(x.mean(dim=(2, 3))), rtol=1e-4, atol=1e-5)


def test_the_maml_papers_classifier_starts_from_standard_normal_weights_and_zero_biases():
    torch.manual_seed(0)
    weights = torch.cat([OmniglotModel(20, maml=True).classifier.weight.flatten() for _ in range(5)])  # 6,400
    assert abs(weights.mean().item()) < 0.05 and 0.95 < weights.std().item() < 1.05
    assert not OmniglotModel(20, maml=True).classifier.bias.any()
    assert OmniglotModel(20).classifier.weight.std().item() < 0.2  # Glorot's: sqrt(2 / (256 + 20)) = 0.085
