"""Tuple specs: each preset is exactly the classes of docs/method.md §2, parsed and type-checked."""

import pytest

from gali.engine.errors import ConfigError
from gali.engine.method.tuple_spec import load_spec, parse_expr, spec_from_table, spec_names

# The tables of docs/method.md §2, in the authors' class-index order.
EXPECTED = {
    "ali": [("x", "E(x)"), ("G(z)", "z")],
    "alice": [("x", "E(x)"), ("G(z)", "z")],
    "gali4": [("x", "E(x)"), ("x", "E(G(E(x)))"), ("G(z)", "z"), ("G(E(G(z)))", "z")],
    "gali8": [
        ("x", "E(x)", "G(E(x))", "E(G(E(x)))"),
        ("x", "E(G(E(x)))", "G(E(x))", "E(x)"),
        ("G(E(x))", "E(x)", "x", "E(G(E(x)))"),
        ("G(E(x))", "E(G(E(x)))", "x", "E(x)"),
        ("G(z)", "z", "G(E(G(z)))", "E(G(z))"),
        ("G(z)", "E(G(z))", "G(E(G(z)))", "z"),
        ("G(E(G(z)))", "z", "G(z)", "E(G(z))"),
        ("G(E(G(z)))", "E(G(z))", "G(z)", "z"),
    ],
    "gali-mix": [
        ("x", "E(mask1(x))"),
        ("x", "E(mask2(G(E(mask1(x)))))"),
        ("G(E(mask1(x)))", "E(mask4(mix1(x, G(E(mask1(x))))))"),
        ("mix1(x, G(E(mask1(x))))", "E(mask1(x))"),
        ("G(z)", "z"),
        ("G(E(mask3(G(z))))", "z"),
        ("mix1(x, G(E(mask1(x))))", "E(mask2(G(E(mask1(x)))))"),
        ("x", "E(mask4(mix1(x, G(E(mask1(x))))))"),
    ],
    "gali-pt": [
        ("x", "E(x)", "M(x)"),
        ("x", "E(G(E(x)))", "M(G(E(x)))"),
        ("G(z)", "z", "M(G(z))"),
        ("G(E(G(z)))", "z", "M(G(z))"),
    ],
    # The paper's ablations and baselines (docs/method.md §2.5), in the forms their descriptions choose.
    "ali-pt": [("x", "E(x)", "M(x)"), ("G(z)", "z", "M(G(z))")],
    "alice-pt": [("x", "E(x)"), ("G(z)", "z")],
    "gali4-masked": [
        ("x", "E(mask1(x))"),
        ("x", "E(mask2(G(E(mask1(x)))))"),
        ("G(z)", "z"),
        ("G(E(mask3(G(z))))", "z"),
    ],
    "ali-masked": [("x", "E(mask1(x))"), ("G(z)", "z")],
    "alice-masked": [("x", "E(mask1(x))"), ("G(z)", "z")],
    # The cycle families (docs/method.md §2.6): GALI-4's classes plus a cycle term.
    **{
        name: [("x", "E(x)"), ("x", "E(G(E(x)))"), ("G(z)", "z"), ("G(E(G(z)))", "z")]
        for name in ("gali4-alice", "gali4-alice-mu", "gali4-cycle")
    },
}
RECONSTRUCTION = {
    "alice": ("x", "G(E(x))"),
    "alice-pt": ("M(x)", "M(G(E(x)))"),
    "alice-masked": ("x", "G(E(mask1(x)))"),
    "gali4-alice": ("x", "G(E(x))"),
    "gali4-alice-mu": ("x", "G(mu(x))"),
}
# Network calls per step, docs/method.md §3.6 (ALICE adds G(E(x)) for its pixel loss).
CALLS = {
    "ali": (1, 1, 0),
    "alice": (1, 2, 0),
    "gali4": (3, 3, 0),
    "gali8": (3, 3, 0),
    "gali-mix": (4, 3, 0),
    "gali-pt": (3, 3, 3),
    "ali-pt": (1, 1, 2),
    "alice-pt": (1, 2, 2),
    "gali4-masked": (3, 3, 0),
    "ali-masked": (1, 1, 0),
    "alice-masked": (1, 2, 0),
    "gali4-alice": (3, 3, 0),
    "gali4-alice-mu": (3, 4, 0),  # mu(x) shares E(x)'s forward
    "gali4-cycle": (3, 3, 0),
}


def test_specs_shipped():
    assert sorted(EXPECTED) == spec_names()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_has_exactly_the_papers_classes(name):
    spec = load_spec(name)
    assert [tuple(map(str, c)) for c in spec.classes] == EXPECTED[name]
    assert (spec.count_calls("E"), spec.count_calls("G"), spec.count_calls("M")) == CALLS[name]
    assert (spec.reconstruction and tuple(map(str, spec.reconstruction))) == RECONSTRUCTION.get(name)


def test_slot_layouts():
    assert load_spec("gali8").slot_kinds == ("image", "latent", "image", "latent")
    assert load_spec("gali-pt").slot_kinds == ("image", "latent", "extra")
    assert load_spec("gali-pt").uses_feature_model and not load_spec("gali4").uses_feature_model
    assert load_spec("gali-mix").mask_indices == (1, 2, 3, 4)
    assert [str(e) for e in load_spec("alice").reconstruction] == ["x", "G(E(x))"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("E(z)", "'E' expects image"),
        ("G(x)", "'G' expects latent"),
        ("F(x)", "unknown name 'F'"),
        ("mix1(x)", "takes 2 argument"),
        ("E(x", "expected ',' or ')'"),
        ("x y", "trailing"),
        ("mask0(x)", "unknown name 'mask0'"),
    ],
)
def test_bad_expressions_are_named(text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_expr(text, where="test")


def test_masked_images_only_go_to_the_encoder():
    assert str(parse_expr("E(mask1(x))")) == "E(mask1(x))"
    with pytest.raises(ConfigError, match="D never sees a masked image"):
        spec_from_table({"classes": [["mask1(x)", "z"], ["x", "E(x)"]]}, where="s")


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({"classes": [["x", "E(x)"]]}, "2 to 16"),
        ({"classes": [["x", "E(x)"], ["z", "G(z)"]]}, "slot kinds"),
        ({"classes": [["x", "E(x)"], ["x", "E(x)"]]}, "same tuple"),
        ({"classes": [["x", "E(x)"], ["G(z)", "z"]], "extra": 1}, "unknown keys"),
        ({"classes": [["x", "E(x)"], ["G(z)", "z"]], "reconstruction": ["x"]}, "target, output"),
    ],
)
def test_bad_specs_are_named(table, fragment):
    with pytest.raises(ConfigError, match=fragment):
        spec_from_table(table, where="myspec.toml")


def test_spec_from_a_file_and_missing_file(tmp_path):
    path = tmp_path / "depth3.toml"
    path.write_text('classes = [["x", "E(x)"], ["x", "E(G(E(G(E(x)))))"], ["G(z)", "z"]]\n')
    spec = load_spec(str(path))
    assert spec.num_classes == 3 and spec.count_calls("E") == 3 and spec.count_calls("G") == 3
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(str(tmp_path / "nope.toml"))
