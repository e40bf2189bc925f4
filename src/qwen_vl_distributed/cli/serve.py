"""``qwen-vl serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of S pipeline stages.

Binds to 127.0.0.1 unless --host says otherwise. Local media files are refused unless a directory is allowed with
--allowed-local-media (repeatable); images and videos can always be sent as base64 data URLs.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError
from .options import add_run_args, model_source, run_options

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send (default: the hub repo id, else the model folder's name)")
    p.add_argument("--allowed-local-media", action="append", default=[], metavar="DIR",
                   help="directory whose files requests may name as images/videos (repeatable; default: none)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a slot beyond --max-batch running; more get 503 (default 64)")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request (default 8)")
    p.add_argument("--max-videos", type=int, default=2, metavar="N", help="videos per request (default 2)")
    p.add_argument("--max-media-mb", type=float, default=64.0, metavar="MB",
                   help="size limit of one image/video (default 64)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run)


def _media_options(args):
    from ..engine.media import MediaOptions

    for d in args.allowed_local_media:
        if not os.path.isdir(d):
            raise UserError(f"--allowed-local-media {d}: not a directory")
    if args.max_images < 0 or args.max_videos < 0 or args.max_queue < 0:
        raise UserError("--max-images, --max-videos and --max-queue must be >= 0")
    return MediaOptions(max_images=args.max_images, max_videos=args.max_videos,
                        max_media_bytes=int(args.max_media_mb * 1e6),
                        allowed_local_dirs=tuple(os.path.abspath(d) for d in args.allowed_local_media))


def run(args) -> int:
    from ..engine.build import start_engine, torchrun_worker

    source = model_source(args)
    opts = run_options(args, source)
    status = torchrun_worker(opts)
    if status is not None:  # a stage other than 0, started by torchrun: no HTTP here
        return status
    media = _media_options(args)
    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    from ..engine.processor import Processor
    from ..model.config import load_config

    processor = Processor.from_pretrained(opts.model, load_config(opts.model), media)  # before any process starts
    handle = start_engine(opts)
    try:
        app = _serve(args, opts, handle, processor, source.name)
    except BaseException:
        handle.abort()
        raise
    if app.state.server.engine.thread_running:  # stuck in a step: an orderly 'stop' could race it
        handle.abort()
    else:
        handle.close()
    return 0


def _serve(args, opts, handle, processor, model_name: str):
    import uvicorn

    from ..engine.build import read_generation_config
    from ..server.app import ServerSettings, create_app

    name = args.served_model_name or model_name
    # room for every allowed image and video as base64 (4/3 of its bytes), plus the text
    body_limit = int((args.max_images + args.max_videos) * args.max_media_mb * 1e6 * 4 / 3) + 16 * 2**20
    settings = ServerSettings(model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                              generation_config=read_generation_config(opts.model), max_body_bytes=body_limit)
    app = create_app(handle.engine, processor, settings)
    print(f"serving {name!r} ({opts.stages} stage(s)) on http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return app
