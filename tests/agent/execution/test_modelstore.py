"""The model store on real files: pulls from a folder, the lock file, rm, verify, names."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.execution.modelfiles import users_of
from agent.execution.modelstore import (
    ModelStore,
    ModelStoreError,
    check_name,
    resolve_models,
    verify_model,
)


def make_model(folder: Path, weights: bytes = b"\x00\x01" * 2000) -> Path:
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: main\n")  # not part of the model
    return folder


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def test_pull_from_a_folder_records_every_file_hash(tmp_path: Path, store: ModelStore) -> None:
    src = make_model(tmp_path / "src")
    result = store.pull_local("llama3.2:3b", src)
    assert result.changed
    lock = json.loads(store.lock_path.read_text())
    (entry,) = lock["models"]
    assert entry["names"] == ["llama3.2:3b"]
    assert entry["source"] == {"kind": "local", "path": str(src.resolve())}
    assert entry["pulled_at"].endswith("+00:00")
    want = {p.relative_to(src).as_posix(): p.read_bytes() for p in
            (src / "config.json", src / "model.safetensors", src / "tokenizer/vocab.txt")}
    assert {f["path"]: (f["size"], f["sha256"]) for f in entry["files"]} == {
        rel: (len(data), hashlib.sha256(data).hexdigest()) for rel, data in want.items()}
    folder = store.folder_of(result.model)
    assert folder.parent == store.root and not (folder / ".git").exists()
    assert (folder / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert store.table() == {"llama3.2:3b": str(folder)}
    assert not list(store.root.glob(".copy-*"))


def test_repull_is_a_noop_and_a_second_name_shares_the_folder(tmp_path: Path,
                                                              store: ModelStore) -> None:
    src = make_model(tmp_path / "src")
    first = store.pull_local("a", src)
    lock_before = store.lock_path.read_text()
    again = store.pull_local("a", src)
    assert not again.changed and store.lock_path.read_text() == lock_before
    other = store.pull_local("b", src)
    assert other.model.folder == first.model.folder and other.model.names == ("a", "b")
    # rm of one name keeps the files the other uses; rm of the last deletes them.
    _, deleted = store.remove("a")
    assert not deleted and store.folder_of(other.model).is_dir()
    _, deleted = store.remove("b")
    assert deleted and not store.folder_of(other.model).exists()
    assert store.models() == [] and not list(store.root.glob(".trash-*"))


def test_pulling_new_content_under_a_name_replaces_the_old_folder(tmp_path: Path,
                                                                  store: ModelStore) -> None:
    old = store.pull_local("m", make_model(tmp_path / "v1", b"one" * 100))
    new = store.pull_local("m", make_model(tmp_path / "v2", b"two" * 100))
    assert new.changed and new.replaced == [old.model.folder]
    assert not store.folder_of(old.model).exists()
    assert (store.folder_of(new.model) / "model.safetensors").read_bytes() == b"two" * 100
    assert [m.names for m in store.models()] == [("m",)]


def test_verify_finds_a_tampered_missing_or_added_file_and_a_repull_repairs(
        tmp_path: Path, store: ModelStore) -> None:
    src = make_model(tmp_path / "src")
    model = store.pull_local("m", src).model
    folder = store.folder_of(model)
    assert verify_model(store, model) == []
    (folder / "model.safetensors").write_bytes(b"\x00\x01" * 1999 + b"\xff\xff")  # same size
    (folder / "tokenizer" / "vocab.txt").unlink()
    (folder / "extra.py").write_text("print('hi')")
    problems = verify_model(store, model)
    assert len(problems) == 3, problems
    assert any(p.startswith("model.safetensors: sha256") for p in problems)
    assert "tokenizer/vocab.txt: missing" in problems
    assert any(p.startswith("extra.py: not in the lock file") for p in problems)
    # Given the damaged copy, when the same content is pulled again, then it is repaired.
    repaired = store.pull_local("m", src)
    assert repaired.changed and verify_model(store, repaired.model) == []


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../b", "a//b", "", ".hidden",
                                  "x" * 129, "bad name", "a\nb", "caf\u00e9", "a/", "-rf"])
def test_hostile_names_are_refused(tmp_path: Path, store: ModelStore, name: str) -> None:
    with pytest.raises(ModelStoreError) as err:
        store.pull_local(name, make_model(tmp_path / "src"))
    assert err.value.code == "bad_model_name"
    assert not store.root.exists() or not any(store.root.iterdir())


@pytest.mark.parametrize("name", ["llama3.2:3b", "gpt2", "meta-llama/Llama-3.2-3B",
                                  "qwen2.5@q4_k_m", "x" * 128])
def test_names_clients_send_are_accepted(name: str) -> None:
    assert check_name(name) == name


def test_a_missing_source_folder_says_what_to_give(tmp_path: Path, store: ModelStore) -> None:
    with pytest.raises(ModelStoreError) as err:
        store.pull_local("m", tmp_path / "nope")
    assert err.value.code == "source_not_found" and "--from" in err.value.message


def test_a_broken_lock_file_is_reported_but_the_agent_keeps_config_models(
        tmp_path: Path) -> None:
    cfg = AgentConfig(cache_dir=tmp_path / "cache", models={"cfg": "/srv/m"})
    cfg.model_store.mkdir(parents=True)
    (cfg.model_store / "models.lock").write_text("{not json")
    with pytest.raises(ModelStoreError) as err:
        ModelStore.of(cfg).models()
    assert err.value.code == "model_store_unreadable"
    assert resolve_models(cfg) == {"cfg": "/srv/m"}


@pytest.mark.parametrize("folder", ["../outside", "/etc", ".trash-x", "a/b"])
def test_a_lock_file_pointing_outside_the_store_is_refused(tmp_path: Path, store: ModelStore,
                                                           folder: str) -> None:
    outside = make_model(tmp_path / "outside")
    store.pull_local("m", make_model(tmp_path / "src"))
    data = json.loads(store.lock_path.read_text())
    data["models"][0]["folder"] = folder
    store.lock_path.write_text(json.dumps(data))
    with pytest.raises(ModelStoreError) as err:
        store.remove("m")
    assert err.value.code == "model_store_unreadable"
    assert outside.is_dir()


def test_resolve_models_merges_the_store_and_config_where_config_wins(tmp_path: Path) -> None:
    cfg = AgentConfig(cache_dir=tmp_path / "cache",
                      models={"shared": "/srv/operator-choice", "only-config": "/srv/c"})
    assert cfg.model_store == tmp_path / "cache" / "models"
    store = ModelStore.of(cfg)
    stored = store.pull_local("shared", make_model(tmp_path / "a")).model
    store.pull_local("only-store", make_model(tmp_path / "b", b"other"))
    table = resolve_models(cfg)
    assert table["shared"] == "/srv/operator-choice"
    assert table["only-config"] == "/srv/c"
    assert Path(table["only-store"]).parent == store.root
    assert Path(table["only-store"]) != store.folder_of(stored)


def test_users_of_sees_a_process_holding_a_model_file(tmp_path: Path,
                                                      store: ModelStore) -> None:
    folder = store.folder_of(store.pull_local("m", make_model(tmp_path / "src")).model)
    assert users_of(folder) == []
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1], 'rb'); print('open', "
         "flush=True); sys.stdin.read()", str(folder / "model.safetensors")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        assert users_of(folder) == [holder.pid]
    finally:
        holder.communicate("", timeout=10)
    assert users_of(folder) == []
