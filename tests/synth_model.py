"""A synthetic tiny model directory shared by the tests of one session (written once per pytest run)."""

from __future__ import annotations


from qwen_vl_distributed.cli.synth import synthesize


def tiny_model_dir(tmp_path_factory, name: str = "tiny", **kw) -> str:
    d = tmp_path_factory.getbasetemp() / f"model-{name}"
    if not (d / "config.json").exists():
        synthesize(str(d), **kw)
    return str(d)
