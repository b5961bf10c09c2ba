import pytest

from abel_lightning.registry import Registry


def test_names_resolve_to_built_components_and_instances_pass_through():
    things = Registry("thing")

    @things.register("scaled")
    class Scaled:
        def __init__(self, factor: float = 2.0):
            self.factor = factor

    @things.register("double")
    def double(x):
        return 2 * x

    assert things.resolve("scaled").factor == 2.0
    assert things.resolve("scaled", factor=3.0).factor == 3.0
    assert things.resolve("double") is double
    mine = Scaled(5.0)
    assert things.resolve(mine) is mine
    assert things.names() == ["double", "scaled"] and "double" in things and len(things) == 2


def test_duplicate_names_are_refused_and_unknown_names_list_the_known():
    things = Registry("thing")
    things.register("a")(len)
    with pytest.raises(ValueError, match="already registered"):
        things.register("a")(max)
    with pytest.raises(ValueError, match=r"unknown thing 'b'.*\['a'\].*class_path"):
        things.get("b")
