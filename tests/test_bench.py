import contextlib

import torch

import bench


def test_each_side_takes_its_turn_on_the_same_random_numbers_inside_its_context():
    events, draws = [], {"baseline": [], "project": []}

    def side(name):
        def work(generator):
            events.append(("work", name))
            draws[name].append(torch.rand(3, generator=generator).tolist())
        return work

    @contextlib.contextmanager
    def around(name):
        events.append(("enter", name))
        yield
        events.append(("leave", name))

    seconds = bench.time_in_turn({"baseline": side("baseline"), "project": side("project")}, rounds=2, device="cpu",
                                 around=around)
    turn = [("enter", "baseline"), ("work", "baseline"), ("leave", "baseline"),
            ("enter", "project"), ("work", "project"), ("leave", "project")]
    assert events == turn * 3  # an untimed warm-up round, then the 2 timed ones
    assert draws["baseline"] == draws["project"]  # each round, both sides from the same generator state
    assert len({tuple(round_) for round_ in draws["baseline"]}) == 3  # and a new state each round
    assert sorted(seconds) == ["baseline", "project"] and all(value >= 0 for value in seconds.values())


def test_the_synthetic_images_have_the_paper_splits_classes():
    samplers = bench.synthetic_samplers("cpu")
    assert samplers["meta-train"].num_classes == 1200 * 4  # each rotation of a character a class
    assert samplers["meta-test"].num_classes == 423
    assert set(samplers["meta-train"].images.unique().tolist()) == {0.0, 1.0}
