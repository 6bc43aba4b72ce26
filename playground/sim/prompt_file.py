"""The opening messages the autopilot starts conversations from: one prompt per line of a text file.

Blank lines and lines starting with '#' are skipped; a prompt that appears twice is kept once (the
first time), so a hand-edited file cannot weight one prompt double by accident.
"""

from __future__ import annotations

from pathlib import Path

from playground.serving.limits import MAX_MESSAGE_CHARS

DEFAULT_PROMPTS_PATH = Path(__file__).resolve().parent / "prompts.txt"
COMMENT_PREFIX = "#"


class PromptFileError(ValueError):
    """A prompts file that cannot be used; the message names the file and what is wrong with it."""


def load_prompts(path: str | Path = DEFAULT_PROMPTS_PATH) -> list[str]:
    """The prompts in `path`, in file order, stripped, without blanks, comments or repeats."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"prompts file {str(path)!r} does not exist; pass a text file with one "
                              "prompt per line") from None
    except IsADirectoryError:
        raise PromptFileError(f"prompts file {str(path)!r} is a folder; pass a text file with one "
                              "prompt per line") from None
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"prompts file {str(path)!r} is not UTF-8 text ({exc.reason} at byte "
                              f"{exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise PromptFileError(f"prompts file {str(path)!r} cannot be read: {exc.strerror or exc}") from None

    prompts: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        prompt = line.strip()
        if not prompt or prompt.startswith(COMMENT_PREFIX) or prompt in seen:
            continue
        if len(prompt) > MAX_MESSAGE_CHARS:
            raise PromptFileError(f"prompts file {str(path)!r}, line {number}: the prompt has {len(prompt)} "
                                  f"characters, more than the {MAX_MESSAGE_CHARS} a message may have; shorten it")
        seen.add(prompt)
        prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"prompts file {str(path)!r} has no prompts (only blank lines or '#' comments); "
                              "put one prompt per line")
    return prompts
