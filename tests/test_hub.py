"""--model ORG/NAME and --revision: resolved in a Hugging Face cache on disk, laid out as huggingface_hub lays it out
(models--ORG--NAME/{blobs, refs/main, snapshots/<commit>/<file> -> ../../blobs/<hash>}), offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from procs import CLI
from qwen_vl_distributed.checkpoint.hub import ModelSourceError, resolve_model
from synth_model import tiny_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"


def add_snapshot(cache, repo: str, commit: str, model_dir: str, ref: str | None = "main") -> str:
    """Put the files of ``model_dir`` into ``cache`` as snapshot ``commit`` of ``repo``; point refs/<ref> at it."""
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(folder, "snapshots", commit)
    os.makedirs(os.path.join(folder, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in os.listdir(model_dir):
        with open(os.path.join(model_dir, name), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        blob = os.path.join(folder, "blobs", digest)
        if not os.path.exists(blob):
            shutil.copyfile(os.path.join(model_dir, name), blob)
        os.symlink(os.path.join("..", "..", "blobs", digest), os.path.join(snapshot, name))
    if ref is not None:
        os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
        with open(os.path.join(folder, "refs", ref), "w") as f:
            f.write(commit)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture
def cache(tmp_path, model_dir, monkeypatch):
    """A cache holding org/tiny at COMMIT (refs/main) and OTHER (refs/v2), as huggingface_hub sees it offline."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    add_snapshot(root, "org/tiny", COMMIT, model_dir)
    add_snapshot(root, "org/tiny", OTHER, model_dir, ref="v2")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def test_repo_id_resolves_to_the_snapshot_refs_main_names(cache):
    src = resolve_model("org/tiny")
    assert (src.repo_id, src.revision, src.name) == ("org/tiny", COMMIT, "org/tiny")
    assert os.path.samefile(src.path, cache / "models--org--tiny" / "snapshots" / COMMIT)
    assert resolve_model("org/tiny", revision="v2").revision == OTHER
    assert resolve_model("org/tiny", revision=OTHER).revision == OTHER


def test_cache_folder_and_snapshot_folder(cache):
    folder = str(cache / "models--org--tiny")
    assert resolve_model(folder).path == os.path.join(folder, "snapshots", COMMIT)
    assert resolve_model(folder, revision="v2").revision == OTHER
    snap = resolve_model(os.path.join(folder, "snapshots", OTHER))
    assert (snap.repo_id, snap.revision) == ("org/tiny", OTHER)


def test_cache_folder_without_refs_says_how(cache):
    folder = cache / "models--org--tiny"
    os.remove(folder / "refs" / "main")
    with pytest.raises(ModelSourceError) as e:
        resolve_model(str(folder))
    assert str(e.value) == (f"{folder}: a Hugging Face cache folder with no refs/main and no snapshot main; its "
                            f"snapshots: {COMMIT}, {OTHER} (pass --revision COMMIT, or --model "
                            f"{folder / 'snapshots' / 'COMMIT'})")


def test_errors_name_what_is_missing(cache, model_dir):
    with pytest.raises(ModelSourceError, match=f"--model org/absent: not found in the Hugging Face cache {cache}; "
                                               "pass --download to fetch it"):
        resolve_model("org/absent")
    with pytest.raises(ModelSourceError, match="--model org/tiny: not found at revision nope in the Hugging Face"):
        resolve_model("org/tiny", revision="nope")
    with pytest.raises(ModelSourceError, match="--download org/absent: HF_HUB_OFFLINE is set"):
        resolve_model("org/absent", download=True)
    with pytest.raises(ModelSourceError, match="--model ./no/such/dir: no such directory, and not a hub repo id"):
        resolve_model("./no/such/dir")
    with pytest.raises(ModelSourceError, match=f"--revision v2: only a hub repo id .* not the directory {model_dir}"):
        resolve_model(model_dir, revision="v2")
    snap = str(cache / "models--org--tiny" / "snapshots" / COMMIT)
    with pytest.raises(ModelSourceError, match=f"--revision v2: --model {snap} is the snapshot of commit {COMMIT}"):
        resolve_model(snap, revision="v2")


def _env(**hub) -> dict:
    """This process's environment with the Hugging Face cache settings replaced by ``hub``."""
    keep = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    return {**keep, **hub}


def _generate(model: str, env: dict, *extra: str) -> dict:
    r = subprocess.run(CLI + ["generate", "--model", model, *extra, "--prompt", "Describe the sky.",
                              "--temperature", "0", "--max-new-tokens", "6", "--quiet", "--json"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_hub_id_gives_the_directorys_tokens_offline(tmp_path, model_dir):
    """Through the CLI, as a user runs it: HF_HOME's hub cache, HF_HUB_OFFLINE=1, two stages."""
    add_snapshot(tmp_path / "home" / "hub", "org/tiny", COMMIT, model_dir)
    want = _generate(model_dir, _env())
    got = _generate("org/tiny", _env(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1"), "--stages", "2")
    assert got["token_ids"] == want["token_ids"] and got["prompt_token_ids"] == want["prompt_token_ids"]


def test_plan_and_inspect_take_a_hub_id(tmp_path, model_dir):
    add_snapshot(tmp_path / "hub", "org/tiny", COMMIT, model_dir)
    env = _env(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    r = subprocess.run(CLI + ["plan", "--model", "org/tiny", "--stages", "2"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("org/tiny: 2 stages, 6 decoder layers")
    r = subprocess.run(CLI + ["inspect", "org/tiny", "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["directory"].endswith(COMMIT)
    r = subprocess.run(CLI + ["plan", "--model", "org/absent", "--stages", "2"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: --model org/absent: not found in the Hugging Face cache")


def test_ranks_that_resolve_different_revisions_refuse_to_start(tmp_path, model_dir):
    """Two 'machines' whose caches' refs/main name different commits (of the same files): the ranks compare the
    resolved commit and refuse, naming it."""
    from qwen_vl_distributed.pipeline.launch import free_port

    port = free_port()
    procs = []
    for rank, commit in enumerate([COMMIT, OTHER]):
        add_snapshot(tmp_path / f"hub{rank}", "org/tiny", commit, model_dir)
        env = {**_env(HF_HUB_CACHE=str(tmp_path / f"hub{rank}"), HF_HUB_OFFLINE="1"), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(CLI + ["generate", "--model", "org/tiny", "--stages", "2", "--prompt", "hi",
                                             "--quiet", "--max-new-tokens", "4"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 3, err.decode()
        assert "start-up agreement failed: the ranks disagree on revision" in err.decode()
        assert "(rank 0, pid" in err.decode() and COMMIT in err.decode() and OTHER in err.decode()


def test_download_is_asked_of_huggingface_hub_only_with_the_flag(cache, monkeypatch):
    """Without --download huggingface_hub may only look in the cache; with it (and HF_HUB_OFFLINE unset) it may
    fetch, limited to the files a run reads."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append(kw)
        return str(cache / "models--org--tiny" / "snapshots" / COMMIT)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    resolve_model("org/tiny")
    resolve_model("org/tiny", revision="v2", download=True)
    assert [(c["local_files_only"], c["revision"]) for c in calls] == [(True, None), (False, "v2")]
    assert set(calls[1]["allow_patterns"]) == {"*.json", "*.safetensors", "*.jinja", "*.txt"}
