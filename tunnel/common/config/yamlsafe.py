"""Strict YAML loading for config files.

``yaml.safe_load`` is safe against code execution but still lenient in ways that hurt a
config file: it silently keeps the last of two duplicate keys, expands anchors and aliases
(an "alias bomb" turns a few hundred bytes into gigabytes) and accepts tags such as
``!!set`` or ``!!binary`` that no config value needs. So we only let PyYAML *compose* the
node tree and build plain Python objects ourselves, refusing each of those on the way.
Scalars are still resolved by the SafeLoader's own resolver and constructors, so values mean
exactly what they mean under ``yaml.safe_load`` (``on`` is ``True``, ``0x1F90`` is 8080); the
type checks in :mod:`tunnel.server.config` then reject the type traps.

While building, the line of every key path is recorded so later validation errors can point
at the line the user has to edit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml
from yaml.events import AliasEvent, NodeEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from tunnel.common.config.base import child_path, item_path
from tunnel.common.errors import ConfigError

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_NESTING_DEPTH",
    "YamlDocument",
    "child_path",
    "item_path",
    "load_yaml_document_file",
    "load_yaml_document_text",
    "load_yaml_file",
    "load_yaml_text",
]

MAX_CONFIG_BYTES = 1024 * 1024
"""Config files are a few kilobytes; anything larger is a mistake or an attack."""

MAX_NESTING_DEPTH = 32
"""Deeper than any real config; stops ``[[[[...`` from exhausting the parser's recursion."""

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(
    _TAG + name for name in ("null", "bool", "int", "float", "str", "timestamp")
)
_SEQ_TAG = _TAG + "seq"
_MAP_TAG = _TAG + "map"


_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)", re.ASCII)


@dataclass(frozen=True)
class YamlDocument:
    """A loaded document plus the 1-based line and column of every key path, for errors."""

    data: object
    lines: Mapping[str, int] = field(default_factory=dict)
    columns: Mapping[str, int] = field(default_factory=dict)

    def line_of(self, key_path: str) -> int | None:
        return self.lines.get(key_path)


class _Mark(Protocol):
    """What we use of PyYAML's two Mark classes (pure Python and libyaml)."""

    @property
    def line(self) -> int: ...

    @property
    def column(self) -> int: ...


class _Refused(Exception):
    """Raised inside the composer; turned into a ConfigError once the source is known."""

    def __init__(self, mark: _Mark | None, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that records anchored nodes and caps nesting while composing."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.anchored: set[int] = set()
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in stubs
        if self._depth >= MAX_NESTING_DEPTH:
            raise _Refused(event.start_mark, f"nesting deeper than {MAX_NESTING_DEPTH} levels")
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        # An alias event yields the node its anchor already registered, so recording the
        # anchored node is enough to catch every alias too.
        is_anchor = isinstance(event, NodeEvent) and not isinstance(event, AliasEvent)
        if node is not None and is_anchor and event.anchor is not None:
            self.anchored.add(id(node))
        return node


def _line(mark: _Mark | None) -> int | None:
    return None if mark is None else mark.line + 1


def _column(mark: _Mark | None) -> int | None:
    return None if mark is None else mark.column + 1


def _at(mark: _Mark | None) -> str:
    """`` (line L, column C)``: an editor can jump straight to the offending value."""
    line = _line(mark)
    return "" if line is None else f" (line {line}, column {_column(mark)})"


class _Builder:
    """Turns a composed node tree into dicts, lists and scalars, refusing what we forbid."""

    def __init__(self, loader: _StrictLoader, source: str) -> None:
        self._loader = loader
        self._source = source
        self.lines: dict[str, int] = {}
        self.columns: dict[str, int] = {}

    def build(self, node: Node, path: str) -> object:
        if id(node) in self._loader.anchored:
            raise ConfigError(self._source, path,
                              f"anchors and aliases are not allowed{_at(node.start_mark)}")
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, SequenceNode) and node.tag == _SEQ_TAG:
            return self._sequence(node, path)
        if isinstance(node, MappingNode) and node.tag == _MAP_TAG:
            return self._mapping(node, path)
        raise self._bad_tag(node, path)

    def _bad_tag(self, node: Node, path: str) -> ConfigError:
        return ConfigError(self._source, path,
                           f"tag {_show_tag(node.tag)} is not allowed{_at(node.start_mark)}; "
                           "only plain YAML values (strings, numbers, booleans, null, "
                           "lists, mappings) are accepted")

    def _scalar(self, node: ScalarNode, path: str) -> object:
        if node.tag not in _SCALAR_TAGS:
            raise self._bad_tag(node, path)
        if node.tag == _TAG + "int" and not _PLAIN_INT.fullmatch(node.value):
            # YAML 1.1 reads 010 as 8, 0x1F90 as 8080 and 1_000 as 1000: a port written
            # that way is almost certainly a typo, so only plain decimal integers pass.
            raise ConfigError(self._source, path,
                              f"integer {node.value!r} must be written in plain decimal"
                              f"{_at(node.start_mark)}; quote it if it is meant as text")
        try:
            return self._loader.construct_object(node)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(self._source, path,
                              f"invalid {node.tag.removeprefix(_TAG)} value"
                              f"{_at(node.start_mark)}: {exc}") from None

    def _sequence(self, node: SequenceNode, path: str) -> list[object]:
        out: list[object] = []
        for index, item in enumerate(node.value):
            sub = item_path(path, index)
            self._remember(sub, item)
            out.append(self.build(item, sub))
        return out

    def _mapping(self, node: MappingNode, path: str) -> dict[object, object]:
        out: dict[object, object] = {}
        first_line: dict[object, int | None] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, path)
            sub = child_path(path, str(key))
            if key in out:
                mark = key_node.start_mark
                raise ConfigError(self._source, sub,
                                  f"duplicate key (line {_line(mark)}, column "
                                  f"{_column(mark)}, first at line {first_line[key]})")
            first_line[key] = _line(key_node.start_mark)
            self._remember(sub, key_node)
            out[key] = self.build(value_node, sub)
        return out

    def _key(self, node: Node, path: str) -> object:
        if not isinstance(node, ScalarNode):
            raise ConfigError(self._source, path,
                              f"mapping keys must be plain scalars{_at(node.start_mark)}")
        if node.tag == _TAG + "merge":
            raise ConfigError(self._source, path,
                              f"merge keys (<<) are not allowed{_at(node.start_mark)}")
        key = self.build(node, path)
        if isinstance(key, float):
            # Floats as keys (e.g. ``.nan``) hash and compare oddly; no config needs them.
            raise ConfigError(self._source, path,
                              f"mapping keys must not be floats{_at(node.start_mark)}")
        return key

    def _remember(self, path: str, node: Node) -> None:
        line, column = _line(node.start_mark), _column(node.start_mark)
        if line is not None and column is not None:
            self.lines.setdefault(path, line)
            self.columns.setdefault(path, column)


def _show_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _position(text: str, offset: int) -> str:
    """``line L, column C`` of character ``offset`` in ``text`` (both 1-based)."""
    before = text[:offset]
    return f"line {before.count(chr(10)) + 1}, column {offset - before.rfind(chr(10))}"


def _invalid_yaml(source: str, exc: yaml.YAMLError, text: str) -> ConfigError:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or "syntax error"
        if exc.context:
            problem = f"{problem} ({exc.context})"
        return ConfigError(source, "",
                           f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: "
                           f"{problem}")
    if isinstance(exc, ReaderError):
        return ConfigError(source, "", f"invalid YAML at {_position(text, exc.position)}: "
                                       f"unacceptable character {exc.character!r}")
    return ConfigError(source, "", f"invalid YAML: {exc}")


def _too_big(source: str, size: int) -> ConfigError:
    return ConfigError(source, "", f"file is {size} bytes; config files are limited to "
                                   f"{MAX_CONFIG_BYTES} bytes")


def load_yaml_document_text(text: str, source: str) -> YamlDocument:
    """Parse one YAML document strictly; an empty document yields ``data=None``."""
    if len(text) > MAX_CONFIG_BYTES or len(text.encode("utf-8")) > MAX_CONFIG_BYTES:
        raise _too_big(source, len(text.encode("utf-8")))
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(text)
        root = loader.get_single_node()
        if root is None:
            return YamlDocument(None, {}, {})
        builder = _Builder(loader, source)
        data = builder.build(root, "")
    except _Refused as exc:
        raise ConfigError(source, "", f"{exc.message}{_at(exc.mark)}") from None
    except yaml.YAMLError as exc:
        raise _invalid_yaml(source, exc, text) from None
    finally:
        if loader is not None:
            loader.dispose()
    return YamlDocument(data, builder.lines, builder.columns)


def _read_capped(path: Path) -> str:
    """Read ``path`` as UTF-8, checking the size before reading a byte of content."""
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise _too_big(source, size)
        with path.open("rb") as handle:
            # Read one byte past the cap: special files and files growing under us report
            # a small st_size but may still deliver more.
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read file: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise _too_big(source, len(raw))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = raw[:exc.start].decode("utf-8", "replace")
        where = _position(prefix, len(prefix))
        raise ConfigError(source, "", f"not valid UTF-8 at {where} (byte {exc.start})") from None


def load_yaml_document_file(path: Path) -> YamlDocument:
    """Like :func:`load_yaml_document_text` for a file; ``str(path)`` names it in errors."""
    return load_yaml_document_text(_read_capped(path), str(path))


def load_yaml_text(text: str, source: str) -> object:
    """Parse YAML text strictly into plain Python objects."""
    return load_yaml_document_text(text, source).data


def load_yaml_file(path: Path) -> object:
    """Parse a YAML file strictly into plain Python objects."""
    return load_yaml_document_file(path).data
