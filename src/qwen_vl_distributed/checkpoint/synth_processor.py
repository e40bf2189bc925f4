"""Processor files for synthetic checkpoints: a Qwen-shaped tokenizer, chat template and image/video configs.

The real Qwen tokenizer cannot be downloaded here, so we build a stand-in offline with the ``tokenizers`` library.
What matters for the engine is kept exact: the special tokens sit at their real ids (151643..151668), the
pre-tokenizer / normalizer / decoder are Qwen2's, ``<think>`` / ``</think>`` encode as single ids, and the image and
video processor settings are Qwen3-VL's. The ordinary vocabulary is synthetic: the 256 byte symbols in Qwen's id
order, merges for a few common English words, the role names and ' seconds' at their real ids, and unreachable
filler entries so that the base vocabulary ends exactly at id 151642 (transformers re-adds the special tokens after
it in id order, so the base size fixes their ids).

``AutoProcessor.from_pretrained(dir)`` (transformers 5.17) loads the result as ``Qwen3VLProcessor``.
"""

from __future__ import annotations

import itertools
import json
import os
import string

# Special tokens of the Qwen2/Qwen3 tokenizer, in id order from 151643. ``special`` follows the released
# tokenizer_config: the tool / fim / think tokens are added tokens but not "special" (decode keeps them).
FIRST_SPECIAL_ID = 151643
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# Qwen2's pre-tokenizer split (contractions, letter runs, single digits, punctuation runs, newlines, spaces).
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Words that get merges (space-prefixed form), so ordinary English encodes to a handful of ids.
_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "what word but not all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who its now find long down day did get "
    "come made may part describe image video picture frame seconds hello world answer think yes"
).split()
# Role names appear without a leading space (after <|im_start|>), so they also get bare-word merges.
_BARE_WORDS = ("user", "assistant", "system")
# Tokens placed at their ids in the real Qwen vocabulary, so chat scaffolding and video timestamps
# ('<0.5 seconds>' -> 27 15 13 20 6486 29) encode to the same ids as with the released tokenizer.
PINNED_IDS = {"user": 872, "assistant": 77091, "system": 8948, "\u0120seconds": 6486}

# The chat template of the Qwen3-VL Thinking releases (Qwen3-VL-235B-A22B-Thinking's chat_template.json), verbatim:
# tools in the system turn, hermes-style <tool_call> blocks, tool results as <tool_response> in a user turn, the
# reasoning of assistant turns after the last user query kept, and a generation prompt that opens the think block.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}\n"
    "{%- set video_count = namespace(value=0) %}\n"
    "{%- macro render_content(content, do_vision_count) %}\n"
    "    {%- if content is string %}\n"
    "        {{- content }}\n"
    "    {%- else %}\n"
    "        {%- for item in content %}\n"
    "            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}\n"
    "                {%- if do_vision_count %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                {%- endif %}\n"
    "                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                <|vision_start|><|image_pad|><|vision_end|>\n"
    "            {%- elif 'video' in item or item.type == 'video' %}\n"
    "                {%- if do_vision_count %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                {%- endif %}\n"
    "                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                <|vision_start|><|video_pad|><|vision_end|>\n"
    "            {%- elif 'text' in item %}\n"
    "                {{- item.text }}\n"
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "{%- endmacro %}\n"
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- render_content(messages[0].content, false) + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" %}\n"
    "        {%- set content = render_content(message.content, false) %}\n"
    "        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}\n"
    "            {%- set ns.multi_step_tool = false %}\n"
    "            {%- set ns.last_query_index = index %}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- set content = render_content(message.content, True) %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n"
    "                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n"
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n<think>\\n' }}\n"
    "{%- endif %}\n"
)

# The same template with the Instruct releases' generation prompt, which opens no think block (the answer is all
# content): what the tests use to check that the reasoning split follows the prompt.
INSTRUCT_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n<think>\\n'", "'<|im_start|>assistant\\n'")
CHAT_TEMPLATES = {"thinking": CHAT_TEMPLATE, "instruct": INSTRUCT_CHAT_TEMPLATE}

IMAGE_PROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,  # bicubic
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    # Pixel-count bounds (256^2 .. 4096^2), not edge lengths, despite the key names.
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}

VIDEO_PROCESSOR_CONFIG = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "do_sample_frames": True,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "fps": 2,
    "min_frames": 4,
    "max_frames": 768,
    # Bounds on t * H * W pixels of the whole sampled clip.
    "size": {"shortest_edge": 4096, "longest_edge": 25165824},
}


def byte_symbols() -> list[str]:
    """The byte-level alphabet in GPT-2 / Qwen id order: printable bytes stand for themselves and come first, the
    other bytes map to U+0100.. in byte order (so b'\\n' -> id 198 'Ċ' and b' ' -> id 220 'Ġ', as in Qwen)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _chain(form: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build ``form`` from its characters."""
    return [(form[: i - 1], form[i - 1]) for i in range(2, len(form) + 1)]


def _word_merges() -> list[tuple[str, str]]:
    """Space-prefixed chains first: each of their steps extends the leftmost piece of a ' word' pre-token, so no
    other merge can win against them and every listed word becomes one token. Bare chains (role names) after."""
    space = chr(256 + 32)  # 'Ġ', the byte symbol of ' '
    merges: dict[tuple[str, str], None] = {}
    for word in _WORDS:
        merges.update(dict.fromkeys(_chain(space + word)))
    for word in _BARE_WORDS:
        merges.update(dict.fromkeys(_chain(word)))
    return list(merges)


def _fillers(taken: set[str]):
    """Short lowercase strings that no merge produces (so BPE never emits them), skipping ``taken``."""
    for length in itertools.count(3):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            s = "".join(letters)
            if s not in taken:
                yield s


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Base vocabulary of exactly FIRST_SPECIAL_ID entries (ids 0..151642) and its merges."""
    merges = _word_merges()
    slots: list[str | None] = [None] * FIRST_SPECIAL_ID
    slots[:256] = byte_symbols()
    for tok, i in PINNED_IDS.items():
        slots[i] = tok
    merged = list(dict.fromkeys(a + b for a, b in merges if a + b not in PINNED_IDS))
    rest = itertools.chain(merged, _fillers(set(slots[:256]) | set(merged) | set(PINNED_IDS)))
    slots = [tok if tok is not None else next(rest) for tok in slots]
    assert len(set(slots)) == FIRST_SPECIAL_ID
    return {tok: i for i, tok in enumerate(slots)}, merges


def build_tokenizer():
    """A ``tokenizers.Tokenizer`` with Qwen2's pipeline and the special tokens at their real ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = build_vocab()
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                        byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # add_tokens assigns consecutive ids after the base vocab, in list order.
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in SPECIAL_TOKENS])
    assert tok.token_to_id("</think>") == FIRST_SPECIAL_ID + len(SPECIAL_TOKENS) - 1
    assert tok.encode("<|im_start|>assistant\n<0.5 seconds>").ids == [151644, 77091, 198, 27, 15, 13, 20, 6486, 29]
    return tok


def _tokenizer_config() -> dict:
    decoder = {
        str(FIRST_SPECIAL_ID + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": s}
        for i, (t, s) in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "processor_class": "Qwen3VLProcessor",
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 262144,
    }


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_processor_files(model_dir: str | os.PathLike, chat_template: str = "thinking") -> None:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and the image / video processor configs.

    transformers 5.17 reads the chat template from ``chat_template.jinja`` for both the tokenizer and the processor
    (the legacy ``chat_template.json`` / tokenizer_config key are not needed).
    """
    model_dir = os.fspath(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    # Compact JSON: tokenizer.json is the only large file (~2 MB, dominated by the 151k vocab entries).
    with open(os.path.join(model_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(json.loads(build_tokenizer().to_str()), ensure_ascii=False, separators=(",", ":")))
    _write_json(os.path.join(model_dir, "tokenizer_config.json"), _tokenizer_config())
    with open(os.path.join(model_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATES[chat_template])
    _write_json(os.path.join(model_dir, "preprocessor_config.json"), IMAGE_PROCESSOR_CONFIG)
    _write_json(os.path.join(model_dir, "video_preprocessor_config.json"), VIDEO_PROCESSOR_CONFIG)
    _write_json(os.path.join(model_dir, "processor_config.json"), {"processor_class": "Qwen3VLProcessor"})
