"""Loading images and videos named by request URLs: data URLs, file:// URLs and plain local paths.

There is no network here, so http(s) URLs are refused with a message that says so. Every error is a
``RequestError`` whose one-line message starts with ``where`` (e.g. ``messages[0].content[1].image_url``), so the
server can answer 400 and the CLI can print it as is.

Videos are decoded with PyAV and sampled the way Qwen3-VL's video processor does (§7.3 of the reference):
n = int(total / video_fps * fps) clamped to [min_frames, max_frames] and to total, indices
round(linspace(0, total - 1, n)), then padded to an even count by repeating the last frame.

Sizes are checked before anything is decoded: an image's width and height come from its header (``open_image``), a
video's frame count, rate and frame size from its container (``probe_video``), so that a small request cannot make
the server decode gigabytes of pixels before it is refused.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import os
import re
import urllib.parse
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError


class RequestError(UserError, ValueError):
    """A request (chat messages, media, sampling parameters) that cannot be served as sent."""


class MessageFormatError(RequestError):
    """Messages that are not OpenAI-style chat messages."""


class MediaURLError(RequestError):
    """A media URL that is malformed or uses a scheme we cannot fetch."""


class MediaAccessError(RequestError):
    """A local media file that is missing or outside the allowed directories."""


class MediaDecodeError(RequestError):
    """Media bytes that are not a decodable image / video."""


class MediaLimitError(RequestError):
    """A request over a media limit (count or size)."""


@dataclass(frozen=True)
class MediaOptions:
    """Limits on request media. ``None`` means unlimited / any local path (the CLI); the server sets them."""

    max_images: int | None = None
    max_videos: int | None = None
    max_media_bytes: int | None = None  # all images and videos of one request together, as bytes (base64 decoded)
    max_image_pixels: int | None = None  # width x height of one image, from its header, before decoding
    max_video_pixels: int | None = None  # frames x width x height that decoding one video goes through
    # Local files may only be read from inside these directories; None: anywhere, (): no local files at all.
    allowed_local_dirs: tuple[str, ...] | None = None


@dataclass
class VideoClip:
    """Sampled frames of one video. frames: uint8 [T, 3, H, W] with T even; indices: source frame of each row."""

    frames: torch.Tensor
    indices: list[int]
    video_fps: float
    total_frames: int

    def timestamps(self, temporal_patch: int = 2) -> list[float]:
        """Seconds of each temporal patch: the mean time of its first and last frame."""
        idx = self.indices
        return [(idx[k] + idx[k + temporal_patch - 1]) / 2 / self.video_fps for k in range(0, len(idx), temporal_patch)]


# --------------------------------------------------------------------------------------------------------------------
# URLs -> bytes or a local path


def _too_large(where: str, opts: MediaOptions) -> MediaLimitError:
    return MediaLimitError(f"{where}: media is larger than the limit of {opts.max_media_bytes} bytes (all images "
                           "and videos of a request together)")


def _data_url_bytes(url: str, kind: str, where: str, opts: MediaOptions, room: int | None) -> bytes:
    """Decode ``data:<kind>/<fmt>;base64,<payload>``; ``kind`` is 'image' or 'video'. ``room``: bytes this
    request may still carry (None: no limit)."""
    header, sep, payload = url[len("data:"):].partition(",")
    params = header.split(";")
    if not sep or params[-1].strip().lower() != "base64":
        raise MediaURLError(f"{where}: not a valid base64 data URL")
    mediatype = params[0].strip().lower()
    if mediatype and not mediatype.startswith(kind + "/") and mediatype != "application/octet-stream":
        raise MediaURLError(f"{where}: expected a data URL of type {kind}/*, got {mediatype!r}")
    if room is not None and len(payload) * 3 // 4 > room + 3:  # checked before decoding (3: base64 padding)
        raise _too_large(where, opts)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MediaURLError(f"{where}: not a valid base64 data URL") from None
    if room is not None and len(data) > room:
        raise _too_large(where, opts)
    return data


def _check_local_path(path: str, where: str, opts: MediaOptions, room: int | None) -> str:
    if "\x00" in path:
        raise MediaURLError(f"{where}: the path contains a NUL byte")
    real = os.path.realpath(path)
    if opts.allowed_local_dirs is not None:
        if not opts.allowed_local_dirs:
            raise MediaAccessError(f"{where}: local files are not allowed; send the media as a base64 data URL")
        roots = [os.path.realpath(d) for d in opts.allowed_local_dirs]
        # Checked before existence, so that files outside the allowed directories cannot be probed.
        if not any(os.path.commonpath([real, root]) == root for root in roots):
            raise MediaAccessError(f"{where}: local path {path!r} is outside the allowed directories")
    if not os.path.isfile(real):
        raise MediaAccessError(f"{where}: file not found: {path!r}")
    if room is not None and os.path.getsize(real) > room:
        raise _too_large(where, opts)
    return real


def media_size(source: bytes | str) -> int:
    """Bytes of a resolved medium (``resolve_media``'s result)."""
    return len(source) if isinstance(source, bytes) else os.path.getsize(source)


def resolve_media(url: object, kind: str, where: str, opts: MediaOptions, used: int = 0) -> bytes | str:
    """The media's bytes (data URL) or a checked local file path (file:// URL or plain path). ``used``: bytes of
    the request's media resolved before this one (they count against ``opts.max_media_bytes`` together)."""
    room = None if opts.max_media_bytes is None else opts.max_media_bytes - used
    if not isinstance(url, str) or not url.strip():
        raise MediaURLError(f"{where}: expected a non-empty URL string")
    url = url.strip()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if url[:5].lower() == "data:":
        return _data_url_bytes(url, kind, where, opts, room)
    if scheme in ("http", "https"):
        raise MediaURLError(f"{where}: remote URLs cannot be fetched (this server has no network access); "
                            f"send the {kind} as a base64 data URL or a file:// path")
    if scheme == "file":
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaURLError(f"{where}: file URL with a remote host {parts.netloc!r} is not supported")
        return _check_local_path(urllib.parse.unquote(parts.path), where, opts, room)
    # A one-letter "scheme" is a Windows drive, i.e. a plain path.
    if scheme and len(scheme) > 1:
        raise MediaURLError(f"{where}: unsupported URL scheme {scheme!r} (use a data URL, file:// URL or local path)")
    return _check_local_path(url, where, opts, room)


# --------------------------------------------------------------------------------------------------------------------
# Images


def sample_image_path() -> str:
    """A small bundled test image (64x48 PNG) for demos and tests."""
    from importlib.resources import files

    return str(files("qwen_vl_distributed") / "assets" / "sample.png")


MAX_ASPECT_RATIO = 200  # Qwen's smart_resize refuses anything more elongated


def _check_aspect(width: int, height: int, where: str) -> None:
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise MediaLimitError(f"{where}: aspect ratio of {width}x{height} is over {MAX_ASPECT_RATIO}:1")


def _why(e: Exception) -> str:
    """A library's error, for a client: its type and message without object reprs (``<... at 0x7f..>``)."""
    return f"{type(e).__name__}: " + re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(e))


# The raster formats PIL may read for a request. Not every format it knows: some hand the data to other programs
# (EPS runs Ghostscript) or are rarely seen outside laboratories, and each is more parser exposed to any client.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")  # (JPEG covers MPO, from cameras)


@functools.cache
def _image_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this Pillow reads (AVIF is recent)."""
    from PIL import Image

    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def open_image(source: bytes | str, where: str, opts: MediaOptions):
    """The image with only its header read (PIL opens lazily), its size checked against the limits."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=_image_formats())
    except UnidentifiedImageError:
        raise MediaDecodeError(f"{where}: cannot decode image: not one of the formats this server reads "
                               f"({', '.join(_image_formats())})") from None
    except Image.DecompressionBombError:
        raise MediaLimitError(f"{where}: the image has more pixels than this server decodes") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaDecodeError(f"{where}: cannot decode image ({_why(e)})") from None
    _check_aspect(img.width, img.height, where)
    pixels = img.width * img.height
    if opts.max_image_pixels is not None and pixels > opts.max_image_pixels:
        raise MediaLimitError(f"{where}: the image is {img.width}x{img.height} = {pixels} pixels; the limit is "
                              f"{opts.max_image_pixels}")
    return img


def load_image(img, where: str):
    """Decode an image that ``open_image`` opened (mode conversion is left to the checkpoint's image processor, as in
    HF)."""
    from PIL import Image

    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaDecodeError(f"{where}: cannot decode image ({_why(e)})") from None
    return img


# --------------------------------------------------------------------------------------------------------------------
# Videos


def sample_frame_indices(total: int, video_fps: float, fps: float = 2, min_frames: int = 4,
                         max_frames: int = 768) -> list[int]:
    """Qwen3-VL's uniform fps sampling (before padding to an even count)."""
    n = int(total / video_fps * fps)
    n = min(max(n, min_frames), max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def pad_to_multiple(indices: list[int], multiple: int = 2) -> list[int]:
    """Repeat the last index until the count is a multiple of the temporal patch."""
    return indices + [indices[-1]] * (-len(indices) % multiple)


# Container formats that name other files or URLs (playlists, concatenation lists): following them would read
# outside the allowed directories (or, on a networked host, fetch URLs), so they are refused.
_REFERENCING_FORMATS = ("hls", "concat", "ffconcat", "dash", "tee")
# Frames are decoded straight to at most this many pixels in all (uint8 RGB: 3 bytes each): the video processor
# shrinks them far below that anyway, and full-resolution frames of a long 4K video would not fit in memory.
MAX_DECODED_PIXELS = 4 * 25_165_824


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says before any frame is decoded (width and height 0: not stated)."""

    total_frames: int
    fps: float
    width: int
    height: int


def _open_container(source: bytes | str, where: str):
    import av

    # A Python file object, never a path: FFmpeg then cannot resolve names inside the file relative to it.
    container = av.open(io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb"))
    names = container.format.name.split(",")
    if set(names) & set(_REFERENCING_FORMATS):
        container.close()
        raise MediaDecodeError(f"{where}: container format {container.format.name!r} refers to other files; "
                               "send the video itself")
    if any(n in ("image2", "image2pipe") or n.endswith("_pipe") for n in names):  # FFmpeg's image readers
        container.close()
        raise MediaDecodeError(f"{where}: not a video (FFmpeg reads it as an image, format {container.format.name}); "
                               "send images as image_url parts")
    return container


def _check_video_pixels(pixels: int, where: str, opts: MediaOptions) -> None:
    if opts.max_video_pixels is not None and pixels > opts.max_video_pixels:
        raise MediaLimitError(f"{where}: the video's frames hold {pixels} pixels (frames x width x height); the "
                              f"limit is {opts.max_video_pixels}")


def probe_video(source: bytes | str, where: str, opts: MediaOptions = MediaOptions()) -> VideoInfo:
    """Frame count, rate and frame size from the container, checked against the limits; nothing is decoded. Without
    a stated frame count the packets are counted (demuxing, not decoding)."""
    import av

    try:
        with _open_container(source, where) as container:
            if not container.streams.video:
                raise MediaDecodeError(f"{where}: no video stream in the file")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise MediaDecodeError(f"{where}: cannot determine the video's frame rate")
            width, height = stream.codec_context.width, stream.codec_context.height
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    except av.FFmpegError as e:
        raise MediaDecodeError(f"{where}: cannot decode video ({_why(e)})") from None
    if total < 1:
        raise MediaDecodeError(f"{where}: the video has no frames")
    if width and height:  # (a stream that does not state them is checked frame by frame as it is decoded)
        _check_aspect(width, height, where)
    _check_video_pixels(int(total) * width * height, where, opts)
    return VideoInfo(int(total), float(rate), width, height)


def _frame_size(width: int, height: int, n_frames: int) -> tuple[int, int]:
    """The decode size: the original, shrunk (aspect kept) so that all frames fit MAX_DECODED_PIXELS."""
    cap = MAX_DECODED_PIXELS // max(n_frames, 1)
    if width * height <= cap:
        return width, height
    scale = (cap / (width * height)) ** 0.5
    return max(2, int(width * scale)), max(2, int(height * scale))


def _read_frames(source: bytes | str, wanted: list[int], where: str,
                 opts: MediaOptions) -> tuple[dict[int, np.ndarray], int]:
    """Decode up to the last wanted frame; returns {index: uint8 [H, W, 3]} and how many frames were decoded. The
    pixels decoded count against ``opts.max_video_pixels`` as they come, so a container that under-states its
    frames' size or number cannot make the decoder go through more."""
    wanted_set, last = set(wanted), max(wanted)
    out: dict[int, np.ndarray] = {}
    size = None
    count = pixels = 0
    with _open_container(source, where) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            count = i + 1
            pixels += frame.width * frame.height
            _check_video_pixels(pixels, where, opts)
            if i in wanted_set:
                # Reformat to the first kept frame's size so a mid-stream resolution change still stacks.
                size = size or _frame_size(frame.width, frame.height, len(wanted_set))
                out[i] = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
            if i >= last:
                break
    return out, count


def load_video(source: bytes | str, where: str, fps: float = 2, min_frames: int = 4, max_frames: int = 768,
               temporal_patch: int = 2, info: VideoInfo | None = None,
               opts: MediaOptions = MediaOptions()) -> VideoClip:
    """Decode and sample a video; frames padded to a multiple of ``temporal_patch``. ``info``: its
    ``probe_video`` (probed here when not given)."""
    import av

    info = info or probe_video(source, where, opts)
    try:
        total = info.total_frames
        indices = sample_frame_indices(total, info.fps, fps, min_frames, max_frames)
        frames, decoded = _read_frames(source, indices, where, opts)
        if len(frames) < len(set(indices)):
            # The container over-stated its frame count: sample again from the frames that really exist.
            if decoded < 1:
                raise MediaDecodeError(f"{where}: the video has no decodable frames")
            total = decoded
            indices = sample_frame_indices(total, info.fps, fps, min_frames, max_frames)
            frames, _ = _read_frames(source, indices, where, opts)
    except av.FFmpegError as e:
        raise MediaDecodeError(f"{where}: cannot decode video ({_why(e)})") from None
    indices = pad_to_multiple(indices, temporal_patch)
    _check_aspect(frames[indices[0]].shape[1], frames[indices[0]].shape[0], where)
    stacked = torch.from_numpy(np.stack([frames[i] for i in indices])).permute(0, 3, 1, 2).contiguous()
    return VideoClip(frames=stacked, indices=indices, video_fps=info.fps, total_frames=total)
