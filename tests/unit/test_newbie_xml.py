"""NewBie's XML prompt (nodes/newbie_xml.py): built from fields, checked when written by hand."""
import doctest
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    # Under its own file name: the doctest's traceback names the module "newbie_xml".
    if "newbie_xml" not in sys.modules:
        spec = importlib.util.spec_from_file_location("newbie_xml", REPO / "nodes" / "newbie_xml.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["newbie_xml"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["newbie_xml"]


X = _load()


def test_two_characters_and_general_tags_in_the_model_card_layout():
    p = X.NewBiePrompt(characters=(X.Character("hatsune miku", "1girl", "twintails, aqua hair"),
                                   X.Character("kagamine len", "1boy", "blonde hair")),
                       style="anime", background="stage", quality="masterpiece, best quality", other="dancing")
    text = X.build_prompt(p)
    assert text.splitlines() == [
        "<character_1>", "<n>hatsune miku</n>", "<gender>1girl</gender>", "<appearance>twintails, aqua hair</appearance>",
        "</character_1>",
        "<character_2>", "<n>kagamine len</n>", "<gender>1boy</gender>", "<appearance>blonde hair</appearance>",
        "</character_2>",
        "<general_tags>", "<count>1girl, 1boy</count>", "<style>anime</style>", "<background>stage</background>",
        "<quality>masterpiece, best quality</quality>", "<other>dancing</other>", "</general_tags>"]
    assert X.check_prompt(text) == ["character_1", "character_2", "general_tags"]


def test_empty_fields_and_characters_are_left_out_and_numbering_stays_dense():
    p = X.NewBiePrompt(characters=(X.Character(), X.Character("", "1girl", "")), count="", quality=" ")
    assert X.build_prompt(p) == "<character_1>\n<gender>1girl</gender>\n</character_1>"
    assert X.build_prompt(X.NewBiePrompt()) == ""


@pytest.mark.parametrize("genders, count", [(("1girl",), "1girl"), (("1girl", "1girl"), "2girls"),
                                            (("2girls", "1boy"), "2girls, 1boy"), (("", "solo"), "")])
def test_auto_count_from_gender_tags(genders, count):
    assert X.auto_count(tuple(X.Character(gender=g) for g in genders)) == count


def test_text_is_escaped_so_the_prompt_stays_well_formed():
    text = X.build_prompt(X.NewBiePrompt(characters=(X.Character("a<b & c>", "1girl", "heart <3"),)))
    assert "<n>a&lt;b &amp; c&gt;</n>" in text and "heart &lt;3" in text
    X.check_prompt(text)


def test_hand_written_prompts_and_plain_tags_pass():
    assert X.check_prompt("1girl, solo, smile") == []
    assert X.check_prompt("<character_1>\n  <n>miku</n>\n</character_1>\n<general_tags/>") == ["character_1", "general_tags"]


@pytest.mark.parametrize("text, line, column, words", [
    ("<character_1>\n<n>miku</character_1>", 2, 10, "mismatched tag"),
    ("<character_1>\n<n>miku</n>", 2, 12, "unclosed element <character_1>"),
    # "</quality" is cut short: the parser notices at the next "<", the start of line 4.
    ("<general_tags>\n<style>anime</style>\n<quality>best</quality\n</general_tags>", 4, 1, "not well-formed"),
    ("<a>1 < 2</a>", 1, 7, "not well-formed"),
    ("x</a>", 1, 4, "mismatched tag"),
    ('<!DOCTYPE a [<!ENTITY e "boom">]><a>&e;</a>', 1, 3, "not well-formed"),
])
def test_malformed_xml_is_reported_with_line_and_column(text, line, column, words):
    with pytest.raises(X.XMLPromptError) as err:
        X.check_prompt(text)
    assert (err.value.line, err.value.column) == (line, column)
    message = str(err.value)
    assert f"line {line}, column {column}: {words}" in message
    assert message.splitlines()[1].strip() == text.split("\n")[line - 1].strip()
    assert message.splitlines()[2].index("^") - 2 == column - 1  # the pointer sits under the column


def test_docstring_examples():
    result = doctest.testmod(X)
    assert result.attempted > 0 and result.failed == 0
