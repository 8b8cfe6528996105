"""Control messages (tunnel/common/proto/messages.py): every class in the catalogue is swept.

Serialise then parse gives the message back; the JSON sent is pinned byte for byte (key
order included); parse rejects each missing or wrong-typed required field with a
RemoteProtocolError, and reads a wrong-typed optional field as absent where the protocol
says so. Every field of every class declares its range (``FIELDS``): a sweep generates
values just outside each range (bounds ± 1, huge and negative ints, booleans for ints,
non-finite numbers, empty, overlong and malformed strings) and expects a
RemoteProtocolError for each, and docs/protocol.md's field table must state the same
ranges. The sweeps derive their cases from the specs, so a new field is covered by
declaring it.
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
from tunnel.common.proto import fields
from tunnel.common.proto import messages as msg
from tunnel.common.proto.fields import FieldSpec

CLASSES = sorted(msg.CATALOGUE.values(), key=lambda cls: cls.TYPE)
PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

#: Values of other JSON types that a peer might send, by the field's type.
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


#: A valid value of each text shape.
SHAPE_SAMPLES: dict[str, str] = {
    fields.ANY_TEXT.name: "x", fields.BASE64.name: "bm9uY2U=", fields.BASE64URL.name: "k-_1",
    fields.PRINTABLE.name: "0.1.0", fields.WORD.name: "fixed", fields.CLIENT_NAME.name: "gpu-1",
    fields.HOST_PORT.name: "127.0.0.1:6006",
}


def sample(spec: FieldSpec) -> Any:
    """A value inside the spec's range."""
    if spec.kind == "text":
        return SHAPE_SAMPLES[spec.shape.name]
    if spec.kind == "number":
        return min(1.5, spec.high)
    return min(max(7, int(spec.low)), int(spec.high))


def example(cls: type[msg.Message]) -> msg.Message:
    if cls is msg.Telemetry:
        return msg.Telemetry({"hostname": "h"})
    return cls(**{spec.name: sample(spec) for spec in cls.FIELDS})


def wire(message: msg.Message) -> dict[str, Any]:
    """What the mux sends, as the peer's mux decodes it."""
    obj = json.loads(json.dumps(message.to_wire(), separators=(",", ":")))
    assert isinstance(obj, dict)
    return obj


def test_the_catalogue_holds_every_message_class() -> None:
    defined = {name for name, value in vars(msg).items()
               if isinstance(value, type) and dataclasses.is_dataclass(value)
               and value.__module__ == msg.__name__}
    assert defined == {cls.__name__ for cls in CLASSES}
    assert all(msg.CATALOGUE[cls.TYPE] is cls for cls in CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.TYPE)
def test_every_field_has_a_spec_in_constructor_order(cls: type[msg.Message]) -> None:
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    if cls is msg.Telemetry:  # free-form figures, coerced by the receiver
        assert cls.FIELDS == ()
        return
    assert [spec.name for spec in cls.FIELDS] == names


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


OPTIONAL = [(cls, spec.name) for cls in CLASSES for spec in cls.FIELDS if spec.lenient]


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


# ----------------------------------------------------------------------------- field ranges

SPECS = [(cls, spec) for cls in CLASSES for spec in cls.FIELDS]
#: Malformed strings of each shape (right type, plausible length).
MALFORMED: dict[str, list[str]] = {
    fields.ANY_TEXT.name: [],
    fields.BASE64.name: ["bm9uY2U", "bm9u Y2U=", "bm9uY2U=\n", "bm9u_2U=", "====", "é"],
    fields.BASE64URL.name: ["k+1", "k=", "k 1", "k\x00", "é"],
    fields.PRINTABLE.name: ["0.1 .0", "0.1.0\n", "\x00", "0.1.é"],
    fields.WORD.name: ["Fixed", "fixed ", "1fixed", "fi-xed", "é", "\x00"],
    fields.CLIENT_NAME.name: ["-gpu", "gpu box", "gpu/1", "gpu\n", "é"],
    fields.HOST_PORT.name: [
        "127.0.0.1", "127.0.0.1:", ":22", "127.0.0.1:0", "127.0.0.1:65536", "host:+1",
        "host:01", "host:22 ", " host:22", "local host:22", "-host:22", "a..b:22",
        "999.1.1.1:22", "::1:22", "[::1:22", "[zz::1]:22", "[::1%a b]:22", "host:22:33",
        "host\x00:22", "hóst:22", "a" * 64 + ":22", ("a." * 127) + "a:22",
        "http://host:22", "user@host:22",
    ],
}


def out_of_range(spec: FieldSpec) -> list[Any]:
    """Values of the right JSON type that lie outside the spec's range."""
    if spec.kind == "int":
        low, high = int(spec.low), int(spec.high)
        return [low - 1, high + 1, low - 2**64, high + 2**64, 2**64, -(2**64), 10**100,
                -(10**100)]
    if spec.kind == "number":
        return [spec.low, spec.low - 1, spec.high * 2, 10**400, -(10**400), float("nan"),
                float("inf"), float("-inf")]
    overlong = [sample(spec) * (spec.max_len + 1), "x" * (spec.max_len + 1), "x" * 100_000]
    empty = [] if spec.shape is fields.ANY_TEXT else [""]
    return [*overlong, *empty, *MALFORMED[spec.shape.name]]


def wrong_type(spec: FieldSpec) -> list[Any]:
    """JSON values of another type (null only where the field is not optional)."""
    others: list[Any] = [True, False, [], {}, ["x"], {"x": 1}]
    if spec.kind == "text":
        others += [0, 1, 1.5, 2**64]
    else:
        others += ["1", "", "0x10"]
    if spec.kind == "int":
        others += [1.0, 1.5, float(spec.low)]
    if not spec.optional:
        others.append(None)
    return others


@pytest.mark.parametrize(("cls", "spec"), SPECS, ids=[f"{c.TYPE}.{s.name}" for c, s in SPECS])
def test_every_value_outside_a_fields_range_is_a_protocol_error(cls: type[msg.Message],
                                                                  spec: FieldSpec) -> None:
    obj = wire(example(cls))
    assert msg.parse(obj, cls) == example(cls)
    for bad in out_of_range(spec):
        with pytest.raises(RemoteProtocolError, match=f"field '{spec.name}' out of range"):
            msg.parse({**obj, spec.name: bad}, cls)
    for bad in wrong_type(spec):
        if spec.lenient:  # the protocol reads these as absent (reliability S-1)
            assert getattr(msg.parse({**obj, spec.name: bad}, cls), spec.name) is None
            continue
        with pytest.raises(RemoteProtocolError, match=f"field '{spec.name}' missing or of"):
            msg.parse({**obj, spec.name: bad}, cls)


@pytest.mark.parametrize(("cls", "spec"), SPECS, ids=[f"{c.TYPE}.{s.name}" for c, s in SPECS])
def test_the_bounds_of_each_range_are_accepted(cls: type[msg.Message], spec: FieldSpec) -> None:
    obj = wire(example(cls))
    if spec.kind == "int":
        edges: list[Any] = [int(spec.low), int(spec.high)]
    elif spec.kind == "number":
        edges = [spec.high, spec.low + 1e-9]
    else:
        edges = [sample(spec)]
        if spec.shape is fields.ANY_TEXT:
            edges += ["", "é" * spec.max_len]
    for edge in edges:
        assert getattr(msg.parse({**obj, spec.name: edge}, cls), spec.name) == edge


@pytest.mark.parametrize("target", [
    "127.0.0.1:1", "localhost:65535", "gpu-box.lan.:22", "[::1]:8888", "[fe80::1%eth0]:22",
    "a" * 63 + ":22", ".".join(["a" * 63] * 3) + "." + "a" * 61 + ":65535",
])
def test_targets_the_client_grammar_writes_are_accepted(target: str) -> None:
    obj = {**wire(example(msg.Expose)), "target": target}
    assert msg.parse(obj, msg.Expose).target == target


def _doc_field_table() -> dict[tuple[str, str], str]:
    """docs/protocol.md's field table: (type, field) -> the range as written."""
    doc = PROTOCOL_DOC.read_text(encoding="utf-8")
    section = doc.split("### Field ranges", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| (.+?) \|$", section, re.MULTILINE)
    return {(kind, name): text for kind, name, text in rows}


def test_the_protocol_document_states_each_fields_range() -> None:
    """One row per field, in the words FieldSpec.describe gives its range."""
    table = {(cls.TYPE, spec.name): spec.describe() for cls, spec in SPECS}
    assert _doc_field_table() == table
