"""How long a prompt will be, known before its text is tokenised or its media decoded.

A request whose prompt cannot fit is refused while that is still cheap: from the length of its text, then from its
images' headers and its videos' containers (``media.open_image`` / ``media.probe_video``). The estimates are lower
bounds, so nothing that fits is ever refused here; the exact count after tokenisation has the last word.

- Text: a byte-level BPE token covers at most ``L`` bytes of the normalised text, ``L`` the longest token in the
  vocabulary, so ``tokens >= bytes / L >= characters / L``. (A tokenizer with an unknown token, which can cover any
  length, gets no text bound.)
- An image: exactly the tokens the checkpoint's image processor will make of its width and height.
- A video: per temporal patch the tokens of one resized frame plus 3 (its start and end tokens and at least one
  token of its timestamp text), with the frames sampled from the container's count and rate, and resized the way
  the video processor does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator

from .media import RequestError, VideoInfo, _frame_size, pad_to_multiple, sample_frame_indices


class PromptTooLongError(RequestError):
    """The prompt cannot fit in ``budget`` tokens. ``where`` names the part that pushed it over ("messages" for the
    whole text); ``tokens`` is the prompt's length (exact) or a lower bound (``exact`` False) at that part."""

    def __init__(self, where: str, tokens: int, budget: int, exact: bool, what: str = ""):
        self.where, self.tokens, self.budget, self.exact, self.what = where, tokens, budget, exact, what
        super().__init__(f"{where}: {self.describe()}; at most {budget} tokens fit")

    def describe(self) -> str:
        """e.g. 'with this image (13000x13000: 16384 tokens) the prompt is at least 16402 tokens'"""
        return f"{self.what}the prompt is {'' if self.exact else 'at least '}{self.tokens} tokens"


@dataclass(frozen=True)
class Part:
    """A medium the prompt will hold: its kind, where it is in the request, and its size from its header."""

    kind: str  # 'image' | 'video'
    where: str
    width: int
    height: int
    video: VideoInfo | None = None


class PromptSize:
    """Lower bounds on a prompt's token count, from a processor's tokenizer, image and video processors."""

    def __init__(self, hf_processor: Any, video_sampling: dict):
        self.hf = hf_processor
        self.video_sampling = video_sampling
        vp = hf_processor.video_processor
        self.patch, self.merge, self.temporal = vp.patch_size, vp.merge_size, vp.temporal_patch_size

    @cached_property
    def max_token_bytes(self) -> int | None:
        """The longest token of the vocabulary (byte-level BPE: its length in bytes); None without a bound."""
        tok = self.hf.tokenizer
        if tok.unk_token_id is not None:
            return None
        return max(map(len, tok.get_vocab()))

    def check_text(self, texts: list[tuple[str, str]], budget: int) -> None:
        """``texts``: (where, text) of every text part. Refuse when their characters alone prove the prompt too
        long; the normaliser (which may compose characters) runs only when the raw count says so."""
        longest = self.max_token_bytes
        if longest is None or sum(len(t) for _, t in texts) <= budget * longest:
            return
        norm = getattr(self.hf.tokenizer.backend_tokenizer, "normalizer", None)
        chars = 0
        for where, text in texts:
            chars += len(norm.normalize_str(text)) if norm is not None else len(text)
            if chars > budget * longest:
                raise PromptTooLongError(where, math.ceil(chars / longest), budget, False,
                                         f"with {chars} characters of text ")

    def check_media(self, text_tokens: int, parts: list[Part], budget: int) -> None:
        """``text_tokens``: the rendered template's tokens, each medium still one placeholder (a video three).
        Refuse, naming the first part at which the prompt's lower bound passes ``budget``."""
        total, exact = text_tokens, True
        for part, added, what in self._added(parts):
            total += added
            exact = exact and part.kind == "image"  # (an image's count is exact, a video's a lower bound)
            if total > budget:
                raise PromptTooLongError(part.where, total, budget, exact, what)

    def _added(self, parts: list[Part]) -> Iterator[tuple[Part, int, str]]:
        for part in parts:
            if part.kind == "image":
                n = self.image_tokens(part.width, part.height)
                yield part, n - 1, f"with this image ({part.width}x{part.height}: {n} tokens) "
            else:
                n = self.video_tokens(part.video)
                yield part, n - 3, f"with this video ({part.video.total_frames} frames of {part.width}x" \
                                   f"{part.height}: at least {n} tokens) "

    def image_tokens(self, width: int, height: int) -> int:
        """The image's placeholder tokens, as the image processor will resize it."""
        return self.hf.image_processor.get_number_of_image_patches(height, width, {}) // self.merge**2

    def video_tokens(self, info: VideoInfo) -> int:
        """A lower bound on the video's tokens in the prompt (release format: per temporal patch, its timestamp text,
        start, the frame's placeholders and end)."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        s = self.video_sampling
        indices = sample_frame_indices(info.total_frames, info.fps, s["fps"], s["min_frames"], s["max_frames"])
        n = len(pad_to_multiple(indices, self.temporal))
        per_frame = 0
        if info.width and info.height:  # (unknown until decoded: count the frames' fixed tokens only)
            w, h = _frame_size(info.width, info.height, len(set(indices)))
            size = self.hf.video_processor.size
            rh, rw = smart_resize(n, h, w, self.temporal, self.patch * self.merge, size["shortest_edge"],
                                  size["longest_edge"])
            per_frame = (rh // self.patch) * (rw // self.patch) // self.merge**2
        return n // self.temporal * (per_frame + 3)
