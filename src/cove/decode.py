"""The one way Cove reads untrusted structured data: CBOR, JSON and TOML into checked fields.

A decoder raises many exception types on hostile input and returns any shape,
so every document from outside (evidence, collateral, manifests, signatures,
listings, volume headers, anchor records, policies, cove.toml) goes through
here: :func:`decode_cbor`, :func:`decode_json` and :func:`decode_toml` cap the
size, refuse trailing bytes and turn exactly the decoder's documented errors
into the caller's error, and :class:`Fields` checks each field's type, size
and range as it is read. The caller passes its layer's error class (anything
called with one message line), so a malformed document ends in that layer's
one error type naming the document and the field. The module sits at the
bottom of the layers and imports nothing from Cove.
"""

from __future__ import annotations

import builtins
import io
import json
import re
from collections.abc import Callable, Collection, Mapping
from typing import Literal, Protocol, overload

import cbor2

Error = Callable[[str], Exception]
"""A layer's error class (or any callable) taking one message line."""


class HintedError(Protocol):
    """A layer's error class taking a message line and a hint (how to fix it): every CoveError."""

    def __call__(self, message: str, hint: str | None = None, /) -> Exception: ...


MAX_DOCUMENT = 1 << 20  # every signed or sealed document Cove reads is far smaller
MAX_DEPTH = 400  # cbor2's own default nesting limit; a volume index nests per directory level
_MISSING = object()
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_MAX_HEX = 65536  # bytes of one hex field
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _limited(data: object, error: Error, what: str, limit: int) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise error(f"{what or 'it'} must be bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise error(f"{what or 'it'} is {len(data)} bytes (at most {limit})")
    return bytes(data)


def decode_cbor(
    data: bytes, error: Error, what: str, *, limit: int = MAX_DOCUMENT, max_depth: int = MAX_DEPTH
) -> object:
    """One CBOR item; too large, malformed, nested too deep or followed by bytes is ``error``.

    Duplicate map keys are refused: no encoder of Cove's writes them, and two
    readers must not pick different values of one key.
    """
    raw = _limited(data, error, what, limit)
    stream = io.BytesIO(raw)
    try:
        value = cbor2.CBORDecoder(stream, max_depth=max_depth, allow_duplicate_keys=False).decode()
    except (cbor2.CBORDecodeError, RecursionError) as exc:  # cbor2 wraps tag and string errors in CBORDecodeError
        raise error(_invalid(what, "CBOR", exc)) from None
    if stream.tell() != len(raw):
        raise error(f"{len(raw) - stream.tell()} trailing bytes after {what}")
    return value


def decode_json(data: str | bytes, error: Error, what: str, *, limit: int = MAX_DOCUMENT) -> object:
    """One JSON value (text, or UTF-8 bytes); too large, malformed or nested too deep is ``error``."""
    if isinstance(data, str):
        if len(data) > limit:
            raise error(f"{what or 'it'} is {len(data)} characters (at most {limit})")
        raw: str | bytes = data
    else:
        raw = _limited(data, error, what, limit)
    try:
        return json.loads(raw)  # trailing data is a JSONDecodeError ("Extra data")
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(_invalid(what, "JSON", exc)) from None


def decode_toml(text: str, error: Error, what: str, *, limit: int = MAX_DOCUMENT) -> dict[str, object]:
    """One TOML document as a table; too large or malformed is ``error``."""
    if len(text) > limit:
        raise error(f"{what or 'it'} is {len(text)} characters (at most {limit})")
    import tomllib  # here: ~9 ms that the readers of JSON and CBOR alone (the attestation server) don't pay

    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise error(_invalid(what, "TOML", exc)) from None


def _invalid(what: str, form: str, exc: Exception) -> str:
    """``what is not valid JSON (reason)``; without ``what`` (the caller names it), ``not valid JSON (reason)``."""
    reason = " ".join(str(exc).split())[:200]  # the decoder's own words, kept to one short line
    return f"{what} is not valid {form} ({reason})" if what else f"not valid {form} ({reason})"


def _type_name(value: object) -> str:
    return type(value).__name__


class Fields:
    """Typed access to one decoded map: each read checks presence, type, size and range.

    ``allowed`` refuses keys nobody reads; a read's ``default`` is the value of
    an absent key (left out or None: the key is required). Every problem is one ``error`` line
    naming the map (``what``) and the key, so a nested field reads as
    ``collateral TCB info tcbLevels[2] tcbDate must be a text string``.
    """

    __slots__ = ("map", "what", "error")

    def __init__(self, value: object, what: str, error: Error, allowed: Collection[str] | None = None):
        self.what = what
        self.error = error
        if not isinstance(value, Mapping):
            raise self._not_map(value)
        self.map: Mapping[object, object] = value
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    raise self._unknown(str(key), allowed)

    # How problems read; Settings words them for files people write.

    def fail(self, key: str, problem: str, hint: str | None = None) -> Exception:
        """The error for ``key`` of this map (for the caller's own checks, too)."""
        return self.error(f"{self.what} {key} {problem}")

    def _not_map(self, value: object) -> Exception:
        return self.error(f"{self.what} must be a map")

    def _unknown(self, key: str, allowed: Collection[str]) -> Exception:
        return self.error(f"{self.what} has an unknown field {key[:40]!r}")

    def _missing(self, key: str) -> Exception:
        return self.error(f"{self.what} lacks {key}")

    def _not_integer(self, key: str, value: object, low: int, high: int) -> Exception:
        return self.fail(key, f"must be an integer from {low} to {high}")

    def _not_boolean(self, key: str, value: object) -> Exception:
        return self.fail(key, "must be true or false")

    def _not_text(self, key: str, value: object, max_len: int) -> Exception:
        return self.fail(key, "must be a short text string" if max_len <= 256 else "must be a text string")

    def _not_list(self, key: str, value: object, min_items: int, max_items: int) -> Exception:
        return self.fail(key, f"must be a list of {min_items} to {max_items} items")

    def _not_strings(self, key: str) -> Exception:
        return self.fail(key, "must be a list of non-empty text strings")

    def _not_hex(self, key: str) -> Exception:
        return self.fail(key, "is not hex")

    def _hex_size(self, key: str, size: int, actual: int) -> Exception:
        return self.fail(key, f"must be {size} bytes, not {actual}")

    def _hex_text(self, text: str) -> str:
        return text

    def has(self, key: str) -> bool:
        return key in self.map

    def _get(self, key: str, default: object) -> object:
        if key in self.map:
            return self.map[key]
        if default is _MISSING:
            raise self._missing(key)
        return default

    def value(self, key: str, types: type | tuple[type, ...], default: object = _MISSING) -> object:
        """A field of one of ``types`` (a JSON or CBOR shape not covered below)."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            names = " or ".join(t.__name__ for t in _as_tuple(types))
            raise self.fail(key, f"must be {names}, not {_type_name(value)}")
        return value

    @overload
    def bytes(
        self, key: str, size: int | None = ..., *, max_size: int = ..., optional: Literal[False] = ...
    ) -> builtins.bytes: ...

    @overload
    def bytes(
        self, key: str, size: int | None = ..., *, max_size: int = ..., optional: Literal[True]
    ) -> builtins.bytes | None: ...

    def bytes(
        self, key: str, size: int | None = None, *, max_size: int = 65536, optional: bool = False
    ) -> builtins.bytes | None:
        """A byte string, of exactly ``size`` bytes if given."""
        value = self._get(key, None if optional else _MISSING)
        if value is None and optional:
            return None
        if not isinstance(value, (bytes, bytearray)):
            raise self.fail(key, "must be a byte string")
        if size is not None and len(value) != size:
            raise self.fail(key, f"must be {size} bytes, not {len(value)}")
        if len(value) > max_size:
            raise self.fail(key, f"is too long ({len(value)} bytes)")
        return bytes(value)

    def hex(self, key: str, size: int | None = None) -> builtins.bytes:
        """A text field of hex digits (as in Intel's PCS JSON), as bytes: never empty, ``size`` bytes if given."""
        return self._hex(key, self._get(key, _MISSING), size)

    def hex_list(self, key: str, size: int | None = None, *, max_items: int = 4096) -> tuple[builtins.bytes, ...]:
        """An array of hex text strings, each read as :meth:`hex` and named ``key[i]``."""
        items = self.list(key, max_items=max_items)
        return tuple(self._hex(f"{key}[{i}]", item, size) for i, item in enumerate(items))

    def _hex(self, key: str, value: object, size: int | None) -> builtins.bytes:
        if not isinstance(value, str):
            raise self._not_hex(key)
        if len(value) > 2 * _MAX_HEX + 64:
            raise self.fail(key, f"is too long ({len(value)} characters)")
        text = self._hex_text(value)
        if not _HEX.fullmatch(text):
            raise self.fail(key, "must not be empty") if not text else self._not_hex(key)
        raw = bytes.fromhex(text)
        if size is not None and len(raw) != size:
            raise self._hex_size(key, size, len(raw))
        return raw

    def text(
        self, key: str, choices: Collection[str] | None = None, max_len: int = 256, default: str | None = None
    ) -> str:
        """A text string of at most ``max_len`` characters, one of ``choices`` if given."""
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, str) or len(value) > max_len:
            raise self._not_text(key, value, max_len)
        if choices is not None and value not in choices:
            raise self.fail(key, f"{value[:40]!r} is not one of {', '.join(choices)}")
        return value

    def integer(self, key: str, low: int = 0, high: int = 2**64 - 1, default: int | None = None) -> int:
        """An integer from ``low`` to ``high`` (booleans are not integers here)."""
        value = self._get(key, _MISSING if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._not_integer(key, value, low, high)
        return value

    def uint(self, key: str, maximum: int = 2**64 - 1) -> int:
        return self.integer(key, 0, maximum)

    def boolean(self, key: str, default: bool | None = None) -> bool:
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, bool):
            raise self._not_boolean(key, value)
        return value

    @overload
    def sub(self, key: str, allowed: Collection[str] | None = ..., optional: Literal[False] = ...) -> Fields: ...

    @overload
    def sub(self, key: str, allowed: Collection[str] | None = ..., *, optional: Literal[True]) -> Fields | None: ...

    def sub(self, key: str, allowed: Collection[str] | None = None, optional: bool = False) -> Fields | None:
        """A nested map, read the same way."""
        value = self._get(key, None if optional else _MISSING)
        if value is None and optional:
            return None
        return self._nested(value, key, allowed)

    def _nested(self, value: object, key: str, allowed: Collection[str] | None) -> Fields:
        return Fields(value, f"{self.what} {key}", self.error, allowed)

    def list(
        self, key: str, *, min_items: int = 0, max_items: int = 4096, default: tuple[object, ...] | None = None
    ) -> tuple[object, ...]:
        """An array of ``min_items`` to ``max_items`` items (for lists of maps, :meth:`maps`)."""
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, (list, tuple)) or not min_items <= len(value) <= max_items:
            raise self._not_list(key, value, min_items, max_items)
        return tuple(value)

    def strings(
        self, key: str, *, max_items: int = 4096, max_len: int = 4096, default: tuple[str, ...] | None = None
    ) -> tuple[str, ...]:
        """An array of non-empty text strings of at most ``max_len`` characters."""
        items = self.list(key, max_items=max_items, default=default)
        if not all(isinstance(item, str) and 0 < len(item) <= max_len for item in items):
            raise self._not_strings(key)
        return tuple(str(item) for item in items)

    def duration(self, key: str) -> float:
        """Seconds: a positive number, or text such as "500ms", "30s", "5m", "2h", "1d"."""
        value = self._get(key, _MISSING)
        seconds = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and len(value) <= 64 and (m := _DURATION.fullmatch(value)):
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
        if seconds is None:
            raise self.fail(key, 'must be seconds or a duration like "30s", "5m", "2h"')
        if not seconds < float("inf"):  # also NaN, which every comparison with an age would pass
            raise self.fail(key, "must be a finite number of seconds")
        if seconds <= 0:
            raise self.fail(key, "must be more than zero")
        return seconds

    def maps(
        self,
        key: str,
        allowed: Collection[str] | None = None,
        *,
        min_items: int = 0,
        max_items: int = 4096,
        default: tuple[object, ...] | None = None,
    ) -> tuple[Fields, ...]:
        """An array of maps, each read the same way (named ``key[i]``)."""
        items = self.list(key, min_items=min_items, max_items=max_items, default=default)
        return tuple(self._nested(item, f"{key}[{i}]", allowed) for i, item in enumerate(items))

    def byte_list(self, key: str, *, max_items: int = 16, max_size: int = 16384) -> tuple[builtins.bytes, ...]:
        value = self._get(key, _MISSING)
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= max_items:
            raise self.fail(key, f"must be a list of 1 to {max_items} byte strings")
        if not all(isinstance(v, bytes) and len(v) <= max_size for v in value):
            raise self.fail(key, "must hold byte strings")
        return tuple(value)


class Settings(Fields):
    """The same accessor for files people write (cove.toml, policies): each problem names the file and
    the dotted key, and says how to fix it, e.g. ``cove.toml: enclave.svn: 70000 is out of range (use 0..65535)``.

    ``where`` is the table's dotted key ("" for the top level); ``unknown`` and
    ``allowed_hint`` word the refusal of a key the schema does not know.
    """

    __slots__ = ("source", "hinted", "unknown", "allowed_hint")

    def __init__(
        self,
        value: object,
        where: str,
        error: HintedError,
        allowed: Collection[str] | None = None,
        *,
        source: str,
        unknown: str = "unknown key",
        allowed_hint: str = "allowed here",
    ):
        self.source, self.hinted, self.unknown, self.allowed_hint = source, error, unknown, allowed_hint
        super().__init__(value, where, error, allowed)

    def name(self, key: str) -> str:
        """The dotted name of ``key`` in this table."""
        return f"{self.what}.{key}" if self.what else key

    def fail(self, key: str, problem: str, hint: str | None = None) -> Exception:
        return self.hinted(f"{self.source}: {self.name(key)}: {problem}", hint)

    def _not_map(self, value: object) -> Exception:
        return self.hinted(f"{self.source}: {self.what}: must be a table, not {_type_name(value)}")

    def _unknown(self, key: str, allowed: Collection[str]) -> Exception:
        return self.fail(key, self.unknown, f"{self.allowed_hint}: {', '.join(allowed)}")

    def _missing(self, key: str) -> Exception:
        return self.fail(key, "is required")

    def _not_integer(self, key: str, value: object, low: int, high: int) -> Exception:
        if isinstance(value, bool) or not isinstance(value, int):
            return self.fail(key, f"must be an integer, not {_type_name(value)}")
        return self.fail(key, f"{value} is out of range", f"use {low}..{high}")

    def _not_boolean(self, key: str, value: object) -> Exception:
        return self.fail(key, f"must be true or false, not {value!r}")

    def _not_text(self, key: str, value: object, max_len: int) -> Exception:
        if isinstance(value, str):
            return self.fail(key, f"must be at most {max_len} characters")
        return self.fail(key, f"must be a string, not {_type_name(value)}")

    def _not_list(self, key: str, value: object, min_items: int, max_items: int) -> Exception:
        if not isinstance(value, (list, tuple)):
            return self.fail(key, f"must be a list, not {_type_name(value)}")
        return self.fail(key, f"must have {min_items} to {max_items} items, not {len(value)}")

    def _not_strings(self, key: str) -> Exception:
        return self.fail(key, "must be a list of non-empty strings")

    def _not_hex(self, key: str) -> Exception:
        return self.fail(key, "must be a hex string")

    def _hex_size(self, key: str, size: int, actual: int) -> Exception:
        return self.fail(key, f"must be {size} bytes ({size * 2} hex digits), not {actual}")

    def _hex_text(self, text: str) -> str:
        return text.strip()  # people paste digests with a newline

    def _nested(self, value: object, key: str, allowed: Collection[str] | None) -> Fields:
        return Settings(
            value,
            self.name(key),
            self.hinted,
            allowed,
            source=self.source,
            unknown=self.unknown,
            allowed_hint=self.allowed_hint,
        )


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)
