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


def test_a_dotted_path_names_a_component_of_ones_own_and_unregister_frees_a_name(tmp_path, monkeypatch):
    (tmp_path / "mylab_things.py").write_text(
        "class Mine:\n    def __init__(self, size=1):\n        self.size = size\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    things = Registry("thing")
    assert things.resolve("mylab_things.Mine", size=3).size == 3
    with pytest.raises(ValueError, match=r"thing 'mylab_things.Other': cannot import it"):
        things.get("mylab_things.Other")
    things.register("a")(len)
    things.unregister("a")
    things.register("a")(max)
    assert things.get("a") is max
