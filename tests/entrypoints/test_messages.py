import pytest

from pyvlm.entrypoints.messages import convert_messages


def test_openai_parts_become_template_parts_and_images_in_order():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "compare"},
            {"type": "image_url", "image_url": {"url": "a.png"}},
            {"type": "text", "text": "and"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
    ]
    converted, images = convert_messages(messages)
    assert converted[0] == {"role": "system", "content": "be brief"}
    assert [p["type"] for p in converted[1]["content"]] == ["text", "image", "text", "image"]
    assert images == ["a.png", "data:image/png;base64,AAAA"]


@pytest.mark.parametrize("messages, message", [
    ([{"content": "x"}], "role"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "audio"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "no image"),
    ([{"role": "user", "content": 5}], "string or a list"),
])
def test_bad_messages_are_refused_with_a_reason(messages, message):
    with pytest.raises(ValueError, match=message):
        convert_messages(messages)
