"""Processor: synthetic tokenizer files, chat template, prompts vs HF AutoProcessor, videos, media errors."""

from __future__ import annotations

import base64
import dataclasses
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from qwen_vl_distributed.checkpoint.synth_processor import SPECIAL_TOKENS, write_processor_files
from qwen_vl_distributed.engine.media import (MediaAccessError, MediaDecodeError, MediaLimitError, MediaOptions,
                                              MediaURLError, MessageFormatError, RequestError, load_video, resolve_media,
                                              pad_to_multiple, sample_frame_indices, sample_image_path)
from qwen_vl_distributed.engine.processor import IncrementalDetokenizer, Processor, ProcessorFilesError
from qwen_vl_distributed.model.config import config_to_dict, preset

IM_START, IM_END, NL = 151644, 151645, 198
V_START, V_END, IMG, VID, THINK = 151652, 151653, 151655, 151656, 151667


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    write_processor_files(d)
    (d / "config.json").write_text(json.dumps(config_to_dict(preset("tiny"))))
    return d


@pytest.fixture(scope="module")
def proc(model_dir):
    return Processor.from_pretrained(model_dir, preset("tiny"))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (64, 64), "b": (300, 200), "c": (40, 90)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{name}.png")
    (d / "junk.png").write_bytes(b"not an image at all")
    write_video(d / "clip.mp4", n=8, fps=4)
    write_video(d / "odd.mp4", n=5, fps=1)
    return d


def write_video(path, n: int, fps: int, size: int | tuple[int, int] = 64) -> None:
    """A small mpeg4 clip (size: side, or (width, height)) whose frame i is filled with gray level 30*i."""
    w, h = (size, size) if isinstance(size, int) else size
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height = w, h
        s.pix_fmt = "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 30 * i, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def text(t):
    return {"type": "text", "text": t}


def image(url):
    return {"type": "image_url", "image_url": {"url": str(url)}}


def video(url):
    return {"type": "video_url", "video_url": {"url": str(url)}}


def data_url(path, mime):
    return f"data:{mime};base64," + base64.b64encode(open(path, "rb").read()).decode()


def hf_inputs(proc, messages):
    return proc.hf.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True,
                                       return_tensors="pt")


# --------------------------------------------------------------------------------------------------------------------
# Synthetic processor files


def test_special_tokens_at_real_ids(proc, model_dir):
    tok = proc.tokenizer
    for i, (t, _) in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == 151643 + i
        assert tok.encode(t, add_special_tokens=False) == [151643 + i]
    assert len(tok) == 151669 <= 151936
    assert (tok.eos_token, tok.pad_token_id) == ("<|im_end|>", 151643)
    assert proc.eos_token_ids == [IM_END, 151643]
    assert (model_dir / "tokenizer.json").stat().st_size < 4_000_000


def test_tokenizer_round_trip_and_real_byte_ids(proc):
    s = "Hello wörld, the image\n<think>x</think> 你好 🙂 <0.5 seconds>"
    ids = proc.encode(s)
    assert proc.decode(ids) == s
    assert proc.encode("\n ") == [198, 220]  # Qwen's byte ids for newline and space
    assert proc.encode("<0.5 seconds>") == [27, 15, 13, 20, 6486, 29]
    assert proc.decode([IM_START, 872, NL]) == "user\n"  # special tokens skipped by default


def test_chat_template(proc):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "image"}, {"type": "video"}]},
        {"role": "assistant", "content": "secret plan\n</think>\n\nHello!"},
        {"role": "user", "content": "Again"},
    ]
    assert proc.render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi <|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")


def test_tokenizer_chat_template_matches_processor(proc):
    messages = [{"role": "user", "content": "hi"}]
    ids = proc.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    assert list(ids) == [IM_START, 872, NL, *proc.encode("hi"), IM_END, NL, IM_START, 77091, NL, THINK, NL]


def test_processor_files_checked_against_config(model_dir):
    cfg = preset("tiny")
    bad = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, patch_size=14))
    with pytest.raises(ProcessorFilesError, match="preprocessor_config.json: patch_size 16"):
        Processor.from_pretrained(model_dir, bad)


# --------------------------------------------------------------------------------------------------------------------
# Prompts vs HF


def test_text_only_matches_hf(proc):
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": [text("What is 2+2?")]},
                {"role": "assistant", "content": "Let me think.</think>\n\nFour."},
                {"role": "user", "content": "And 3+3?"}]
    out = proc.build_inputs(messages)
    ref = hf_inputs(proc, messages)
    assert out.input_ids == ref["input_ids"][0].tolist()
    assert out.pixel_values is None and out.video_grid_thw is None
    assert out.mm_token_type_ids == [0] * len(out.input_ids)


def test_one_image_matches_hf(proc):
    path = sample_image_path()
    out = proc.build_inputs(user(image(path), text("Describe this image.")))
    ref = hf_inputs(proc, user({"type": "image", "image": Image.open(path)}, text("Describe this image.")))
    assert out.input_ids == ref["input_ids"][0].tolist()
    assert torch.equal(out.pixel_values, ref["pixel_values"])
    assert out.pixel_values.dtype == torch.float32 and out.pixel_values.shape == (14 * 20, 1536)
    assert out.image_grid_thw.tolist() == [[1, 14, 20]]  # 64x48 upscaled to the 256^2 pixel floor: 320x224
    assert out.mm_token_type_ids == ref["mm_token_type_ids"][0].tolist()
    assert out.input_ids.count(IMG) == 70


def test_several_images_interleaved_match_hf(proc, media_dir):
    a, b, c = (media_dir / f"{n}.png" for n in "abc")
    ours = [{"role": "user", "content": [text("First "), image(f"file://{a}"), text(" then "), image(b)]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [image(data_url(c, "image/png")), text("Compare all three.")]}]
    theirs = [{"role": "user", "content": [text("First "), {"type": "image", "image": Image.open(a)}, text(" then "),
                                           {"type": "image", "image": Image.open(b)}]},
              {"role": "assistant", "content": "ok"},
              {"role": "user", "content": [{"type": "image", "image": Image.open(c)}, text("Compare all three.")]}]
    out, ref = proc.build_inputs(ours), hf_inputs(proc, theirs)
    assert out.input_ids == ref["input_ids"][0].tolist()
    assert torch.equal(out.pixel_values, ref["pixel_values"])
    assert torch.equal(out.image_grid_thw, ref["image_grid_thw"])
    assert out.image_grid_thw.tolist() == [[1, 16, 16], [1, 20, 14], [1, 12, 24]]
    assert out.mm_token_type_ids == ref["mm_token_type_ids"][0].tolist()


def test_url_forms_agree(proc, media_dir):
    a = media_dir / "a.png"
    forms = [str(a), f"file://{a}", data_url(a, "image/png"), data_url(a, "application/octet-stream")]
    outs = [proc.build_inputs(user(image(u), text("x"))) for u in forms]
    for o in outs[1:]:
        assert o.input_ids == outs[0].input_ids and torch.equal(o.pixel_values, outs[0].pixel_values)


def test_build_from_prompt_errors_name_the_flag(proc):
    with pytest.raises(MediaAccessError, match="^--image /no/such.png: file not found"):
        proc.build_from_prompt("hi", images=["/no/such.png"])
    with pytest.raises(MediaURLError, match=r"^--video data:video/mp4;base64,A+\.\.\.: not a valid"):
        proc.build_from_prompt("hi", videos=["data:video/mp4;base64," + "A" * 1000 + "!"])


def test_build_from_prompt(proc, media_dir):
    a, clip = media_dir / "a.png", media_dir / "clip.mp4"
    out = proc.build_from_prompt("What happens?", images=[str(a)], videos=[str(clip)])
    ref = proc.build_inputs(user(image(a), video(clip), text("What happens?")))
    assert out.input_ids == ref.input_ids
    assert torch.equal(out.pixel_values, ref.pixel_values)
    assert torch.equal(out.pixel_values_videos, ref.pixel_values_videos)


# --------------------------------------------------------------------------------------------------------------------
# Videos


def test_frame_sampling_rule():
    assert sample_frame_indices(8, 4.0) == [0, 2, 5, 7]  # int(8 / 4 * 2) = 4 frames
    assert sample_frame_indices(3, 30.0) == [0, 1, 2]  # min_frames 4, but never more than exist
    assert len(sample_frame_indices(100_000, 10.0)) == 768
    assert pad_to_multiple([0, 1, 2]) == [0, 1, 2, 2] and pad_to_multiple([0, 1]) == [0, 1]


def test_video_release_format(proc, media_dir):
    out = proc.build_inputs(user(video(media_dir / "clip.mp4"), text("What?")))
    # 8 frames at 4 fps -> frames [0, 2, 5, 7] -> 2 temporal patches at (0+2)/2/4 = 0.25 s and (5+7)/2/4 = 1.5 s.
    assert out.video_timestamps == [[0.25, 1.5]]
    assert out.video_grid_thw.tolist() == [[2, 4, 4]]
    assert out.pixel_values_videos.shape == (2 * 4 * 4, 1536)
    frame = [V_START] + [VID] * 4 + [V_END]
    body = proc.encode("<0.2 seconds>") + frame + proc.encode("<1.5 seconds>") + frame + proc.encode("What?")
    assert out.input_ids == [IM_START, 872, NL, *body, IM_END, NL, IM_START, 77091, NL, THINK, NL]
    assert out.mm_token_type_ids == [2 if t == VID else 0 for t in out.input_ids]


def test_video_matches_hf_apart_from_outer_pair(proc, media_dir):
    """transformers 5.x nests the release format inside the template's own start/end pair; otherwise identical."""
    from transformers.video_utils import VideoMetadata

    path = media_dir / "clip.mp4"
    out = proc.build_inputs(user(text("Watch: "), video(path)))
    clip = load_video(str(path), "v")
    meta = VideoMetadata(total_num_frames=clip.total_frames, fps=clip.video_fps, frames_indices=clip.indices)
    ref = proc.hf(text=[out.prompt], videos=[clip.frames], video_metadata=[meta], do_sample_frames=False,
                  cap_pixels_per_frame=False, return_tensors="pt")
    ids = ref["input_ids"][0].tolist()
    first = ids.index(V_START)
    last = len(ids) - 1 - ids[::-1].index(V_END)
    assert ids[:first] + ids[first + 1:last] + ids[last + 1:] == out.input_ids
    assert torch.equal(ref["pixel_values_videos"], out.pixel_values_videos)
    assert torch.equal(ref["video_grid_thw"], out.video_grid_thw)


def test_odd_frame_count_pads_last_frame(proc, media_dir):
    clip = load_video(str(media_dir / "odd.mp4"), "v")
    assert clip.indices == [0, 1, 2, 3, 4, 4]
    assert clip.timestamps() == [0.5, 2.5, 4.0]
    assert torch.equal(clip.frames[4], clip.frames[5])
    out = proc.build_inputs(user(video(data_url(media_dir / "odd.mp4", "video/mp4")), text("?")))
    assert out.video_grid_thw.tolist()[0][0] == 3
    assert "<4.0 seconds>" in proc.decode(out.input_ids)


def test_images_and_videos_together(proc, media_dir):
    out = proc.build_inputs(user(image(media_dir / "a.png"), video(media_dir / "clip.mp4"), text("?")))
    assert out.input_ids.count(IMG) == 64 and out.input_ids.count(VID) == 8
    assert out.input_ids.index(IMG) < out.input_ids.index(VID)
    assert out.pixel_values.shape[0] == 256 and out.pixel_values_videos.shape[0] == 32


# --------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("url, error, message", [
    ("data:image/png;base64,@@@@", MediaURLError, "messages[0].content[1].image_url: not a valid base64 data URL"),
    ("data:image/png,abc", MediaURLError, "messages[0].content[1].image_url: not a valid base64 data URL"),
    ("data:video/mp4;base64,AAAA", MediaURLError, "expected a data URL of type image/*, got 'video/mp4'"),
    ("https://example.com/cat.png", MediaURLError, "no network access"),
    ("ftp://example.com/cat.png", MediaURLError, "unsupported URL scheme 'ftp'"),
    ("/nonexistent/cat.png", MediaAccessError,
     "messages[0].content[1].image_url: file not found: '/nonexistent/cat.png'"),
    ("data:image/png;base64," + base64.b64encode(b"garbage").decode(), MediaDecodeError,
     "messages[0].content[1].image_url: cannot decode image"),
])
def test_media_errors(proc, url, error, message):
    with pytest.raises(error) as e:
        proc.build_inputs(user(text("x"), image(url)))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, RequestError)


def test_undecodable_files(proc, media_dir):
    with pytest.raises(MediaDecodeError, match=r"messages\[0\].content\[0\].image_url: cannot decode image"):
        proc.build_inputs(user(image(media_dir / "junk.png")))
    with pytest.raises(MediaDecodeError, match=r"messages\[0\].content\[0\].video_url: not a video"):
        proc.build_inputs(user(video(media_dir / "junk.png")))
    with pytest.raises(MediaDecodeError, match=r"messages\[0\].content\[0\].video_url: cannot decode video"):
        proc.build_inputs(user(video(data_url(media_dir / "junk.png", "video/mp4"))))


def test_local_path_policy(model_dir, media_dir, tmp_path):
    cfg = preset("tiny")
    (tmp_path / "x.png").write_bytes((media_dir / "a.png").read_bytes())
    allowed = Processor.from_pretrained(model_dir, cfg, MediaOptions(allowed_local_dirs=(str(media_dir),)))
    allowed.build_inputs(user(image(media_dir / "a.png")))
    with pytest.raises(MediaAccessError, match="outside the allowed directories"):
        allowed.build_inputs(user(image(tmp_path / "x.png")))
    with pytest.raises(MediaAccessError, match="outside the allowed directories"):
        allowed.build_inputs(user(image(f"{media_dir}/../{tmp_path.name}/x.png")))
    none = Processor.from_pretrained(model_dir, cfg, MediaOptions(allowed_local_dirs=()))
    with pytest.raises(MediaAccessError, match="local files are not allowed"):
        none.build_inputs(user(image(media_dir / "a.png")))
    none.build_inputs(user(image(data_url(media_dir / "a.png", "image/png"))))


def test_extreme_aspect_ratio_is_refused(proc, tmp_path):
    Image.new("RGB", (402, 2)).save(tmp_path / "thin.png")
    with pytest.raises(MediaLimitError, match=r"content\[0\].image_url: aspect ratio of 402x2 is over 200:1"):
        proc.build_inputs(user(image(tmp_path / "thin.png")))


def test_media_limits(model_dir, media_dir):
    p = Processor.from_pretrained(model_dir, preset("tiny"), MediaOptions(max_images=1, max_media_bytes=100))
    a = media_dir / "a.png"
    with pytest.raises(MediaLimitError, match="messages: 2 images in the request; the limit is 1"):
        p.build_inputs(user(image(a), image(a)))
    with pytest.raises(MediaLimitError, match="larger than the limit of 100 bytes"):
        p.build_inputs(user(image(a)))


@pytest.mark.parametrize("messages, message", [
    ([], "messages: expected a non-empty list"),
    ([{"role": "robot", "content": "x"}],
     "messages[0].role: expected one of system, developer, user, assistant, tool, got 'robot'"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls: not a field of a user message"),
    ([{"role": "assistant", "content": None}], "messages[0].content: expected a string or a list"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function: expected an object with a 'name' string"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "refusal": "no"}],
     "messages[1].refusal: not supported"),
    ([{"role": "user", "content": 5}], "messages[0].content: expected a string or a list of content parts"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0].type: expected 'text'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text: expected a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     "messages[0].content[0].image_url: expected an object with a 'url' string"),
    ([{"role": "user", "content": "look <|image_pad|>"}], "messages[0].content: contains the reserved token"),
    ([{"role": "system", "content": [image("/x.png")]}], "not allowed in system messages"),
])
def test_message_errors(proc, messages, message):
    with pytest.raises(MessageFormatError) as e:
        proc.build_inputs(messages)
    assert message in str(e.value)


# --------------------------------------------------------------------------------------------------------------------
# Streaming detokenization


def test_incremental_detokenizer_multibyte(proc):
    s = "Héllo 你好🙂 wörld </think>\n\nAnswer: ∑ 🙂🙂"
    ids = proc.encode(s)
    det = proc.detokenizer()
    deltas = [det.add(i) for i in ids]
    deltas.append(det.finish())
    assert "".join(deltas) == s == det.text
    assert not any("\ufffd" in d for d in deltas)
    # The 4 bytes of an emoji are 4 tokens here: nothing comes out until the last one.
    emoji = proc.encode("🙂")
    assert len(emoji) > 1
    det = IncrementalDetokenizer(proc.tokenizer)
    assert [det.add(i) for i in emoji] == [""] * (len(emoji) - 1) + ["🙂"]


def test_incremental_detokenizer_skips_special_and_flushes_partial(proc):
    det = proc.detokenizer()
    assert det.add([IM_START]) == ""
    assert det.add(proc.encode("ok")) == "ok"
    assert det.add(151900) == ""  # inside the model's vocab but not the tokenizer's: decodes to nothing
    partial = proc.encode("🙂")[:2]
    assert det.add(partial) == ""
    assert det.finish() == "\ufffd"  # an unfinished character is flushed as the replacement character


def test_missing_processor_files(tmp_path, model_dir):
    with pytest.raises(ProcessorFilesError, match="model directory not found"):
        Processor.from_pretrained(tmp_path / "nope", preset("tiny"))
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ProcessorFilesError, match="missing processor file.*tokenizer.json, tokenizer_config.json"):
        Processor.from_pretrained(tmp_path, preset("tiny"))


def test_playlist_cannot_reach_files_outside_the_allowed_dir(tmp_path):
    """A playlist (HLS) inside the allowed directory naming a video outside it must not be followed."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    write_video(outside / "secret.mp4", 8, 4)
    (allowed / "clip.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\n{outside}/secret.mp4\n"
                                       "#EXT-X-ENDLIST\n")
    opts = MediaOptions(allowed_local_dirs=(str(allowed),))
    path = resolve_media(str(allowed / "clip.m3u8"), "video", "v", opts)
    with pytest.raises(MediaDecodeError):
        load_video(path, "v")


def test_nul_byte_in_a_path_is_a_url_error():
    with pytest.raises(MediaURLError, match="NUL byte"):
        resolve_media("/tmp/a\x00.png", "image", "img", MediaOptions())


def test_long_high_resolution_video_is_decoded_small():
    from qwen_vl_distributed.engine.media import MAX_DECODED_PIXELS, _frame_size

    w, h = _frame_size(3840, 2160, 768)
    assert w * h * 768 <= MAX_DECODED_PIXELS and abs(w / h - 3840 / 2160) < 0.02
    assert _frame_size(64, 48, 4) == (64, 48)


def test_a_template_refusal_is_a_message_error(model_dir):
    p = Processor.from_pretrained(model_dir, preset("tiny"))
    p.hf.chat_template = "{{ raise_exception('No user query found in messages.') }}"
    with pytest.raises(MessageFormatError, match="the chat template refused them: No user query found"):
        p.build_inputs([{"role": "assistant", "content": "hi"}])


def test_preprocessing_takes_the_process_share_of_cores_where_a_gpu_stage_took_one(proc, media_dir, monkeypatch):
    """After a GPU stage set one intra-op thread for its steps, the driver's image preprocessing still runs on the
    process's share of the cores (4 of 8 for 2 local stages), and the steps' setting is back afterwards; without a
    stage setting, preprocessing leaves torch's threads alone."""
    from qwen_vl_distributed.engine import threads

    seen = []
    real = proc.hf.image_processor

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(proc.hf, "image_processor", spy)
    monkeypatch.setattr(threads, "_preprocess_threads", None)
    before = torch.get_num_threads()
    image = str(media_dir / "a.png")
    try:
        proc.build_from_prompt("hi", [image])
        threads.set_stage_threads(torch.device("cuda", 0), 2, 8)
        assert torch.get_num_threads() == 1
        proc.build_from_prompt("hi", [image])
        assert seen == [before, 4] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------------------
# Sizes known before decoding (engine/prompt_size.py)


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_an_images_tokens_are_known_from_its_header(proc, media_dir, name):
    with Image.open(media_dir / f"{name}.png") as im:
        w, h = im.size
    out = proc.build_inputs(user(image(media_dir / f"{name}.png"), text("?")))
    assert proc.size.image_tokens(w, h) == out.input_ids.count(IMG)


@pytest.mark.parametrize("clip, size", [("clip.mp4", 64), ("odd.mp4", 64), ("wide.mp4", (160, 48))])
def test_a_videos_tokens_are_bounded_from_its_container(proc, media_dir, clip, size):
    from qwen_vl_distributed.engine.media import probe_video

    if not (media_dir / clip).exists():
        write_video(media_dir / clip, n=9, fps=3, size=size)
    out = proc.build_inputs(user(video(media_dir / clip), text("?")))
    gt = out.video_grid_thw.tolist()[0][0]
    bound = proc.size.video_tokens(probe_video(str(media_dir / clip), "v"))
    # per temporal patch: the frame's placeholders exactly, + start, end and at least one timestamp token
    assert bound == out.input_ids.count(VID) + 3 * gt


def _never(*a, **k):
    raise AssertionError("decoded, though the size was known before")


def test_limits_are_checked_before_decoding(model_dir, media_dir, monkeypatch, tmp_path):
    from qwen_vl_distributed.engine import media, processor
    from qwen_vl_distributed.engine.prompt_size import PromptTooLongError

    monkeypatch.setattr(processor, "load_image", _never)
    monkeypatch.setattr(media, "_read_frames", _never)
    p = Processor.from_pretrained(model_dir, preset("tiny"), MediaOptions(max_image_pixels=10_000,
                                                                          max_video_pixels=8 * 64 * 64 - 1))
    Image.new("RGB", (101, 100)).save(tmp_path / "big.png")
    with pytest.raises(MediaLimitError, match=r"content\[0\].image_url: the image is 101x100 = 10100 pixels; the "
                                              "limit is 10000"):
        p.build_inputs(user(image(tmp_path / "big.png")))
    with pytest.raises(MediaLimitError, match=r"content\[1\].video_url: the video's frames hold 32768 pixels"):
        p.build_inputs(user(text("x"), video(media_dir / "clip.mp4")))
    # an image of 64 tokens in a budget of 40: refused from its header, naming it, exactly
    with pytest.raises(PromptTooLongError) as e:
        p.build_inputs(user(text("hi"), image(media_dir / "a.png")), max_tokens=40)
    assert e.value.where == "messages[0].content[1].image_url" and e.value.exact and e.value.tokens > 64
    with pytest.raises(PromptTooLongError) as e:
        Processor(p.hf, preset("tiny")).build_inputs(user(video(media_dir / "clip.mp4")), max_tokens=10)
    assert e.value.where == "messages[0].content[0].video_url" and not e.value.exact


def test_text_longer_than_any_prompt_that_fits_is_refused_before_tokenising(proc, monkeypatch):
    from qwen_vl_distributed.engine.prompt_size import PromptTooLongError

    longest = proc.size.max_token_bytes
    assert longest == max(map(len, proc.tokenizer.get_vocab()))
    monkeypatch.setattr(proc, "encode", _never)
    with pytest.raises(PromptTooLongError) as e:
        proc.build_inputs(user(text("ok"), text("x" * (100 * longest + 1))), max_tokens=100)
    assert e.value.where == "messages[0].content[1].text" and e.value.tokens == 101 and not e.value.exact
    # NFC composes 'e' + U+0301 into one character: the bound counts what the tokenizer will see, not the raw text
    proc.size.check_text([("t", "e\u0301" * 10 * longest)], 10)
    with pytest.raises(PromptTooLongError):
        proc.size.check_text([("t", "e\u0301" * 10 * longest + "e")], 10)


def test_the_decoder_stops_at_the_pixel_limit_whatever_the_container_says(media_dir):
    from qwen_vl_distributed.engine.media import VideoInfo

    lying = VideoInfo(total_frames=8, fps=4, width=8, height=8)  # its frames are really 64 x 64
    with pytest.raises(MediaLimitError, match="the video's frames hold"):
        load_video(str(media_dir / "clip.mp4"), "v", info=lying, opts=MediaOptions(max_video_pixels=3 * 64 * 64))


def test_media_bytes_count_for_the_whole_request(model_dir, media_dir):
    size = (media_dir / "a.png").stat().st_size
    p = Processor.from_pretrained(model_dir, preset("tiny"), MediaOptions(max_media_bytes=size + size // 2))
    p.build_inputs(user(image(media_dir / "a.png")))
    with pytest.raises(MediaLimitError, match=r"content\[1\].image_url: media is larger than the limit"):
        p.build_inputs(user(image(media_dir / "a.png"), image(data_url(media_dir / "a.png", "image/png"))))


def test_an_image_sent_as_a_video_and_lone_surrogates_are_refused(proc, media_dir):
    with pytest.raises(MediaDecodeError, match=r"content\[0\].video_url: not a video \(FFmpeg reads it as an image"):
        proc.build_inputs(user(video(data_url(media_dir / "a.png", "video/mp4"))))
    with pytest.raises(MessageFormatError, match=r"content\[0\].text: not valid Unicode \(a lone surrogate at "
                                                 r"character 1\)"):
        proc.build_inputs(user(text("a\ud800")))


def test_only_common_image_formats_are_read(proc, tmp_path):
    """PIL knows formats that run other programs (EPS: Ghostscript) or few clients send; those are refused."""
    Image.new("RGB", (64, 48)).save(tmp_path / "x.tga")
    (tmp_path / "x.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\nshowpage\n")
    for name in ("x.tga", "x.eps"):
        with pytest.raises(MediaDecodeError, match=r"content\[0\].image_url: cannot decode image: not one of the "
                                                   r"formats this server reads \(PNG, JPEG"):
            proc.build_inputs(user(image(tmp_path / name)))
    for fmt in ("JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        Image.new("RGB", (64, 48)).save(tmp_path / f"x.{fmt}", format=fmt)
        assert len(proc.build_inputs(user(image(tmp_path / f"x.{fmt}"))).image_grid_thw) == 1
