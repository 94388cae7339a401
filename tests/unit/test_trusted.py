"""`core.trusted` builds the same instance as pydantic's `model_construct`, for every wire model."""

from __future__ import annotations

import inspect

import pytest
from pydantic import Field

from bridge import core
from bridge import protocol as p

MODELS = [c for c in vars(p).values() if inspect.isclass(c) and issubclass(c, p.WireModel)]


def sample(cls: type[p.WireModel]) -> dict[str, object]:
    """A value for each required field and for every other one but the first optional (its default)."""
    values: dict[str, object] = {}
    optional = 0
    for i, (name, field) in enumerate(cls.model_fields.items()):
        if not field.is_required():
            optional += 1
            if optional == 1:
                continue
        values[name] = f"{name}-{i}"
    return values


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_the_same_instance_as_model_construct(cls: type[p.WireModel]) -> None:
    values = sample(cls)
    expected, got = cls.model_construct(**values), core.trusted(cls, **values)
    assert type(got) is cls
    assert list(got.__dict__.items()) == list(expected.__dict__.items())  # values and order
    assert got.model_fields_set == expected.model_fields_set
    assert got.__pydantic_extra__ is None and got.__pydantic_private__ is None
    assert got == expected and repr(got) == repr(expected)
    if cls.model_fields:
        with pytest.raises(Exception, match="frozen"):
            got.__setattr__(next(iter(cls.model_fields)), "x")


def test_a_chat_event_serializes_like_one_model_construct_made() -> None:
    data = p.ErrorData(code="not-found", message="gone", command=None, retry_after=None)
    fields = {"ts": "2026-11-24T10:00:00.123Z", "request_id": "r", "event_id": "v_1", "data": data}
    got, expected = core.trusted(p.Error, **fields), p.Error.model_construct(**fields)
    assert got.model_dump_json() == expected.model_dump_json()
    assert got.__pydantic_serializer__.to_json(got) == expected.__pydantic_serializer__.to_json(expected)
    assert '"type":"error"' in got.model_dump_json()


class Odd(p.WireModel):
    listed: list[str] = Field(default_factory=list)
    named: str = Field(default="n", alias="Named")


def test_names_it_does_not_know_and_models_it_cannot_copy_go_to_pydantic() -> None:
    assert core.trusted(Odd, Named="x") == Odd.model_construct(Named="x")
    a, b = core.trusted(Odd), core.trusted(Odd)
    assert a.listed == [] and a.listed is not b.listed
    ignored = core.trusted(p.UserOut, user_id="u", display_name=None, active=True, unknown=1)
    assert "unknown" not in ignored.__dict__
    missing = core.trusted(p.UserOut, user_id="u")
    assert missing.__dict__ == p.UserOut.model_construct(user_id="u").__dict__
