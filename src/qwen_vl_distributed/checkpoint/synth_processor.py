"""Processor files for synthetic checkpoints: a Qwen-shaped tokenizer, chat template and image/video configs.

The real Qwen tokenizer cannot be downloaded here, so we build a stand-in offline with the ``tokenizers`` library.
What matters for the engine is kept exact: the special tokens sit at their real ids (151643..151668), the
pre-tokenizer / normalizer / decoder are Qwen2's, ``<think>`` / ``</think>`` encode as single ids, and the image and
video processor settings are Qwen3-VL's. The ordinary vocabulary is synthetic: the 256 byte symbols, merges for a
few common English words, and unreachable filler entries so that the base vocabulary ends exactly at id 151642
(transformers re-adds the special tokens after it in id order, so the base size fixes their ids).

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

# Words that get real merges, so ordinary English encodes to a handful of ids (nicer to read in tests and logs).
_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "what word but not all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who its now find long down day did get "
    "come made may part describe image video picture frame seconds hello world answer think yes"
).split()

CHAT_TEMPLATE = """\
{#- Qwen3-VL Thinking style ChatML. Media parts render inline as vision_start + pad + vision_end; earlier assistant
    turns keep only the answer after </think>; the generation prompt opens the think block. -#}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part.type in ('image', 'image_url') or 'image' in part or 'image_url' in part -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif part.type in ('video', 'video_url') or 'video' in part or 'video_url' in part -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in part -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}
    {%- set text = render_content(message.content) -%}
    {%- if message.role == 'assistant' and '</think>' in text -%}
        {%- set text = text.split('</think>')[-1].lstrip('\\n') -%}
    {%- endif -%}
    {{- '<|im_start|>' + message.role + '\\n' + text + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n<think>\\n' -}}
{%- endif -%}
"""

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
    """The byte-level alphabet: byte b -> one printable character (GPT-2 scheme), listed in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, shifted = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


def _word_merges() -> list[tuple[str, str]]:
    """Left-to-right merge chains for each word and its space-prefixed form ('Ġ' is the byte symbol of ' ')."""
    space = byte_symbols()[ord(" ")]
    merges: dict[tuple[str, str], None] = {}
    for word in _WORDS:
        for form in (word, space + word):
            for i in range(2, len(form) + 1):
                merges[(form[: i - 1], form[i - 1])] = None
    return list(merges)


def _fillers(taken: set[str], count: int):
    """Short lowercase strings never produced by any merge (so BPE cannot emit them), skipping ``taken``."""
    made = 0
    for length in itertools.count(3):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            s = "".join(letters)
            if s in taken:
                continue
            yield s
            made += 1
            if made == count:
                return


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Base vocabulary of exactly FIRST_SPECIAL_ID entries (ids 0..151642) and its merges."""
    symbols = byte_symbols()
    merges = _word_merges()
    vocab_list = symbols + [a + b for a, b in merges]
    taken = set(vocab_list)
    vocab_list += _fillers(taken, FIRST_SPECIAL_ID - len(vocab_list))
    assert len(vocab_list) == len(set(vocab_list)) == FIRST_SPECIAL_ID
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


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


def _write_json(path: str, obj: dict, indent: int | None = 2) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def write_processor_files(model_dir: str | os.PathLike) -> None:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and the image / video processor configs.

    transformers 5.17 reads the chat template from ``chat_template.jinja`` for both the tokenizer and the processor
    (the legacy ``chat_template.json`` / tokenizer_config key are not needed).
    """
    model_dir = os.fspath(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    # Compact JSON: tokenizer.json is the only large file (~2.5 MB, dominated by the 151k vocab entries).
    with open(os.path.join(model_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(json.loads(build_tokenizer().to_str()), ensure_ascii=False, separators=(",", ":")))
    _write_json(os.path.join(model_dir, "tokenizer_config.json"), _tokenizer_config())
    with open(os.path.join(model_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
    _write_json(os.path.join(model_dir, "preprocessor_config.json"), IMAGE_PROCESSOR_CONFIG)
    _write_json(os.path.join(model_dir, "video_preprocessor_config.json"), VIDEO_PROCESSOR_CONFIG)
    _write_json(os.path.join(model_dir, "processor_config.json"), {"processor_class": "Qwen3VLProcessor"})
