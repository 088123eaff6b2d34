"""NewBieXMLPrompt: NewBie's XML prompt from fields, or a hand-written one checked for well-formedness."""
from __future__ import annotations

from .newbie_xml import Character, NewBiePrompt, build_prompt, check_prompt


def _text(tooltip: str, default: str = "", multiline: bool = False):
    return ("STRING", {"default": default, "multiline": multiline, "tooltip": tooltip})


class NewBieXMLPrompt:
    DESCRIPTION = ("Builds NewBie-image's XML prompt (<character_N> blocks with name, gender, appearance, then "
                   "<general_tags>) from fields, or checks raw XML and reports where it breaks (line, column).")
    CATEGORY = "lowvram/newbie"
    FUNCTION = "build"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = ("The XML prompt, for NewBieTextEncode's text input.",)

    @classmethod
    def INPUT_TYPES(cls):
        char = "Leave name, gender and appearance empty to leave the character out."
        return {"required": {
            "character_1_name": _text("Character 1's name (danbooru style, e.g. hatsune miku). " + char),
            "character_1_gender": _text("Character 1's gender tag: 1girl, 1boy, 1other.", "1girl"),
            "character_1_appearance": _text("Character 1's appearance tags (hair, eyes, clothing...).", "", True),
            "character_2_name": _text("Character 2's name. " + char),
            "character_2_gender": _text("Character 2's gender tag (empty: no second character)."),
            "character_2_appearance": _text("Character 2's appearance tags.", "", True),
            "count": _text("<count>: 'auto' derives 1girl / 2girls / 1girl, 1boy from the genders.", "auto"),
            "style": _text("<style>: art style tags (anime, watercolor...).", "", True),
            "background": _text("<background>: setting tags.", "", True),
            "quality": _text("<quality>: quality tags.", "masterpiece, best quality"),
            "other": _text("<other>: any remaining general tags.", "", True),
        }, "optional": {
            "raw_xml": _text("If not empty, used instead of the fields after checking that it parses (the error "
                             "names the line and column).", "", True),
        }}

    def build(self, character_1_name, character_1_gender, character_1_appearance, character_2_name,
              character_2_gender, character_2_appearance, count, style, background, quality, other, raw_xml=""):
        if raw_xml.strip():
            check_prompt(raw_xml)
            return (raw_xml,)
        chars = (Character(character_1_name, character_1_gender, character_1_appearance),
                 Character(character_2_name, character_2_gender, character_2_appearance))
        prompt = build_prompt(NewBiePrompt(characters=chars, count=count, style=style, background=background,
                                           quality=quality, other=other))
        check_prompt(prompt)
        return (prompt,)
