"""Prompt formatting and stop strings (pure functions: no model needed)."""

from __future__ import annotations

from edison.worker.prompt import PromptFormat, StopFilter, render_transcript


def test_transcript_for_a_model_without_a_chat_template() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert render_transcript(messages) == "Be brief.\n\nUser: Hi\nAssistant: Hello!\nUser: What is 2+2?\nAssistant:"
    prompt = PromptFormat({}, "auto", bos="<bos>", eos="<eos>").render(messages)
    assert prompt.stops == ("\nUser:",) and prompt.special is False


def test_a_reply_sent_back_as_streamed_extends_the_prompt_that_made_it() -> None:
    """The prompt ends on "Assistant:" and the model's reply starts with its own blank: the next
    turn's prompt must begin with the last prompt plus the reply, byte for byte, or the KV cache
    of the reply is thrown away at its first token."""
    asked = [{"role": "user", "content": "Count: 1, 2,"}]
    reply = " 3, 4, 5,"  # as streamed
    prompt = render_transcript(asked)
    again = render_transcript([*asked, {"role": "assistant", "content": reply}, {"role": "user", "content": "More"}])
    assert again.startswith(prompt + reply + "\nUser: More")
    # A client that trims the reply still gets the usual single blank.
    trimmed = render_transcript([*asked, {"role": "assistant", "content": reply.strip()}])
    assert trimmed.startswith(prompt + reply)


def test_chat_template_is_used_when_the_model_has_one() -> None:
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    fmt = PromptFormat({"tokenizer.chat_template": template}, "auto", bos="<s>", eos="</s>")
    prompt = fmt.render([{"role": "user", "content": "Hi"}])
    assert fmt.name == "template" and prompt.text == "<|user|>Hi<|assistant|>" and prompt.special is True


def test_stop_filter_never_streams_a_stop_string() -> None:
    stops = StopFilter(("\nUser:",))
    out = []
    for piece in ["Paris", ".", "\n", "Us", "er", ": next"]:
        text, hit = stops.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Paris." and hit


def test_stop_filter_releases_a_false_alarm() -> None:
    stops = StopFilter(("\nUser:",))
    assert stops.feed("a\nUs") == ("a", False)
    assert stops.feed("ually") == ("\nUsually", False)
    assert stops.flush() == ""
