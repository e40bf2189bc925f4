"""Chat messages -> model inputs, with the checkpoint's own tokenizer, chat template, image and video processor.

Images follow transformers exactly (same template text, same placeholder expansion, same tokenizer call), so the
ids and pixel values equal ``AutoProcessor.apply_chat_template(..., tokenize=True, return_dict=True)``.

Videos use the *release* prompt format (transformers 4.57 / qwen-vl-utils / vLLM, what the model was trained on):
the template's whole ``<|vision_start|><|video_pad|><|vision_end|>`` triple becomes, per temporal patch k,
``<{t_k:.1f} seconds><|vision_start|>`` + ``<|video_pad|>`` x (gh*gw/4) + ``<|vision_end|>``. transformers 5.x keeps
an extra outer start/end pair around that, which we do not. We decode and sample frames ourselves (PyAV) and give
the checkpoint's video processor the sampled frames only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from ..errors import UserError
from .media import (MediaLimitError, MediaOptions, MessageFormatError, VideoClip, load_image, load_video,
                    media_size, open_image, probe_video, resolve_media)
from .prompt_size import Part, PromptSize, PromptTooLongError
from .threads import preprocess_threads

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values (same as transformers)


class ProcessorFilesError(UserError):
    """The checkpoint's processor files are missing or disagree with config.json."""


@dataclass
class PromptInputs:
    """One request's prompt. Legend: N_img / N_vid = patches (rows of 1536 = C*Tp*P*P pixel values)."""

    input_ids: list[int]
    mm_token_type_ids: list[int]  # per token: 0 text, 1 <|image_pad|>, 2 <|video_pad|>
    pixel_values: torch.Tensor | None = None  # [N_img, 1536] float32, images in prompt order
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3] int64 (1, gh, gw)
    pixel_values_videos: torch.Tensor | None = None  # [N_vid, 1536] float32
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3] int64 (gt, gh, gw), one row per whole video
    video_timestamps: list[list[float]] = field(default_factory=list)  # seconds per temporal patch, per video
    prompt: str = ""  # the rendered template, placeholders not yet expanded


@dataclass(frozen=True)
class MediaRef:
    kind: str  # 'image' | 'video'
    url: Any
    where: str  # names the part in error messages, e.g. messages[0].content[1].image_url


# --------------------------------------------------------------------------------------------------------------------
# Messages


def _part(part: Any, where: str, reserved: Sequence[str]) -> tuple[dict, MediaRef | None]:
    """One OpenAI content part -> (template part, media reference or None)."""
    if not isinstance(part, dict):
        raise MessageFormatError(f"{where}: expected an object with a 'type'")
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": _text(part.get("text"), f"{where}.text", reserved)}, None
    if kind in ("image_url", "video_url"):
        media = part.get(kind)
        url = media.get("url") if isinstance(media, dict) else media
        if not isinstance(url, str):
            raise MessageFormatError(f"{where}.{kind}: expected an object with a 'url' string")
        short = kind[: -len("_url")]
        return {"type": short}, MediaRef(short, url, f"{where}.{kind}")
    raise MessageFormatError(f"{where}.type: expected 'text', 'image_url' or 'video_url', got {kind!r}")


def _text(value: Any, where: str, reserved: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise MessageFormatError(f"{where}: expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone UTF-16 surrogate ("\ud800" in JSON): no tokenizer can take it
        raise MessageFormatError(f"{where}: not valid Unicode (a lone surrogate at character {e.start})") from None
    # A literal vision token in user text would desynchronise placeholders and pixel values.
    for token in reserved:
        if token in value:
            raise MessageFormatError(f"{where}: contains the reserved token {token!r}")
    return value


# Message fields besides role and content: rendered by the template, or (name, and echoed response fields that
# are null or empty) accepted and not rendered, as OpenAI-compatible servers do.
_MESSAGE_FIELDS = {"system": ("name",), "developer": ("name",), "user": ("name",),
                   "assistant": ("tool_calls", "reasoning_content", "reasoning", "name", "refusal", "annotations",
                                 "audio", "function_call"),
                   "tool": ("tool_call_id", "name")}
_ECHOED = ("refusal", "annotations", "audio", "function_call")  # must be null / empty when sent


def normalize_messages(messages: Any, reserved: Sequence[str] = ()) -> tuple[list[dict], list[MediaRef]]:
    """Validate OpenAI-style messages; return template messages (parts typed text/image/video) and media in order.

    ``developer`` messages render as ``system`` (OpenAI's newer name for it); assistant messages may carry
    ``tool_calls`` with ``content`` null, and ``tool`` messages the results."""
    if not isinstance(messages, list) or not messages:
        raise MessageFormatError("messages: expected a non-empty list of messages")
    out, refs = [], []
    for i, msg in enumerate(messages):
        msg_out, msg_refs = _message(msg, f"messages[{i}]", reserved)
        out.append(msg_out)
        refs += msg_refs
    return out, refs


def _message(msg: Any, where: str, reserved: Sequence[str]) -> tuple[dict, list[MediaRef]]:
    if not isinstance(msg, dict):
        raise MessageFormatError(f"{where}: expected an object with 'role' and 'content'")
    role = msg.get("role")
    if role not in _MESSAGE_FIELDS:
        raise MessageFormatError(f"{where}.role: expected one of {', '.join(_MESSAGE_FIELDS)}, got {role!r}")
    for key in msg:
        if key not in ("role", "content") and key not in _MESSAGE_FIELDS[role]:
            raise MessageFormatError(f"{where}.{key}: not a field of a {role} message")
        if key in _ECHOED and msg[key] not in (None, [], ""):
            raise MessageFormatError(f"{where}.{key}: not supported (send null or leave it out)")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role}
    content, refs = _content(msg.get("content"), f"{where}.content", role, reserved,
                             optional=role == "assistant" and bool(msg.get("tool_calls")))
    out["content"] = content
    if role == "assistant":
        if msg.get("tool_calls"):
            out["tool_calls"] = _tool_calls(msg["tool_calls"], f"{where}.tool_calls")
        reasoning = msg.get("reasoning_content", msg.get("reasoning"))
        if reasoning is not None:
            out["reasoning_content"] = _text(reasoning, f"{where}.reasoning_content", reserved)
    if role == "tool" and msg.get("tool_call_id") is not None:
        out["tool_call_id"] = _text(msg["tool_call_id"], f"{where}.tool_call_id", ())
    return out, refs


def _content(content: Any, where: str, role: str, reserved: Sequence[str], optional: bool):
    """A message's content -> (template content, media refs). Null only where ``optional`` (then "")."""
    if content is None and optional:
        return "", []
    if isinstance(content, str):
        return _text(content, where, reserved), []
    if not isinstance(content, list):
        raise MessageFormatError(f"{where}: expected a string or a list of content parts")
    parts, refs = [], []
    for j, p in enumerate(content):
        part, ref = _part(p, f"{where}[{j}]", reserved)
        if ref is not None:
            if role == "system" or role == "developer":
                raise MessageFormatError(f"{ref.where}: images and videos are not allowed in {role} messages")
            refs.append(ref)
        parts.append(part)
    return parts, refs


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's tool calls, as the template renders them: function name and JSON arguments text."""
    if not isinstance(calls, list):
        raise MessageFormatError(f"{where}: expected a list of tool calls")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise MessageFormatError(f"{where}[{k}].function: expected an object with a 'name' string")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


# apply_chat_template's own parameters: a client's chat_template_kwargs must not reach them (they would change what
# the call does, not what the template sees).
_TEMPLATE_CALL_PARAMS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs", "load_audio_from_video", "num_frames",
    "fps", "video_load_backend", "sampling_rate"})


def check_template_kwargs(kwargs: Any) -> dict[str, Any]:
    """chat_template_kwargs: a map of template variable names to values, none of them a parameter of the call."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise MessageFormatError("chat_template_kwargs: expected an object of template variables")
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier() or key in _TEMPLATE_CALL_PARAMS:
            raise MessageFormatError(f"chat_template_kwargs.{key}: not a template variable this server passes on")
    return dict(kwargs)


def _short(url: str, limit: int = 60) -> str:
    """A URL shortened for error messages (data URLs can be megabytes)."""
    return url if len(url) <= limit else url[: limit - 3] + "..."


def _texts(normalized: list[dict]) -> list[tuple[str, str]]:
    """(where, text) of every text part of normalized messages (whose indices are the request's)."""
    out = []
    for i, msg in enumerate(normalized):
        if isinstance(msg["content"], str):
            out.append((f"messages[{i}].content", msg["content"]))
            continue
        out += [(f"messages[{i}].content[{j}].text", p["text"]) for j, p in enumerate(msg["content"])
                if p["type"] == "text"]
    return out


def _check_counts(refs: Sequence[MediaRef], opts: MediaOptions) -> None:
    for kind, limit in (("image", opts.max_images), ("video", opts.max_videos)):
        n = sum(r.kind == kind for r in refs)
        if limit is not None and n > limit:
            raise MediaLimitError(f"messages: {n} {kind}s in the request; the limit is {limit}")


# --------------------------------------------------------------------------------------------------------------------
# Processor


class Processor:
    """Messages -> ``PromptInputs`` and token ids -> text, using the checkpoint's processor files."""

    def __init__(self, hf_processor: Any, cfg: Any, media: MediaOptions | None = None):
        self.hf = hf_processor
        self.tokenizer = hf_processor.tokenizer
        self.media = media or MediaOptions()
        tok = self.tokenizer.convert_ids_to_tokens
        self.image_token = tok(cfg.image_token_id)
        self.video_token = tok(cfg.video_token_id)
        self.vision_start = tok(cfg.vision_start_token_id)
        self.vision_end = tok(cfg.vision_end_token_id)
        self.image_token_id, self.video_token_id = cfg.image_token_id, cfg.video_token_id
        vp = hf_processor.video_processor
        self.merge = vp.merge_size**2
        self.temporal_patch = vp.temporal_patch_size
        self.video_sampling = dict(fps=vp.fps, min_frames=vp.min_frames, max_frames=vp.max_frames)
        self.size = PromptSize(hf_processor, self.video_sampling)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, cfg: Any, media: MediaOptions | None = None) -> Processor:
        import transformers

        model_dir = os.fspath(model_dir)
        sources = _check_files(model_dir)
        try:
            hf = transformers.AutoProcessor.from_pretrained(model_dir)
        except (OSError, ValueError, KeyError) as e:
            first_line = str(e).splitlines()[0] if str(e) else ""
            raise ProcessorFilesError(f"{model_dir}: cannot load the tokenizer / processor files "
                                      f"({type(e).__name__}: {first_line})") from None
        if not getattr(hf, "chat_template", None):
            raise ProcessorFilesError(f"{model_dir}: no chat template (chat_template.jinja or chat_template.json)")
        _check_against_config(hf, cfg, model_dir, sources)
        return cls(hf, cfg, media)

    # ---- prompts

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               template_kwargs: dict[str, Any] | None = None) -> str:
        """The chat template applied to normalized messages with the generation prompt; ``tools`` (OpenAI
        function tools) and ``template_kwargs`` (extra template variables, e.g. enable_thinking) go to the template."""
        import jinja2

        kwargs = check_template_kwargs(template_kwargs)
        try:
            return self.hf.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                               add_generation_prompt=True, **kwargs)
        except jinja2.TemplateError as e:  # the checkpoint's template refuses these messages (raise_exception)
            raise MessageFormatError(f"messages: the chat template refused them: {e}") from None

    def build_inputs(self, messages: Any, tools: list[dict] | None = None,
                     template_kwargs: dict[str, Any] | None = None, max_tokens: int | None = None) -> PromptInputs:
        """OpenAI-style chat messages -> prompt ids and pixel values. Raises RequestError subclasses;
        PromptTooLongError for a prompt of more than ``max_tokens`` tokens, found before the work where possible."""
        normalized, refs = normalize_messages(messages, self._reserved())
        return self._build(normalized, refs, tools, template_kwargs, max_tokens)

    def build_from_prompt(self, text: str, images: Iterable[str] = (), videos: Iterable[str] = (),
                          system: str | None = None) -> PromptInputs:
        """The CLI's --prompt/--image/--video: one user turn, images then videos then the text."""
        refs = [MediaRef("image", u, f"--image {_short(u)}") for u in images]
        refs += [MediaRef("video", u, f"--video {_short(u)}") for u in videos]
        text = _text(text, "--prompt", self._reserved())
        content = [{"type": r.kind} for r in refs] + [{"type": "text", "text": text}]
        normalized = ([{"role": "system", "content": system}] if system else []) + [{"role": "user",
                                                                                     "content": content}]
        return self._build(normalized, refs)

    def _reserved(self) -> tuple[str, ...]:
        return (self.image_token, self.video_token, self.vision_start, self.vision_end)

    def _build(self, normalized: list[dict], refs: list[MediaRef], tools: list[dict] | None = None,
               template_kwargs: dict[str, Any] | None = None, budget: int | None = None) -> PromptInputs:
        """Cheap checks first (counts, text length, media headers), then decoding and the bulk work."""
        _check_counts(refs, self.media)
        if budget is not None:
            self.size.check_text(_texts(normalized), budget)
        opened = self._open_media(refs)
        prompt = self.render(normalized, tools, template_kwargs)
        if budget is not None and opened:  # (text alone: the exact count below costs no more)
            self.size.check_media(len(self.encode(prompt)), [part for part, _ in opened], budget)
        out = PromptInputs(input_ids=[], mm_token_type_ids=[], prompt=prompt)
        images = [(part, src) for part, src in opened if part.kind == "image"]
        clips = [load_video(src, part.where, temporal_patch=self.temporal_patch, info=part.video, opts=self.media,
                            **self.video_sampling) for part, src in opened if part.kind == "video"]
        with preprocess_threads():  # bulk tensor work: the process's share of the cores (engine/threads.py)
            if images:
                out.pixel_values, out.image_grid_thw = self._process_images(images)
            if clips:
                out.pixel_values_videos, out.video_grid_thw = self._process_videos(clips)
                out.video_timestamps = [c.timestamps(self.temporal_patch) for c in clips]
        text = self._expand(prompt, out)
        out.input_ids = self.encode(text)
        if budget is not None and len(out.input_ids) > budget:
            raise PromptTooLongError("messages", len(out.input_ids), budget, True)
        out.mm_token_type_ids = [IMAGE if t == self.image_token_id else VIDEO if t == self.video_token_id else TEXT
                                 for t in out.input_ids]
        return out

    def _open_media(self, refs: list[MediaRef]) -> list[tuple[Part, Any]]:
        """Each medium's bytes or path resolved (the request's byte limit), its header read and checked (pixel
        limits); nothing decoded. Images come back opened (PIL reads lazily), videos as their source."""
        out, used = [], 0
        for r in refs:
            src = resolve_media(r.url, r.kind, r.where, self.media, used)
            used += media_size(src)
            if r.kind == "image":
                img = open_image(src, r.where, self.media)
                out.append((Part("image", r.where, img.width, img.height), img))
            else:
                info = probe_video(src, r.where, self.media)
                out.append((Part("video", r.where, info.width, info.height, info), src))
        return out

    def _process_images(self, images: list[tuple[Part, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One image at a time, decoded just before it is processed: at most one full-size image in memory. (The
        processor treats each image alone, so this equals processing the list at once.)"""
        pixels, grids = [], []
        for part, img in images:
            feats = self.hf.image_processor(images=[load_image(img, part.where)], return_tensors="pt")
            pixels.append(feats["pixel_values"])
            grids.append(feats["image_grid_thw"])
            img.close()
        return torch.cat(pixels), torch.cat(grids)

    def _process_videos(self, clips: list[VideoClip]) -> tuple[torch.Tensor, torch.Tensor]:
        # Frames are already sampled; cap_pixels_per_frame=False is the release behaviour and silences
        # transformers' deprecation warning about its future default.
        feats = self.hf.video_processor(videos=[c.frames for c in clips], do_sample_frames=False,
                                        cap_pixels_per_frame=False, input_data_format="channels_first",
                                        return_tensors="pt")
        grid = feats["video_grid_thw"]
        for clip, row in zip(clips, grid.tolist()):
            assert row[0] * self.temporal_patch == len(clip.indices), (row, len(clip.indices))
        return feats["pixel_values_videos"], grid

    def _expand(self, prompt: str, inp: PromptInputs) -> str:
        """Replace each image pad by its run of pads and each video triple by the release per-frame format."""
        triple = self.vision_start + self.video_token + self.vision_end
        pieces = re.split(f"({re.escape(self.image_token)}|{re.escape(triple)})", prompt)
        n_img = 0 if inp.image_grid_thw is None else len(inp.image_grid_thw)
        n_vid = 0 if inp.video_grid_thw is None else len(inp.video_grid_thw)
        found = (pieces[1::2].count(self.image_token), pieces[1::2].count(triple))
        if found != (n_img, n_vid):
            raise ProcessorFilesError(f"chat template: rendered {found[0]} image and {found[1]} video placeholders "
                                      f"for {n_img} images and {n_vid} videos")
        img_iter, vid_iter = iter(range(n_img)), iter(range(n_vid))
        for k in range(1, len(pieces), 2):
            if pieces[k] == self.image_token:
                i = next(img_iter)
                pieces[k] = self.image_token * (int(inp.image_grid_thw[i].prod()) // self.merge)
            else:
                pieces[k] = self._video_text(inp, next(vid_iter))
        return "".join(pieces)

    def _video_text(self, inp: PromptInputs, v: int) -> str:
        _, gh, gw = inp.video_grid_thw[v].tolist()
        frame = self.vision_start + self.video_token * (gh * gw // self.merge) + self.vision_end
        return "".join(f"<{t:.1f} seconds>" + frame for t in inp.video_timestamps[v])

    # ---- text

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, skip_special_tokens)

    @property
    def eos_token_ids(self) -> list[int]:
        """``<|im_end|>`` and ``<|endoftext|>`` (the Thinking model's stop tokens), those the tokenizer has."""
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return [i for i in ids if isinstance(i, int) and i != self.tokenizer.unk_token_id]


PROCESSOR_CONFIG = "processor_config.json"      # transformers 5: one file, image and video settings nested
IMAGE_CONFIG = "preprocessor_config.json"       # the release layout: one file each
VIDEO_CONFIG = "video_preprocessor_config.json"


def _nested_entries(model_dir: str) -> dict:
    path = os.path.join(model_dir, PROCESSOR_CONFIG)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProcessorFilesError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ProcessorFilesError(f"{path}: expected a JSON object")
    return data


def processor_sources(model_dir: str) -> dict[str, str | None]:
    """Where transformers reads the image and the video processor settings from, in its order: the entry nested in
    processor_config.json, else the file of their own (the video processor falls back to the image's file)."""
    nested = _nested_entries(model_dir)
    has = set(os.listdir(model_dir))

    def source(entry: str, files: tuple[str, ...]) -> str | None:
        if entry in nested:
            return f"{PROCESSOR_CONFIG} ({entry})"
        return next((f for f in files if f in has), None)

    return {"image": source("image_processor", (IMAGE_CONFIG,)),
            "video": source("video_processor", (VIDEO_CONFIG, IMAGE_CONFIG))}


def _check_files(model_dir: str) -> dict[str, str | None]:
    if not os.path.isdir(model_dir):
        raise ProcessorFilesError(f"{model_dir}: model directory not found")
    has = set(os.listdir(model_dir))
    sources = processor_sources(model_dir)
    missing = [] if "tokenizer_config.json" in has else ["tokenizer_config.json"]
    if "tokenizer.json" not in has and not {"vocab.json", "merges.txt"} <= has:
        missing.insert(0, "tokenizer.json")
    if sources["image"] is None:
        missing.append(f"{IMAGE_CONFIG} (or an image_processor entry in {PROCESSOR_CONFIG})")
    if missing:
        raise ProcessorFilesError(f"{model_dir}: missing processor file(s): {', '.join(missing)}")
    return sources


def _check_against_config(hf: Any, cfg: Any, model_dir: str, sources: dict[str, str | None]) -> None:
    """The processor files must agree with config.json on vision geometry and the vision token ids."""
    tok = hf.tokenizer
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        want = getattr(cfg, name)
        token = tok.convert_ids_to_tokens(want)
        if token is None or tok.convert_tokens_to_ids(token) != want:
            raise ProcessorFilesError(f"{model_dir}/tokenizer.json: has no token with id {want} "
                                      f"(config.json {name})")
    v = cfg.vision
    for proc, fname in ((hf.image_processor, sources["image"]), (hf.video_processor, sources["video"])):
        for key, want in (("patch_size", v.patch_size), ("merge_size", v.spatial_merge_size),
                          ("temporal_patch_size", v.temporal_patch_size)):
            got = getattr(proc, key)
            if got != want:
                raise ProcessorFilesError(f"{model_dir}/{fname}: {key} {got} does not match config.json "
                                          f"vision_config ({want})")


# --------------------------------------------------------------------------------------------------------------------
# Streaming detokenization


class IncrementalDetokenizer:
    """Token ids in, text deltas out, never splitting a multi-byte UTF-8 character.

    Decodes a short window: ``prefix`` marks where the last complete text began, ``read`` where new tokens begin.
    A delta is released only when the window's text no longer ends in U+FFFD (an incomplete byte sequence);
    ``finish`` flushes whatever is left (a genuine U+FFFD included).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, ids: int | Sequence[int]) -> str:
        """Append token id(s); return the newly completed text (possibly empty)."""
        self.ids.extend([ids] if isinstance(ids, int) else ids)
        done = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) <= len(done) or now.endswith("\ufffd"):
            return ""
        delta = now[len(done):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The text not yet returned (an incomplete character becomes U+FFFD)."""
        done = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        delta = now[len(done):]
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta
