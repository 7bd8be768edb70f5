"""``tensors=`` selections: names, one glob, a predicate, or everything."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightcache.client.selection import (
    Selector,
    check_all_found,
    make_selector,
    missing_names,
)

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def picked(spec: Any) -> list[str]:
    select = make_selector(spec)
    return [name for name in NAMES if select(name)]


def test_none_selects_everything() -> None:
    assert picked(None) == NAMES
    assert make_selector(None).names is None


def test_glob_is_case_sensitive_and_whole_name() -> None:
    assert picked("model.layers.*.mlp.*") == [
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]
    assert picked("model.layers.[1].*q_proj*") == ["model.layers.1.self_attn.q_proj.weight"]
    assert picked("lm_head") == []  # the whole name must match
    assert picked("LM_HEAD.weight") == []
    assert picked("*") == NAMES
    assert make_selector("*").names is None


@pytest.mark.parametrize(
    "spec",
    [
        ["lm_head.weight", "model.norm.weight"],
        ("model.norm.weight", "lm_head.weight"),
        {"lm_head.weight", "model.norm.weight"},
        frozenset({"lm_head.weight", "model.norm.weight"}),
        {"lm_head.weight": 0, "model.norm.weight": 1}.keys(),
        (n for n in ["lm_head.weight", "model.norm.weight"]),
    ],
    ids=["list", "tuple", "set", "frozenset", "keys", "generator"],
)
def test_exact_names_in_any_iterable(spec: Any) -> None:
    select = make_selector(spec)
    assert [n for n in NAMES if select(n)] == ["model.norm.weight", "lm_head.weight"]
    assert select.names == {"lm_head.weight", "model.norm.weight"}


def test_exact_names_are_not_patterns() -> None:
    assert picked(["model.layers.*.mlp.*"]) == []


def test_predicate_is_used_as_is_and_coerced_to_bool() -> None:
    assert picked(lambda n: n.startswith("lm_")) == ["lm_head.weight"]
    assert picked(lambda n: "norm" in n and 1) == ["model.norm.weight"]
    assert make_selector(lambda n: True).names is None


def test_selector_passes_through() -> None:
    selector = make_selector(["lm_head.weight"])
    assert make_selector(selector) is selector
    assert isinstance(selector, Selector)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (b"lm_head.weight", "not bytes"),
        (["lm_head.weight", 3], "must be str, got int"),
        ([b"x"], "got bytes"),
        (3, "not int"),
    ],
)
def test_wrong_kinds_are_type_errors(spec: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        make_selector(spec)


def test_missing_names_only_for_exact_names() -> None:
    seen = set(NAMES)
    assert missing_names(["lm_head.weight", "nope", "also.nope"], seen) == ["also.nope", "nope"]
    assert missing_names(["lm_head.weight"], seen) == []
    assert missing_names(None, seen) == []
    assert missing_names("nothing.matches.*", seen) == []
    assert missing_names(lambda n: False, seen) == []
    assert missing_names([], seen) == []


def test_check_all_found_names_the_missing_and_suggests() -> None:
    check_all_found(["lm_head.weight"], NAMES)
    check_all_found("model.layers.1.*", NAMES)
    check_all_found(lambda n: False, NAMES)  # a predicate's choice, even of nothing
    with pytest.raises(ValueError) as info:
        check_all_found(["lm_head.weigth", "model.norm.weight"], NAMES, where="s3://m/llama")
    message = str(info.value)
    assert message.startswith("s3://m/llama: 1 requested tensor(s) not found: 'lm_head.weigth'")
    assert "close matches: 'lm_head.weight'" in message
    assert f"({len(NAMES)} tensors in all)" in message


def test_check_all_found_without_close_matches_lists_a_few_names() -> None:
    wanted = [f"zz{i}" for i in range(9)]
    with pytest.raises(ValueError) as info:
        check_all_found(wanted, NAMES)
    message = str(info.value)
    assert "9 requested tensor(s) not found" in message
    assert "'zz0', 'zz1', 'zz2', 'zz3', 'zz4' and 4 more" in message
    assert "available names include: 'lm_head.weight'" in message
    with pytest.raises(ValueError, match="the model has no tensors"):
        check_all_found(["a"], [])


@settings(max_examples=200)
@given(st.text(max_size=12), st.text(max_size=12))
def test_glob_agrees_with_fnmatchcase(pattern: str, name: str) -> None:
    assert make_selector(pattern)(name) == fnmatch.fnmatchcase(name, pattern)


@settings(max_examples=200)
@given(st.lists(st.text(max_size=8), unique=True), st.data())
def test_exact_names_select_exactly_those(names: list[str], data: st.DataObject) -> None:
    wanted = data.draw(st.lists(st.sampled_from(names), unique=True)) if names else []
    extra = data.draw(st.lists(st.text(max_size=8).filter(lambda s: s not in names)))
    select = make_selector(wanted + extra)
    assert [n for n in names if select(n)] == [n for n in names if n in wanted]
    assert missing_names(select, names) == sorted(set(extra))


def test_a_glob_that_matches_nothing_is_an_error_listing_names() -> None:
    with pytest.raises(ValueError) as info:
        check_all_found("model.layer.*", NAMES, where="file:///m")
    message = str(info.value)
    assert message.startswith("file:///m: tensors='model.layer.*' matches no tensor; ")
    assert "available names include: 'lm_head.weight', 'model.embed_tokens.weight'" in message
    assert "and 2 more" in message and f"({len(NAMES)} tensors in all" in message
    assert "tensors=[] asks for none" in message
    # The likely slip, a pattern right but for case, is what it shows.
    with pytest.raises(ValueError, match=re.escape("matching but for case: 'lm_head.weight'")):
        check_all_found("LM_HEAD.*", NAMES)
    with pytest.raises(ValueError, match="the model has no tensors"):
        check_all_found("*", [])


def test_an_empty_collection_explicitly_selects_nothing() -> None:
    assert picked([]) == [] and picked(()) == [] and picked(set()) == []
    check_all_found([], NAMES)
    check_all_found([], [])
    assert make_selector([]).names == frozenset() and make_selector([]).pattern is None
