"""Selector semantics: globs, regexes, types, callables, rules, exclude, graph positions and bad input.

The property tests build random module trees and compare ternq's decisions (read from the dry-run report) with
a direct implementation of the documented semantics.
"""
from __future__ import annotations

import fnmatch
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import ternq
from ternq.errors import SelectorError, UnsupportedLayerError

KEYS = ["enc", "dec", "voc", "conv", "proj", "post", "0", "1", "2"]
LEAVES = {
    "linear": lambda: nn.Linear(2, 2),
    "conv1d": lambda: nn.Conv1d(2, 2, 1),
    "conv2d": lambda: nn.Conv2d(2, 2, 1),
    "convt1d": lambda: nn.ConvTranspose1d(2, 2, 1),
    "norm": lambda: nn.LayerNorm(2),
    "embedding": lambda: nn.Embedding(3, 2),
}
SETTINGS = settings(max_examples=40, deadline=None)
INT4 = ternq.KBitConfig(bits=4)
INT2 = ternq.KBitConfig(bits=2)


def trees(depth: int = 3) -> st.SearchStrategy:
    leaf = st.sampled_from(sorted(LEAVES))
    node = st.recursive(leaf, lambda kids: st.dictionaries(st.sampled_from(KEYS), kids, min_size=1, max_size=3),
                        max_leaves=10)
    return st.dictionaries(st.sampled_from(KEYS), node, min_size=1, max_size=4)


def build(tree: dict | str) -> nn.Module:
    if isinstance(tree, str):
        return LEAVES[tree]()
    return nn.ModuleDict({k: build(v) for k, v in tree.items()})


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """Candidate layers by the documented rule: registered types, found by walking the tree."""
    quantizable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.Embedding)
    return {n: m for n, m in model.named_modules() if type(m) in quantizable}


def with_emb(model: nn.Module, include: list) -> list:
    """Opt embeddings in when the model has some (an include entry matching nothing is an error)."""
    has = any(isinstance(m, nn.Embedding) for m in layers(model).values())
    return [*include, nn.Embedding] if has else include


def has_default_layer(model: nn.Module) -> bool:
    return any(not isinstance(m, nn.Embedding) for m in layers(model).values())


def decisions(model: nn.Module, **kwargs) -> dict[str, str]:
    return {r.layer: r.decision for r in ternq.report(model, **kwargs).rows}


def expected(model: nn.Module, include: list, exclude: list, config=None) -> dict[str, str]:
    """The documented semantics, written directly."""
    config = config or ternq.TernaryConfig()

    def match(sel, name, module):
        if isinstance(sel, ternq.Rule):
            sel = sel.selector
        if isinstance(sel, str) and sel.startswith("re:"):
            return re.fullmatch(sel[3:], name) is not None
        if isinstance(sel, str):
            return fnmatch.fnmatchcase(name, sel)
        if isinstance(sel, type):
            return isinstance(module, sel)
        return bool(sel(name, module))

    opted_in = {s.selector if isinstance(s, ternq.Rule) else s for s in include}
    out = {}
    for name, module in layers(model).items():
        if isinstance(module, nn.Embedding) and nn.Embedding not in opted_in:
            out[name] = "float"
        elif any(match(s, name, module) for s in exclude):
            out[name] = "float"
        elif not include:
            out[name] = config.name
        else:
            rule = next((s for s in include if match(s, name, module)), None)
            if rule is None:
                out[name] = "float"
            else:
                cfg = rule.config if isinstance(rule, ternq.Rule) and rule.config is not None else config
                out[name] = cfg.name
    return out


@st.composite
def model_and_name(draw):
    tree = draw(trees())
    model = build(tree)
    names = sorted(layers(model))
    assume(names)
    return model, draw(st.sampled_from(names))


def glob_from(name: str, draw) -> str:
    """A glob derived from a real name: some characters / dotted parts replaced by wildcards."""
    parts = name.split(".")
    out = []
    for p in parts:
        choice = draw(st.sampled_from(["keep", "star", "qmark", "prefix"]))
        if choice == "star":
            out.append("*")
        elif choice == "qmark":
            out.append("?" * len(p))
        elif choice == "prefix":
            out.append(p[:1] + "*")
        else:
            out.append(p)
    return ".".join(out)


@SETTINGS
@given(data=st.data())
def test_glob_matches_whole_names_like_fnmatchcase(data):
    model, name = data.draw(model_and_name())
    include = with_emb(model, [glob_from(name, data.draw)])
    assert decisions(model, include=include) == expected(model, include, [])


@SETTINGS
@given(data=st.data())
def test_regex_is_fullmatch(data):
    model, name = data.draw(model_and_name())
    parts = name.split(".")
    k = data.draw(st.integers(0, len(parts)))
    regex = "re:" + r"\.".join(re.escape(p) for p in parts[:k]) + (".*" if k < len(parts) else "")
    include = with_emb(model, [regex])
    assert decisions(model, include=include) == expected(model, include, [])
    # a prefix without .* does not match longer names: fullmatch, not search
    if k < len(parts) and k > 0:
        short = "re:" + r"\.".join(re.escape(p) for p in parts[:k])
        if not any(re.fullmatch(short[3:], n) for n in layers(model)):
            with pytest.raises((SelectorError, UnsupportedLayerError), match=re.escape(short)):
                ternq.report(model, include=with_emb(model, [short]))


@SETTINGS
@given(tree=trees(), type_name=st.sampled_from(["linear", "conv1d", "conv2d", "convt1d", "embedding"]))
def test_type_selector_matches_instances(tree, type_name):
    model = build(tree)
    t = type(LEAVES[type_name]())
    if not any(isinstance(m, t) for m in layers(model).values()):
        with pytest.raises(SelectorError, match=t.__name__):
            ternq.report(model, include=[t])
        return
    assert decisions(model, include=[t]) == expected(model, [t], [])


@SETTINGS
@given(tree=trees(), modulus=st.integers(2, 4), residue=st.integers(0, 3))
def test_callable_selector(tree, modulus, residue):
    model = build(tree)
    seen = []

    def pick(name: str, module: nn.Module) -> bool:
        seen.append(name)
        return len(name) % modulus == residue % modulus

    names = [n for n, m in layers(model).items() if not isinstance(m, nn.Embedding)]
    if not any(pick(n, None) for n in names):
        with pytest.raises(SelectorError, match="pick"):
            ternq.report(model, include=[pick])
        return
    assert decisions(model, include=[pick]) == expected(model, [pick], [])
    assert set(seen) >= set(names)


@SETTINGS
@given(data=st.data())
def test_exclude_always_wins_and_first_rule_decides(data):
    model, name = data.draw(model_and_name())
    other = data.draw(st.sampled_from(sorted(layers(model))))
    include = with_emb(model, [ternq.Rule(glob_from(name, data.draw), INT4), ternq.Rule("*", INT2)])
    exclude = [other]
    got = decisions(model, include=include, exclude=exclude)
    assert got == expected(model, include, exclude)
    assert got[other] == "float"  # excluded although include matches it
    # exclude wins over an explicit include of the same name
    assert decisions(model, include=with_emb(model, [other]), exclude=[other])[other] == "float"


@SETTINGS
@given(tree=trees(), junk=st.text(alphabet="xyzq_", min_size=3, max_size=8))
def test_pattern_matching_nothing_names_it_and_suggests(tree, junk):
    model = build(tree)
    if not has_default_layer(model):
        return
    name = next(n for n, m in layers(model).items() if not isinstance(m, nn.Embedding))
    typo = name + junk  # close to a real name, matches nothing
    for kwargs in ({"include": [typo]}, {"exclude": [typo]}):
        with pytest.raises(SelectorError) as info:
            ternq.report(model, **kwargs)
        message = str(info.value)
        assert typo in message
        # the closest real name is suggested, after the pattern (which contains it: `typo in message` alone
        # would already put `name` in the message)
        suggestions = message.split("Closest layer names:", 1)
        assert len(suggestions) == 2 and name in [n.strip() for n in suggestions[1].split(",")]


# --- fixed cases -----------------------------------------------------------------------------------------------


class Net(nn.Module):
    """Traceable: embedding -> encoder (Linear, LayerNorm) -> residual conv block -> head conv -> tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.enc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.block = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 1))
        self.head = nn.Conv1d(4, 2, 1)
        self.aux = nn.Linear(4, 1)

    def forward(self, tokens: torch.Tensor):
        h = self.norm(self.enc(self.emb(tokens))).transpose(1, 2)
        h = h + self.block(h)
        return torch.tanh(self.head(F.leaky_relu(h))), self.aux(h.mean(-1))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        self.late = nn.Linear(2, 2)  # registered last but runs first

    def forward(self, tokens: torch.Tensor):
        if tokens.sum() > 0:  # data-dependent: strict fx fails
            tokens = tokens.clone()
        return self.net(tokens)


def test_output_layers_reads_the_graph():
    model = Net()
    got = {r.layer for r in ternq.report(model, exclude=[ternq.output_layers()]).rows if r.decision == "float"}
    # emb is opt-in (float anyway); head and aux reach the outputs; block.2 and enc are behind other layers
    assert got == {"emb", "head", "aux"}
    block = {r.layer: r.decision for r in ternq.report(model, exclude=[ternq.output_layers(of="block")]).rows}
    assert block["block.2"] == "float" and block["block.0"] == "ternary"


def test_output_layers_passes_through_residuals_but_stops_at_norms():
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.ln, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 3)

        def forward(self, x):
            x = self.a(x)
            return self.ln(self.c(x)) + torch.relu(self.b(x)) + x

    rows = {r.layer: r.rule for r in ternq.report(Res(), exclude=[ternq.output_layers()]).rows}
    assert rows["b"].startswith("exclude[0]") and rows["a"].startswith("exclude[0]")  # via the residual
    assert rows["c"] == "default"  # behind the LayerNorm


def test_output_layers_of_an_untraceable_model():
    model = Untraceable()
    float_rows = {r.layer for r in ternq.report(model, exclude=[ternq.output_layers()]).rows if r.decision == "float"}
    assert float_rows == {"net.emb", "net.head", "net.aux"}


def test_output_layers_errors():
    with pytest.raises(SelectorError, match="'nett'.*net"):
        ternq.report(Untraceable(), exclude=[ternq.output_layers(of="nett")])



def test_helpful_hints():
    model = Net()
    with pytest.raises(SelectorError, match=r'"block\.\*"'):
        ternq.report(model, include=["block"])  # a container, not a layer
    with pytest.raises(SelectorError, match="opt-in"):
        ternq.report(model, include=["emb"])  # embeddings are opt-in by type
    rows = {r.layer: r.decision for r in ternq.report(model, include=[nn.Embedding]).rows}
    assert rows["emb"] == "ternary" and rows["enc"] == "float"
    bad = lambda name, module: name.nonexistent  # noqa: E731
    with pytest.raises(SelectorError, match="raised AttributeError"):
        ternq.report(model, include=[bad])


def test_single_selector_and_functional_calls_match_by_type():
    class Fn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))
            self.k = nn.Parameter(torch.randn(3, 3, 1))

        def forward(self, x):
            return F.conv1d(F.linear(x, self.w).unsqueeze(-1), self.k)

    rows = {r.layer: (r.type, r.decision) for r in ternq.report(Fn(), include=nn.Linear).rows}
    assert rows == {"w": ("F.linear", "ternary"), "k": ("F.conv1d", "float")}
