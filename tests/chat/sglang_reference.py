"""An independent, test-only transcription of how SGLang builds a prompt
from OpenAI messages (python/sglang/srt/conversation.py: generate_chat_conv
then Conversation.get_prompt), for the five vision templates. It keeps
SGLang's structure on purpose (positional sep/sep2, the `if message:` test,
the "qwen2" name check) so that it does not share code or shape with
pyvlm.chat. One documented difference, as issue 4 specifies: every image
part gets its newline (SGLang drops it when a message holds several)."""

TEMPLATES = {
    # name: (system_template, system_message, roles, style, sep, sep2, stop, image_token)
    "chatml-llava": ("<|im_start|>system\n{system_message}", "You are a helpful assistant.",
                     ("<|im_start|>user", "<|im_start|>assistant"), "CHATML", "<|im_end|>", None,
                     ["<|endoftext|>", "<|im_end|>"], "<image>"),
    "qwen2-vl": ("<|im_start|>system\n{system_message}", "You are a helpful assistant.",
                 ("<|im_start|>user", "<|im_start|>assistant"), "ADD_NEW_LINE_SINGLE",
                 "<|im_end|>\n", None, ["<|im_end|>"], "<|vision_start|><|image_pad|><|vision_end|>"),
    "vicuna_v1.1": ("{system_message}",
                    "A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
                    ("USER", "ASSISTANT"), "ADD_COLON_TWO", " ", "</s>", None, "<image>"),
    "llama_3_vision": ("<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>",
                       "You are a helpful language and vision assistant. You are able to understand "
                       "the visual content that the user provides, and assist the user with a variety "
                       "of tasks using natural language.", ("user", "assistant"), "LLAMA3", "", None,
                       ["<|end_of_text|>", "<|eot_id|>"], "<|image|>"),
}
TEMPLATES["llava_llama_3"] = TEMPLATES["llama_3_vision"][:7] + ("<image>",)


def get_prompt(name, system_message, messages):
    system_template, _, roles, style, sep, sep2, _, _ = TEMPLATES[name]
    system_prompt = system_template.format(system_message=system_message)
    if style == "CHATML":
        ret = "" if system_prompt == "" else system_prompt + sep + "\n"
        for role, message in messages:
            ret += role + "\n" + message + sep + "\n" if message else role + "\n"
    elif style == "ADD_NEW_LINE_SINGLE":
        ret = "" if system_prompt == "" else system_prompt + sep
        for role, message in messages:
            ret += role + "\n" + message + sep if message else role + "\n"
    elif style == "ADD_COLON_TWO":
        seps = [sep, sep2]
        ret = system_prompt + seps[0]
        for i, (role, message) in enumerate(messages):
            ret += role + ": " + message + seps[i % 2] if message else role + ":"
    else:  # LLAMA3
        ret = system_prompt if system_message else ""
        for role, message in messages:
            ret += f"<|start_header_id|>{role}<|end_header_id|>\n\n"
            if message:
                ret += f"{message.strip()}<|eot_id|>"
    return ret


def generate_prompt(name, request_messages):
    """(prompt, image urls, stop strings) as SGLang's chat path builds them."""
    _, system_message, roles, _, _, _, stop, image_token = TEMPLATES[name]
    messages, images = [], []
    for message in request_messages:
        content = message["content"]
        if message["role"] == "system":
            system_message = content if isinstance(content, str) else content[0]["text"]
        elif message["role"] == "user":
            if isinstance(content, str):
                messages.append([roles[0], content])
                continue
            token = image_token if "qwen2" in name else image_token + "\n"
            real_content = ""
            for part in content:
                if part["type"] == "text":
                    real_content += part["text"]
                else:
                    real_content += token
                    images.append(part["image_url"]["url"])
            messages.append([roles[0], real_content])
        else:
            text = content if isinstance(content, str) else content[0]["text"]
            messages.append([roles[1], text])
    messages.append([roles[1], None])
    return get_prompt(name, system_message, messages), images, tuple(stop or ())
