"""The Plan value: validation with helpful errors, and JSON round trips."""

import json

import pytest

from skipvlm import Plan


def test_indices_are_sorted_tuples():
    plan = Plan(skip_attention=[5, 0], skip_mlp=[7])
    assert plan.skip_attention == (0, 5)
    assert plan.skip_mlp == (7,)
    assert not plan.is_empty and Plan().is_empty
    assert not plan.runs_attention(5) and plan.runs_attention(1) and not plan.runs_mlp(7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"skip_attention": [-1]}, "negative index -1"),
        ({"skip_mlp": [2, 2]}, r"layer\(s\) \[2\] more than once"),
        ({"skip_attention": [True]}, "not an integer"),
        ({"skip_attention": [1.5]}, "not an integer"),
        ({"skip_attention": "0,1"}, "list of layer indices"),
    ],
)
def test_bad_indices_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Plan(**kwargs)


def test_out_of_range_names_the_allowed_range():
    with pytest.raises(ValueError, match=r"has 4 decoder layers; allowed indices are 0\.\.3"):
        Plan(skip_attention=[4]).validate_for(4)
    Plan(skip_attention=[3]).validate_for(4)


def test_json_round_trip(tmp_path):
    plan = Plan(skip_attention=[0, 5], skip_mlp=[7])
    assert Plan.from_json(plan.to_json()) == plan
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert json.loads(path.read_text())["skip_attention"] == [0, 5]
    assert Plan.load(path) == plan
    assert not list(path.parent.glob(".*tmp"))  # the atomic write left no temporary file


def test_unknown_field_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown plan field\(s\) \['skip_atention'\]"):
        Plan.from_dict({"skip_atention": [1]})
    with pytest.raises(ValueError, match="format version 99"):
        Plan.from_dict({"format_version": 99})
    with pytest.raises(FileNotFoundError, match="no plan file"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: a plan must be JSON"):
        Plan.load(bad)


def test_token_exit_fields_round_trip_and_compose(tmp_path):
    plan = Plan(skip_attention=[3, 1], visual_exit_layer=8)
    assert plan.exits_tokens and not plan.is_empty
    assert Plan.load(plan.save(tmp_path / "p.json")) == plan
    assert plan.skips_only() == Plan(skip_attention=[1, 3])
    assert plan.with_skips(skip_attention=[2]) == Plan(skip_attention=[2], visual_exit_layer=8)
    fastv = Plan(fastv_layer=2, fastv_ratio=0.25, fastv_source="text")
    assert Plan.from_json(fastv.to_json()) == fastv
    assert Plan(dyvte=tmp_path).dyvte == str(tmp_path)
    # A plan written before the token fields existed still loads.
    assert Plan.from_dict({"skip_attention": [1], "skip_mlp": [], "format_version": 1}) == Plan(
        skip_attention=[1]
    )
    assert Plan(visual_exit_layer=4).validate_for(4) is None  # L keeps every visual token


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"visual_exit_layer": 0}, "use 1 or more"),
        ({"visual_exit_layer": 2.5}, "must be a layer index"),
        ({"fastv_layer": 2, "fastv_ratio": 1.5}, r"fastv_ratio is 1.5; it must lie in \[0, 1\]"),
        ({"fastv_layer": 2, "fastv_source": "first"}, "use one of"),
        ({"dyvte": "r", "dyvte_threshold": -0.1}, r"dyvte_threshold is -0.1"),
        ({"dyvte": 3}, "must be the path of a router folder"),
        ({"visual_exit_layer": 3, "fastv_layer": 2}, "one visual-token exit method at a time"),
        ({"fastv_layer": 2, "skip_attention": [1]}, "attention of layer 1, which the plan skips"),
        ({"visual_exit_layer": 2, "skip_attention": [0, 1]}, "every attention before it is skipped"),
    ],
)
def test_bad_token_exit_fields_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Plan(**kwargs)


def test_token_exit_layer_out_of_range():
    with pytest.raises(
        ValueError, match=r"visual_exit_layer is 5, but the model has 4 decoder layers; use 1\.\.4"
    ):
        Plan(visual_exit_layer=5).validate_for(4)
