import torch

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


def test_output_shapes_and_predict():
    model = OmniglotModel(20)
    flat, square = torch.rand(7, 784), torch.rand(7, 1, 28, 28)
    assert model(flat).shape == (7, 20)
    torch.testing.assert_close(model(flat), model(flat.view(7, 1, 28, 28)))
    assert model(square).shape == (7, 20)
    assert model.features(square).shape == (7, 256)
    log_probs = model(square)
    torch.testing.assert_close(log_probs.exp().sum(dim=1), torch.ones(7))
    assert torch.equal(model.predict(log_probs), log_probs.argmax(dim=1))


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
    assert not copy.is_cuda() and not model.is_cuda()
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.equal(next(copy.parameters()), next(model.parameters()))
