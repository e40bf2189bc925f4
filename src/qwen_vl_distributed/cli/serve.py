"""``qwen-vl serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of S pipeline stages.

Binds to 127.0.0.1 unless --host says otherwise. Local media files are refused unless a directory is allowed with
--allowed-local-media (repeatable); images and videos can always be sent as base64 data URLs.

SIGTERM or Ctrl-C drains: new requests get 503, running ones have --shutdown-grace seconds to finish, then every
process exits (status 0). If a stage dies or hangs, every open request gets an error and the command exits with
status 3, naming the stage, for its supervisor (systemd, Kubernetes) to restart it.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError
from ..pipeline.transport import StageFailure
from .options import add_run_args, model_source, run_options

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _count(text: str) -> int:
    """A count such as 64000000, 64e6 or 8000x8000."""
    try:
        parts = [float(x) for x in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 64e6 or 8000x8000, got {text!r}") from None
    n = 1.0
    for x in parts:
        n *= x
    return int(n)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default 8000; 0: any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send (default: the hub repo id, else the model folder's name)")
    p.add_argument("--allowed-local-media", action="append", default=[], metavar="DIR",
                   help="directory whose files requests may name as images/videos (repeatable; default: none)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    limits = p.add_argument_group("limits", "what one request may carry and how long it may take (docs/server.md)")
    limits.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="requests waiting for a slot or being preprocessed, beyond --max-batch running; more "
                             "get 503 (default 64)")
    limits.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request (default 8)")
    limits.add_argument("--max-videos", type=int, default=2, metavar="N", help="videos per request (default 2)")
    limits.add_argument("--max-media-mb", type=float, default=64.0, metavar="MB",
                        help="megabytes of all images and videos of one request together (default 64)")
    limits.add_argument("--max-image-pixels", type=_count, default=64_000_000, metavar="N",
                        help="width x height of one image, read from its header before decoding (default 64e6)")
    limits.add_argument("--max-video-pixels", type=_count, default=8_000_000_000, metavar="N",
                        help="frames x width x height that decoding one video goes through, from its container "
                             "before decoding (default 8e9: about 2 minutes of 1080p at 30 fps)")
    limits.add_argument("--request-timeout", type=float, default=None, metavar="SEC",
                        help="seconds a request may take from arrival to its last token; a client may ask for less "
                             "with the X-Request-Timeout header (default: none)")
    limits.add_argument("--shutdown-grace", type=float, default=20.0, metavar="SEC",
                        help="at SIGTERM / Ctrl-C, seconds running requests have to finish before they are ended "
                             "(default 20)")
    p.set_defaults(run=run)


def _media_options(args):
    from ..engine.media import MediaOptions

    for d in args.allowed_local_media:
        if not os.path.isdir(d):
            raise UserError(f"--allowed-local-media {d}: not a directory")
    return MediaOptions(max_images=args.max_images, max_videos=args.max_videos,
                        max_media_bytes=int(args.max_media_mb * 1e6), max_image_pixels=args.max_image_pixels,
                        max_video_pixels=args.max_video_pixels,
                        allowed_local_dirs=tuple(os.path.abspath(d) for d in args.allowed_local_media))


def _check_limits(args) -> None:
    for flag in ("max_queue", "max_images", "max_videos", "max_media_mb", "max_image_pixels", "max_video_pixels",
                 "shutdown_grace"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise UserError(f"--request-timeout {args.request_timeout}: must be > 0")


def run(args) -> int:
    from ..engine.build import start_engine, torchrun_worker

    source = model_source(args)
    opts = run_options(args, source)
    status = torchrun_worker(opts)
    if status is not None:  # a stage other than 0, started by torchrun: no HTTP here
        return status
    _check_limits(args)
    media = _media_options(args)
    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    from ..engine.processor import Processor
    from ..model.config import load_config

    processor = Processor.from_pretrained(opts.model, load_config(opts.model), media)  # before any process starts
    handle = start_engine(opts)
    try:
        service = _serve(args, opts, handle, processor, source.name)
    except BaseException:
        handle.abort()
        raise
    if service.failure is not None:  # a stage died or hung: every process stops, and so do we, non-zero
        handle.abort()
        raise StageFailure(f"serving stopped: {service.failure}")
    if service.engine.thread_running:  # stuck in a step: an orderly 'stop' could race it
        handle.abort()
    else:
        handle.close()
    return 0


def _serve(args, opts, handle, processor, model_name: str):
    import uvicorn

    from ..engine.build import read_generation_config
    from ..server.app import ServerSettings, create_app
    from ..server.lifecycle import Service

    name = args.served_model_name or model_name
    settings = ServerSettings(model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                              generation_config=read_generation_config(opts.model),
                              request_timeout_s=args.request_timeout)
    app = create_app(handle.engine, processor, settings)
    state = app.state.server
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    service = Service(config, state.admission, state.engine, args.shutdown_grace,
                      on_listening=lambda url: print(f"serving {name!r} ({opts.stages} stage(s)) on {url}/v1",
                                                     file=sys.stderr, flush=True))
    service.run()
    return service
