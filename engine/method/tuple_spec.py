"""Tuple specs as data: the K classes a GALI variant asks D to tell apart (docs/method.md §2).

A spec is a TOML file (package data ``engine/method/tuples/<name>.toml`` or any path) listing, for every class in the
authors' index order, the slots of its tuple as chain expressions:
    x, z, M(img)         real image, prior sample, the frozen pretrained model's features (GALI-PT)
    E(img), G(lat)       one stochastic encoding mu + exp(log_sigma) * eps (fresh eps per call), the generator
    mu(img)              the encoder's mean μ_E(img), no noise (E's forward shared with E(img) of the same img)
    mask<n>(img)         the encoder's masked input, mask n (n = 1..9, one draw per step)
    mix<n>(img, fill)    img outside mask n, fill inside it (GALI-mix's inpainted image)
Equal expressions are the same variable, so each distinct E(...) or G(...) runs once per step (GALI-4: 3 E and 3 G
calls). A spec may also name a ``reconstruction = [target, output]`` pair whose pixel MSE joins the G/E loss (ALICE),
and ``cycle_classes``: K_c >= 2 classes of image pairs, e.g. ``[["x", "x"], ["x", "G(E(x))"]]``, that D's pair head
tells apart with the same K-way losses, weighted by ``method.cycle_lambda`` (the adversarial cycle family,
docs/method.md §2.6).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from gali.engine.config import packaged_names, read_toml
from gali.engine.errors import ConfigError

IMAGE, LATENT, EXTRA, MASKED = "image", "latent", "extra", "masked"

_TOKEN = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*|\(|\)|,)")
_FUNCTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    # name: (argument kinds, result kind)
    "E": ((IMAGE,), LATENT),
    "mu": ((IMAGE,), LATENT),
    "G": ((LATENT,), IMAGE),
    "M": ((IMAGE,), EXTRA),
}
_INDEXED = re.compile(r"^(mask|mix)([1-9])$")
ENCODER_OPS = ("E", "mu")  # the two readings of one encoder forward: a sample, and the mean
PAIR_SLOTS = 2  # images per cycle class: the pair head sees them concatenated on channels
_KEYS = ("name", "description", "classes", "reconstruction", "cycle_classes")


@dataclass(frozen=True)
class Expr:
    """One chain variable: a leaf (``x``, ``z``) or a function applied to arguments."""

    op: str
    args: tuple[Expr, ...] = ()

    def __str__(self) -> str:
        return self.op if not self.args else f"{self.op}({', '.join(map(str, self.args))})"

    @property
    def kind(self) -> str:
        if self.op == "x":
            return IMAGE
        if self.op == "z":
            return LATENT
        indexed = _INDEXED.match(self.op)
        if indexed:
            return MASKED if indexed.group(1) == "mask" else IMAGE
        return _FUNCTIONS[self.op][1]

    def walk(self) -> list[Expr]:
        """This expression and every sub-expression, children first."""
        return [node for arg in self.args for node in arg.walk()] + [self]


def parse_expr(text: str, *, where: str = "expression") -> Expr:
    """Parse and type-check a chain expression such as ``'E(G(E(x)))'``."""
    tokens: list[str] = []
    pos = 0
    while pos < len(text.rstrip()):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ConfigError(where, f"cannot parse {text!r} at character {pos}")
        tokens.append(match.group(1))
        pos = match.end()

    def fail(message: str) -> ConfigError:
        return ConfigError(where, f"{message} in {text!r}")

    def parse(i: int) -> tuple[Expr, int]:
        if i >= len(tokens) or tokens[i] in "(),":
            raise fail("expected a name")
        name = tokens[i]
        if i + 1 < len(tokens) and tokens[i + 1] == "(":
            args: list[Expr] = []
            i += 2
            while True:
                arg, i = parse(i)
                args.append(arg)
                if i < len(tokens) and tokens[i] == ",":
                    i += 1
                    continue
                if i < len(tokens) and tokens[i] == ")":
                    return _typed(name, tuple(args), fail), i + 1
                raise fail("expected ',' or ')'")
        return _typed(name, (), fail), i + 1

    expr, end = parse(0)
    if end != len(tokens):
        raise fail("unexpected trailing text")
    return expr


def _typed(name: str, args: tuple[Expr, ...], fail: Callable[[str], ConfigError]) -> Expr:
    if name in ("x", "z"):
        if args:
            raise fail(f"'{name}' takes no arguments")
        return Expr(name)
    indexed = _INDEXED.match(name)
    if indexed:
        expected = (IMAGE,) if indexed.group(1) == "mask" else (IMAGE, IMAGE)
    elif name in _FUNCTIONS:
        expected = _FUNCTIONS[name][0]
    else:
        raise fail(f"unknown name '{name}' (accepted: x, z, E, mu, G, M, mask1..mask9, mix1..mix9)")
    if len(args) != len(expected):
        raise fail(f"'{name}' takes {len(expected)} argument(s), got {len(args)}")
    for arg, kind in zip(args, expected, strict=True):
        # A masked image is only ever fed to the encoder.
        ok = arg.kind == kind or (name in ENCODER_OPS and arg.kind == MASKED)
        if not ok:
            raise fail(f"'{name}' expects {kind} argument(s), got {arg.kind} '{arg}'")
    return Expr(name, args)


@dataclass(frozen=True)
class TupleSpec:
    """K classes of equal slot layout, an optional ALICE reconstruction pair and optional cycle classes (image pairs
    for D's pair head)."""

    name: str
    classes: tuple[tuple[Expr, ...], ...]
    reconstruction: tuple[Expr, Expr] | None = None
    cycle_classes: tuple[tuple[Expr, ...], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_cycle_classes(self) -> int:
        """K_c, the pair head's number of classes (0: no pair head)."""
        return len(self.cycle_classes)

    @property
    def slot_kinds(self) -> tuple[str, ...]:
        return tuple(expr.kind for expr in self.classes[0])

    @property
    def uses_feature_model(self) -> bool:
        return any(node.op == "M" for node in self.variables())

    @property
    def mask_indices(self) -> tuple[int, ...]:
        found = {int(m.group(2)) for node in self.variables() if (m := _INDEXED.match(node.op))}
        return tuple(sorted(found))

    def variables(self) -> list[Expr]:
        """Every distinct chain variable, each after the variables it depends on."""
        roots = [expr for slots in self.classes + self.cycle_classes for expr in slots]
        if self.reconstruction:
            roots += list(self.reconstruction)
        seen: dict[Expr, None] = {}
        for root in roots:
            for node in root.walk():
                seen.setdefault(node)
        return list(seen)

    def count_calls(self, op: str) -> int:
        """How many times the network ``op`` ('E', 'G' or 'M') runs per step (E once per distinct input: E(img)
        and mu(img) share it)."""
        if op == "E":
            return len({node.args for node in self.variables() if node.op in ENCODER_OPS})
        return sum(node.op == op for node in self.variables())


def spec_names() -> list[str]:
    """Names of the tuple specs shipped as package data."""
    return packaged_names("gali.engine.method", "tuples")


def load_spec(name_or_path: str) -> TupleSpec:
    """Load and validate a tuple spec by name (``'gali4'``) or from a ``.toml`` path."""
    _, table = read_toml(name_or_path, package="gali.engine.method", folder="tuples", key="method.tuples")
    return spec_from_table(table, where=name_or_path)


def spec_from_table(table: dict, *, where: str) -> TupleSpec:
    """Build a :class:`TupleSpec` from a parsed TOML table; every problem names ``where``."""
    unknown = set(table) - set(_KEYS)
    if unknown:
        raise ConfigError(where, f"unknown keys {sorted(unknown)}; accepted: {', '.join(_KEYS)}")
    classes = _parse_classes(table.get("classes"), where=where, key="classes")
    layout = [e.kind for e in classes[0]]
    for k, slots in enumerate(classes):
        kinds = [e.kind for e in slots]
        if MASKED in kinds:
            raise ConfigError(where, f"class {k}: D never sees a masked image; wrap it in E(...) or use mix<n>")
        if kinds != layout:
            raise ConfigError(where, f"class {k} has slot kinds {kinds}, class 0 has {layout}; all must match")
    if len(set(classes)) != len(classes):
        raise ConfigError(where, "two classes are the same tuple")
    reconstruction = None
    if "reconstruction" in table:
        pair = table["reconstruction"]
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ConfigError(where, '\'reconstruction\' must be [target, output], e.g. ["x", "G(E(x))"]')
        target, output = (parse_expr(s, where=f"{where} reconstruction") for s in pair)
        if target.kind != output.kind or target.kind not in (IMAGE, EXTRA):
            raise ConfigError(where, "'reconstruction' compares two images or two feature-model outputs M(...)")
        reconstruction = (target, output)
    cycle_classes: tuple[tuple[Expr, ...], ...] = ()
    if "cycle_classes" in table:
        cycle_classes = _parse_cycle_classes(table["cycle_classes"], where=where)
    return TupleSpec(
        name=str(table.get("name", where)),
        classes=classes,
        reconstruction=reconstruction,
        cycle_classes=cycle_classes,
    )


def _parse_classes(raw: object, *, where: str, key: str) -> tuple[tuple[Expr, ...], ...]:
    """``raw`` (the TOML value of ``key``) as 2 to 16 classes of parsed slots; errors name ``where`` and ``key``."""
    if not isinstance(raw, list) or not 2 <= len(raw) <= 16:
        raise ConfigError(where, f"'{key}' must be a list of 2 to 16 tuples (lists of expressions)")
    classes = []
    for k, slots in enumerate(raw):
        if not isinstance(slots, list) or not slots or not all(isinstance(s, str) for s in slots):
            raise ConfigError(where, f"'{key}' class {k} must be a non-empty list of expression strings")
        label = f"{where} class {k}" if key == "classes" else f"{where} {key} class {k}"
        classes.append(tuple(parse_expr(s, where=label) for s in slots))
    return tuple(classes)


def _parse_cycle_classes(raw: object, *, where: str) -> tuple[tuple[Expr, ...], ...]:
    """The pair head's classes: K_c >= 2 distinct pairs of image expressions."""
    classes = _parse_classes(raw, where=where, key="cycle_classes")
    for k, slots in enumerate(classes):
        kinds = [e.kind for e in slots]
        if kinds != [IMAGE] * PAIR_SLOTS:
            raise ConfigError(
                where,
                f"'cycle_classes' class {k} has slot kinds {kinds}: every class is a pair of images that D's pair "
                'head sees concatenated, e.g. [["x", "x"], ["x", "G(E(x))"]]',
            )
    if len(set(classes)) != len(classes):
        raise ConfigError(where, "two of 'cycle_classes' are the same pair")
    return classes
