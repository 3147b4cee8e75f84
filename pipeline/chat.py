"""Prompt formatting: how a question becomes the text an expert or the policy reads.

A model with a chat template reads the question as one user turn with the generation prompt
appended (the policy: a system turn, then the user turn); a model without one reads the plain format.
Two family habits are settled here, for experts and policy alike:

- Templates that stamp the date (Llama-3.x and gpt-oss call `strftime_now`) get the fixed
  PROMPT_DATE, so a prompt's tokens do not depend on the day it is read and an extraction resumed
  after midnight does not mix two prompt versions. The date shows in the expert's `prompt_format`.
- Templates that refuse a system turn (Gemma raises "System role not supported") or drop it get the
  system text at the head of the user turn, the placement those families' model cards use.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime

PLAIN_FORMAT = "Question: {question}\nAnswer:"

PROMPT_DATE = datetime(2024, 7, 26)
"""The date date-stamping templates read: the one Llama-3.x's own template falls back to when it
has no clock. Part of every expert's fingerprint (pipeline/extract.py, content_settings)."""
PROMPT_DATE_ISO = PROMPT_DATE.strftime("%Y-%m-%d")

_OTHER_DAY = datetime(2001, 2, 3, 4, 5, 6)  # a second clock: a template whose text changes with it stamps the date


@contextmanager
def fixed_clock(when: datetime):
    """transformers' `strftime_now` reads `when` inside (its template globals call datetime.now() of
    its chat-template module; a function passed as a template variable would be turned into a string)."""
    from transformers.utils import chat_template_utils as ctu

    class Fixed:  # the module's only use of datetime is datetime.now()
        @staticmethod
        def now(tz=None):
            return when

    real, ctu.datetime = ctu.datetime, Fixed
    try:
        yield
    finally:
        ctu.datetime = real


def render_chat(tok, messages: list[dict], when: datetime = PROMPT_DATE) -> str:
    """The chat template's text for `messages` plus the generation prompt, with `strftime_now`
    reading `when` instead of the clock. Raises jinja2.TemplateError where the template does."""
    with fixed_clock(when):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stamps_date(tok, messages: list[dict]) -> bool:
    """Whether the template writes the date into these messages' prompt (its text changes with the clock)."""
    return render_chat(tok, messages) != render_chat(tok, messages, _OTHER_DAY)


def format_prompt(tok, question: str) -> tuple[str, str, bool]:
    """(text, prompt_format, add_special_tokens) for one question in an expert's tokenizer.

    prompt_format: "plain", "chat_template", or "chat_template date=YYYY-MM-DD" when the template
    stamps the date (it then reads PROMPT_DATE).
    """
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "user", "content": question}]
        text = render_chat(tok, msgs)
        fmt = f"chat_template date={PROMPT_DATE_ISO}" if stamps_date(tok, msgs) else "chat_template"
        return text, fmt, False  # the template already holds bos etc.
    return PLAIN_FORMAT.format(question=question), "plain", True


def render_system_user(tok, system: str, user: str) -> str:
    """A system turn and a user turn through the chat template. Where the template refuses the
    system turn (raises) or leaves its text out, the system text opens the user turn instead
    ("system\\n\\nuser")."""
    from jinja2.exceptions import TemplateError

    try:
        text = render_chat(tok, [{"role": "system", "content": system}, {"role": "user", "content": user}])
        if system.strip() in text:
            return text
    except TemplateError:
        pass
    return render_chat(tok, [{"role": "user", "content": f"{system}\n\n{user}"}])
