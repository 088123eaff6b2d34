"""NewBie-image's XML prompt: build it from fields, or check one written by hand. No ComfyUI import.

The model was trained on captions restructured as XML-like blocks (NewBie-image-Exp0.1 README):

    <character_1>
    <n>hatsune miku</n>
    <gender>1girl</gender>
    <appearance>twintails, aqua hair</appearance>
    </character_1>
    <general_tags>
    <count>1girl</count>
    <style>anime</style>
    ...
    </general_tags>

The text is tokenized as ordinary text (no XML parsing at encode time), so the builder only has to
produce this layout; the checker parses a hand-written prompt so that a missing close tag is reported
with its line and column instead of silently degrading the image.

>>> print(build_prompt(NewBiePrompt(characters=(Character("miku", "1girl", "twintails"),), style="anime")))
<character_1>
<n>miku</n>
<gender>1girl</gender>
<appearance>twintails</appearance>
</character_1>
<general_tags>
<count>1girl</count>
<style>anime</style>
</general_tags>
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from xml.parsers import expat

# <general_tags> children, in the order the model card lists them.
GENERAL_FIELDS = ("count", "artists", "style", "background", "atmosphere", "quality", "objects", "other")
_ROOT = "newbie_prompt"
_GENDER_COUNT = re.compile(r"^(\d+)(girl|boy|other)s?$")


class XMLPromptError(ValueError):
    """The prompt is not well-formed; `line` and `column` (1-based) point at where parsing stopped."""

    def __init__(self, message: str, line: int, column: int, source_line: str):
        self.line, self.column = line, column
        pointer = " " * max(0, column - 1) + "^"
        super().__init__(f"XML prompt, line {line}, column {column}: {message}\n  {source_line}\n  {pointer}")


@dataclass(frozen=True)
class Character:
    name: str = ""
    gender: str = ""
    appearance: str = ""

    @property
    def empty(self) -> bool:
        return not (self.name.strip() or self.gender.strip() or self.appearance.strip())


@dataclass(frozen=True)
class NewBiePrompt:
    characters: tuple[Character, ...] = ()
    count: str = "auto"          # "auto": derived from the characters' gender tags
    artists: str = ""
    style: str = ""
    background: str = ""
    atmosphere: str = ""
    quality: str = ""
    objects: str = ""
    other: str = ""


def escape(text: str) -> str:
    """Text content for an element: &, < and > escaped, surrounding whitespace removed."""
    return text.strip().replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def auto_count(characters: tuple[Character, ...]) -> str:
    """Danbooru count tags from gender tags: ("1girl", "1girl", "1boy") -> "2girls, 1boy".

    >>> auto_count((Character(gender="1girl"), Character(gender="1girl"), Character(gender="1boy")))
    '2girls, 1boy'
    """
    totals: dict[str, int] = {}
    for c in characters:
        m = _GENDER_COUNT.match(c.gender.strip().lower())
        if m:
            totals[m.group(2)] = totals.get(m.group(2), 0) + int(m.group(1))
    return ", ".join(f"{n}{kind}{'s' if n > 1 else ''}" for kind, n in totals.items())


def _element(tag: str, text: str) -> list[str]:
    return [f"<{tag}>{escape(text)}</{tag}>"] if text.strip() else []


def build_prompt(p: NewBiePrompt) -> str:
    """The XML prompt for the fields; empty fields and empty characters are left out."""
    lines: list[str] = []
    chars = tuple(c for c in p.characters if not c.empty)
    for i, c in enumerate(chars, start=1):
        lines.append(f"<character_{i}>")
        lines += _element("n", c.name) + _element("gender", c.gender) + _element("appearance", c.appearance)
        lines.append(f"</character_{i}>")
    general: list[str] = []
    for name in GENERAL_FIELDS:
        value = getattr(p, name)
        if name == "count" and value.strip().lower() == "auto":
            value = auto_count(chars)
        general += _element(name, value)
    if general:
        lines += ["<general_tags>", *general, "</general_tags>"]
    return "\n".join(lines)


def check_prompt(text: str) -> list[str]:
    """Parse a hand-written prompt; return its top-level tag names, or raise XMLPromptError.

    Several top-level elements are allowed: the prompt is parsed inside a wrapper element, which also
    makes a document type declaration (and so entity expansion) invalid.

    >>> check_prompt("<character_1><n>a</n></character_1>\\n<general_tags></general_tags>")
    ['character_1', 'general_tags']
    >>> check_prompt("<character_1>\\n<n>a</character_1>")
    Traceback (most recent call last):
    ...
    newbie_xml.XMLPromptError: XML prompt, line 2, column 7: mismatched tag
      <n>a</character_1>
            ^
    """
    opening = f"<{_ROOT}>"
    parser = expat.ParserCreate()
    depth, top = [0], []

    def start(name, _attrs):
        if depth[0] == 1:
            top.append(name)
        depth[0] += 1

    def end(_name):
        depth[0] -= 1

    parser.StartElementHandler, parser.EndElementHandler = start, end
    try:
        parser.Parse(f"{opening}{text}</{_ROOT}>", True)
    except expat.ExpatError as e:
        line, col = e.lineno, e.offset + 1
        if line == 1:
            col -= len(opening)
        lines = text.split("\n")
        message = expat.ErrorString(e.code)
        if line > len(lines) or (line == len(lines) and col > len(lines[-1])):
            # The error is in the closing wrapper: an element was left open.
            message, line = f"unclosed element <{top[-1] if top else '?'}> at the end of the prompt", len(lines)
            col = len(lines[-1]) + 1
        raise XMLPromptError(message, line, max(col, 1), lines[min(line, len(lines)) - 1]) from None
    return top
