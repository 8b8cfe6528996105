"""Control messages (tunnel/common/proto/messages.py): every class in the catalogue is swept.

Serialise then parse gives the message back; the JSON sent is pinned byte for byte (key
order included); parse rejects each missing or wrong-typed required field with a
RemoteProtocolError, and reads a wrong-typed optional field as absent. The sweep derives
its cases from each class's fields, so a new message is covered by adding it to the
catalogue.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from tunnel.common.errors import RemoteProtocolError
from tunnel.common.proto import messages as msg

CLASSES = sorted(msg.CATALOGUE.values(), key=lambda cls: cls.TYPE)
PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

#: A value of each field type, and values of other JSON types that a peer might send.
SAMPLES: dict[str, Any] = {"str": "x", "int": 7, "float": 1.5, "int | None": 7,
                           "str | None": "x", "Mapping[str, Any]": {"hostname": "h"}}
WRONG: dict[str, list[Any]] = {
    "str": [5, None, True, ["x"], {"x": 1}],
    "int": ["7", 7.5, True, None, [7]],
    "float": ["1.5", True, None, [1]],
    "int | None": ["7", 7.5, True, [7]],
}


def field_types(cls: type[msg.Message]) -> dict[str, str]:
    """Each field's type as written in the class (``float`` also takes ints on the wire)."""
    hints = get_type_hints(cls)
    return {f.name: _spelled(hints[f.name]) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def _spelled(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("collections.abc.", "")
    return {"<class 'str'>": "str", "<class 'int'>": "int",
            "<class 'float'>": "float"}.get(text, text)


def required(cls: type[msg.Message]) -> list[str]:
    """Fields a message cannot do without: those with no default."""
    missing = dataclasses.MISSING
    return [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is missing and f.default_factory is missing]


def example(cls: type[msg.Message]) -> msg.Message:
    return cls(**{name: SAMPLES[kind] for name, kind in field_types(cls).items()})


def wire(message: msg.Message) -> dict[str, Any]:
    """What the mux sends, as the peer's mux decodes it."""
    obj = json.loads(json.dumps(message.to_wire(), separators=(",", ":")))
    assert isinstance(obj, dict)
    return obj


def test_the_catalogue_holds_every_message_class() -> None:
    defined = {name for name, value in vars(msg).items()
               if isinstance(value, type) and dataclasses.is_dataclass(value)}
    assert defined == {cls.__name__ for cls in CLASSES}
    assert all(msg.CATALOGUE[cls.TYPE] is cls for cls in CLASSES)
    assert all(kind in SAMPLES for cls in CLASSES for kind in field_types(cls).values())


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.TYPE)
def test_serialise_then_parse_gives_the_message_back(cls: type[msg.Message]) -> None:
    message = example(cls)
    obj = wire(message)
    assert next(iter(obj)) == "type" and obj["type"] == cls.TYPE
    assert msg.parse(obj, cls) == message
    assert cls.from_wire(obj) == message
    assert wire(cls.from_wire(obj)) == obj


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.TYPE)
def test_extra_fields_are_ignored(cls: type[msg.Message]) -> None:
    message = example(cls)
    obj = {**wire(message), "added_by_a_newer_peer": [1, 2]}
    if cls is msg.Telemetry:  # figures are carried as sent, for the receiver to coerce
        return
    assert msg.parse(obj, cls) == message


CASES = [(cls, name) for cls in CLASSES for name in required(cls)]


@pytest.mark.parametrize(("cls", "name"), CASES, ids=[f"{c.TYPE}.{n}" for c, n in CASES])
def test_parse_rejects_a_missing_or_wrong_typed_required_field(cls: type[msg.Message],
                                                               name: str) -> None:
    obj = wire(example(cls))
    kind = field_types(cls)[name]
    if kind != "int | None":  # a missing nullable field reads as null
        without = {key: value for key, value in obj.items() if key != name}
        with pytest.raises(RemoteProtocolError, match=f"field '{name}' missing"):
            msg.parse(without, cls)
    for wrong in WRONG[kind]:
        with pytest.raises(RemoteProtocolError, match=f"field '{name}' missing"):
            msg.parse({**obj, name: wrong}, cls)


@pytest.mark.parametrize(("cls", "name"), [(c, n) for c, n in CASES
                                           if field_types(c)[n] == "str"])
def test_parse_rejects_an_overlong_text_field(cls: type[msg.Message], name: str) -> None:
    obj = {**wire(example(cls)), name: "x" * (msg.MAX_TEXT + 1)}
    with pytest.raises(RemoteProtocolError, match=f"field '{name}' too long"):
        msg.parse(obj, cls)


OPTIONAL = [(cls, f.name) for cls in CLASSES for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.name not in required(cls) and cls is not msg.Telemetry]


@pytest.mark.parametrize(("cls", "name"), OPTIONAL, ids=[f"{c.TYPE}.{n}" for c, n in OPTIONAL])
def test_a_wrong_typed_optional_field_reads_as_absent(cls: type[msg.Message], name: str) -> None:
    obj = wire(example(cls))
    for wrong in (True, [1], {"a": 1}, 1.5):
        parsed = msg.parse({**obj, name: wrong}, cls)
        assert getattr(parsed, name) is None


def test_parse_accepts_only_the_types_allowed_here() -> None:
    obj = wire(example(msg.Expose))
    assert isinstance(msg.parse(obj, msg.Telemetry, msg.Expose), msg.Expose)
    for kind in ("auth", None, 5, ["expose"], "x" * 100):
        with pytest.raises(RemoteProtocolError, match="unexpected control message"):
            msg.parse({**obj, "type": kind}, msg.Expose, msg.Telemetry)


#: The JSON each message puts on the wire, byte for byte: peers of other versions read it.
GOLDEN: list[tuple[msg.Message, str]] = [
    (msg.Challenge(1, "bm9uY2U=", "0.1.0"),
     '{"type":"challenge","version":1,"nonce":"bm9uY2U=","server_version":"0.1.0"}'),
    (msg.Auth("bg==", "0.1.0", proof="cA=="),
     '{"type":"auth","nonce":"bg==","client_version":"0.1.0","proof":"cA=="}'),
    (msg.Auth("bg==", "0.1.0", key_id="k", signature="cw=="),
     '{"type":"auth","nonce":"bg==","client_version":"0.1.0","key_id":"k","signature":"cw=="}'),
    (msg.Welcome("gpu-box-1", 10, 30.0, 256),
     '{"type":"welcome","client":"gpu-box-1","heartbeat_interval":10,'
     '"heartbeat_timeout":30.0,"max_streams":256}'),
    (msg.Refused("authentication failed"),
     '{"type":"refused","reason":"authentication failed"}'),
    (msg.Expose(1, "127.0.0.1:6006", "auto", None),
     '{"type":"expose","id":1,"target":"127.0.0.1:6006","mode":"auto","port":null}'),
    (msg.Exposed(0, 6000, "fixed"), '{"type":"exposed","id":0,"port":6000,"mode":"fixed"}'),
    (msg.ExposeRefused(0, 6000, "taken"),
     '{"type":"expose_refused","id":0,"port":6000,"reason":"taken"}'),
    (msg.Error("boom"), '{"type":"error","message":"boom"}'),
    (msg.Telemetry({"hostname": "box", "gpus": []}),
     '{"type":"telemetry","hostname":"box","gpus":[]}'),
]


@pytest.mark.parametrize(("message", "text"), GOLDEN, ids=[m.TYPE for m, _ in GOLDEN])
def test_golden_json(message: msg.Message, text: str) -> None:
    assert json.dumps(message.to_wire(), separators=(",", ":")) == text
    assert msg.parse(json.loads(text), type(message)) == message


def test_every_class_has_its_line_in_the_protocol_document() -> None:
    """docs/protocol.md names each message's type and its class, so neither drifts."""
    doc = PROTOCOL_DOC.read_text(encoding="utf-8")
    for cls in CLASSES:
        assert re.search(rf'"type":"{cls.TYPE}".*`{cls.__name__}`', doc), cls.TYPE
    assert {cls.TYPE for cls in CLASSES} == set(re.findall(r'"type":"(\w+)"', doc))


def test_telemetry_figures_are_carried_as_sent() -> None:
    figures: Mapping[str, Any] = {"gpu_status": "telemetry failed"}
    assert wire(msg.Telemetry(figures)) == {"type": "telemetry", **figures}
    assert msg.parse({"type": "telemetry"}, msg.Telemetry) == msg.Telemetry({})
