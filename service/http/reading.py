"""JSON bodies as the service reads them, and the refusals of those it does not.

`loads` reads the bodies of POST /fit (in the intake process) and POST /predict (`loads_quickly`,
by orjson where that reads the same): UTF-8 without a byte order mark, parsed by the standard
library, whose error texts and reading of NaN and big
integers the answers keep. Where FastAPI's own reading took more than the README promises, or
called a body it could not read "not UTF-8", `loads` says what is wrong: a body that is not
UTF-8 (UTF-16, UTF-32, a byte order mark), an integer longer than the standard library reads
(4,300 digits), lists nested deeper than it goes.

A refusal is data, one variant per kind of answer, so that it crosses from the intake process
to the server as it is; the server raises it as FastAPI or the route would have
(service.http.bodies.error_of). Nothing here imports the web framework: the intake process
imports this module.
"""

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from service.core.errors import MAX_LISTED_ERRORS, capped


@dataclass(frozen=True)
class NotJson:
    """Not JSON: the standard library's message, and where it stopped reading."""

    message: str
    position: int


@dataclass(frozen=True)
class Unreadable:
    """A body nothing can read, not even as the text of an error."""


@dataclass(frozen=True)
class NotValid:
    """Pydantic-style errors (type, loc, msg), as FastAPI lists a body's validation errors."""

    errors: list[dict[str, Any]]


@dataclass(frozen=True)
class NotAccepted:
    """Refused with a detail of the service's own and the issues (field, message, code)."""

    detail: str
    issues: list[dict[str, Any]]


Refused = NotJson | Unreadable | NotValid | NotAccepted


class NotRead(Exception):
    """A body that `loads` refuses; `refused` is why."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(type(refused).__name__)
        self.refused = refused


NOT_UTF8 = "the body must be JSON encoded as UTF-8, without a byte order mark"
TOO_DEEP = "the body nests arrays or objects too deeply to read; no field takes nested lists"


def loads_quickly(body: bytes) -> Any:
    """`loads`' document, by orjson where it can read the body (3x faster on a batch of hours).

    orjson reads exactly RFC 8259 JSON, in UTF-8, and reads it as the standard library does:
    the same values, the same floats to the last bit. What it refuses (NaN, a byte order mark,
    a lone surrogate, no JSON at all) and integers of 19 digits or more, which it may read as
    floats, go to `loads`, for its reading and its error texts. orjson also reads lists nested
    deeper than the standard library goes: a caller that refuses what it read reads the body
    again with `loads`, whose refusal is the answer.
    """
    if not has_long_integers(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return loads(body)


# Digits, each as a zero: an integer of 19 digits or more is one orjson may read as a float.
_ZEROS = bytes.maketrans(b"0123456789", b"0" * 10)


def has_long_integers(text: bytes) -> bool:
    """Whether the text has a run of 19 digits or more (an integer orjson may read as a float)."""
    return b"0" * 19 in text.translate(_ZEROS)


def loads(body: bytes | bytearray) -> Any:
    """A JSON body as the service reads every one: UTF-8 without a byte order mark, parsed by
    the standard library (its error texts, its reading of NaN); raises NotRead if refused.

    json.loads alone takes UTF-16, UTF-32 and a byte order mark, which the README does not
    promise; at an integer too long to read or lists nested too deeply, it raises no JSON error.
    """
    # by the first 4 bytes, as json.loads guesses: JSON begins with an ASCII character
    encoding = json.detect_encoding(body[:4])
    if encoding != "utf-8":
        if encoding in ("utf-8-sig", "utf-16", "utf-32"):
            why = f"it starts with a {encoding.removesuffix('-sig').upper()} byte order mark"
        else:
            why = f"it looks like {encoding.upper()}, not UTF-8"
        raise NotRead(NotAccepted(NOT_UTF8, [_body_issue(why)]))
    try:
        text = body.decode()
    except UnicodeDecodeError as e:
        why = f"byte {e.object[e.start]:#04x} at offset {e.start} is not UTF-8"
        raise NotRead(NotAccepted(NOT_UTF8, [_body_issue(why)])) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise NotRead(NotJson(e.msg, e.pos)) from None
    except ValueError:  # the only other ValueError json.loads raises: an integer too long
        raise NotRead(_long_integers(text)) from None
    except RecursionError:
        raise NotRead(NotAccepted(TOO_DEEP, [_body_issue("nested too deeply")])) from None
    except Exception:
        raise NotRead(Unreadable()) from None


def _body_issue(message: str) -> dict[str, str]:
    return {"field": "body", "message": message, "code": "json_invalid"}


class _TooLong:
    """What `_long_integers` reads an integer too long for int() as."""


_TOO_LONG = _TooLong()


def _long_integers(text: str) -> Refused:
    """The refusal of a body holding integers longer than int() reads (4,300 digits unless
    sys.set_int_max_str_digits says otherwise): each named where it is, as a validation error."""
    limit = sys.get_int_max_str_digits()

    def integer(digits: str) -> int | _TooLong:
        return _TOO_LONG if len(digits) - digits.startswith("-") > limit else int(digits)

    try:
        doc = json.loads(text, parse_int=integer)
    except Exception:
        return Unreadable()
    found = [loc for loc, value in _leaves(doc) if value is _TOO_LONG]
    if not found:
        return Unreadable()
    message = (
        f"an integer of more than {limit} digits: too long to read, and larger than any field takes"
    )
    errors = [
        {"type": "int_parsing_size", "loc": ("body", *loc), "msg": message}
        for loc in found[:MAX_LISTED_ERRORS]
    ]
    return NotValid(capped(errors, len(found)))


def _leaves(doc: Any) -> Iterator[tuple[tuple[int | str, ...], Any]]:
    """Every value of a parsed JSON document that is no list or object, with where it is, in
    document order (a loop, not recursion: the document may nest as deep as json.loads goes)."""
    stack: list[tuple[tuple[int | str, ...], Any]] = [((), doc)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, dict):
            stack.extend(((*loc, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*loc, i), value[i]) for i in reversed(range(len(value))))
        else:
            yield loc, value
