"""ctxaware.identity: every included field changes a result's identity, no excluded field does."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from ctxaware.errors import ConfigError
from ctxaware.identity import EXCLUDED, FIELDS, Identity, model_id, result_identity, steering_identity
from ctxaware.steering import SteeringConfig

BASE = dict(model="org/model", dtype="bfloat16", device="cpu", adapter=None, engine="transformers", template=True,
            steering=None, indicator=False, max_new_tokens=40, greedy=True, stop=None, prompt="abc",
            judge_url=None, judge_model=None, batch={"batch_size": 8}, extra={"needle": "SF", "length": 1000})

#: for each included keyword of result_identity, a value different from BASE's
CHANGED = {
    "model": "org/other", "dtype": "float32", "device": "cuda", "adapter": "dir:0123", "engine": "vllm",
    "template": False, "steering": SteeringConfig(alpha=0.9), "indicator": True, "max_new_tokens": 41,
    "greedy": False, "stop": ["\n"], "prompt": "abd", "judge_url": "http://127.0.0.1:1/v1", "judge_model": "j",
    "batch": {"batch_size": 4}, "extra": {"needle": "pizza", "length": 1000},
}


def test_every_field_is_covered():
    covered = {"model", "adapter", "dtype", "device", "engine", "template", "steering", "indicator", "prompt",
               "batch", "extra"} | {"decoding", "judge", "kind"}
    assert covered == set(FIELDS)
    assert not set(FIELDS) & set(EXCLUDED)


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_included_field_changes_identity(name):
    a = result_identity("niah-cell", **BASE)
    b = result_identity("niah-cell", **{**BASE, name: CHANGED[name]})
    assert a != b and a.digest != b.digest
    assert a.diff(b), name


def test_kind_changes_identity():
    assert result_identity("qa", **BASE) != result_identity("niah-cell", **BASE)


@pytest.mark.parametrize("name", sorted(EXCLUDED))
def test_excluded_field_does_not_change_identity(name):
    a = result_identity("niah-cell", **BASE)
    for value in (0, 7, "x", True, None):
        b = result_identity("niah-cell", **{**BASE, "extra": {**BASE["extra"], name: value}})
        assert a == b and a.digest == b.digest and not a.diff(b)


STEER_FIELDS = {"alpha": 0.8, "heads": "0-3", "emphasis": "system+user", "compounding": "reference"}


@pytest.mark.parametrize("name", sorted(STEER_FIELDS))
def test_alpha_rule_steering_fields(name):
    base = SteeringConfig(alpha=0.9)
    a = result_identity("niah-cell", **{**BASE, "steering": base})
    b = result_identity("niah-cell", **{**BASE, "steering": SteeringConfig(**{**base.to_dict(), name: STEER_FIELDS[name]})})
    assert a != b
    assert a.diff(b) == [f"steering.{name}"]


def test_share_rule_share_and_rule_change_identity_alpha_does_not():
    s3 = SteeringConfig(rule="share", share=0.3)
    s9 = SteeringConfig(rule="share", share=0.9)
    ident = [result_identity("niah-cell", **{**BASE, "steering": s}) for s in (s3, s9)]
    assert ident[0] != ident[1] and ident[0].diff(ident[1]) == ["steering.share"]
    alpha_other = SteeringConfig(rule="share", share=0.3, alpha=0.5)  # ignored under the share rule
    assert result_identity("niah-cell", **{**BASE, "steering": alpha_other}) == ident[0]
    assert result_identity("niah-cell", **{**BASE, "steering": SteeringConfig(alpha=0.95)}) != ident[0]
    assert steering_identity(s3)["rule"] == "share"


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(CHANGED)), extra_key=st.text(min_size=1, max_size=8),
       extra_val=st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5)))
def test_property_included_changes_excluded_not(name, extra_key, extra_val):
    a = result_identity("niah-cell", **BASE)
    assert result_identity("niah-cell", **{**BASE, name: CHANGED[name]}) != a
    new_extra = {**BASE["extra"], extra_key: extra_val}
    b = result_identity("niah-cell", **{**BASE, "extra": new_extra})
    if extra_key in EXCLUDED:
        assert b == a
    elif extra_key in BASE["extra"] and new_extra[extra_key] == BASE["extra"][extra_key]:
        assert b == a
    else:
        assert b != a and b.diff(a) == [f"extra.{extra_key}"]


def test_round_trip_and_one_line_refusal(tmp_path):
    a = result_identity("niah-cell", **BASE)
    assert Identity.from_dict(a.to_dict()) == a
    b = result_identity("niah-cell", **{**BASE, "steering": SteeringConfig(rule="share", share=0.9)})
    a.require_same(a.to_dict(), "DIR")
    with pytest.raises(ConfigError) as exc:
        b.require_same(a.to_dict(), "DIR")
    msg = str(exc.value)
    assert "\n" not in msg and "steering" in msg and "--overwrite" in msg
    with pytest.raises(ConfigError, match="older ctxaware"):
        a.require_same(None, "DIR")
    with pytest.raises(ConfigError, match="resolved dtype"):
        result_identity("x", **{**BASE, "dtype": "auto"})


def test_model_id_digests_content_not_folder_name(tmp_path):
    for arm, weights in (("vanilla", b"\x00" * 64), ("conditional", b"\x01" * 64)):
        d = tmp_path / arm / "model"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text('{"base_model_name_or_path": "org/base"}')
        (d / "adapter_model.safetensors").write_bytes(weights)
    a, b = model_id(tmp_path / "vanilla" / "model"), model_id(tmp_path / "conditional" / "model")
    assert a.startswith("dir:") and b.startswith("dir:") and a != b
    (tmp_path / "vanilla" / "model" / "README.md").write_text("notes")  # bookkeeping does not count
    assert model_id(tmp_path / "vanilla" / "model") == a
    moved = tmp_path / "elsewhere"
    (tmp_path / "vanilla" / "model").rename(moved)
    assert model_id(moved) == a  # the name of the folder does not count either
    assert model_id("org/model") == "org/model"
