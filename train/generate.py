"""Generate text from a model, streaming it to stdout as the tokens arrive.

    python -m train.generate --model PATH --prompt "text" [--max-new-tokens 64] [--temperature 0.0] [--top-k 0]
                             [--top-p 1.0] [--seed 0] [--dtype float32|bfloat16] [--chat]

PATH is a Hugging Face checkpoint directory (``config.json`` + safetensors + tokenizer files), ``smollm2`` (the
packaged SmolLM2-135M-Instruct, converted on first use), or a training run directory written by
``python -m train.lm`` (its latest checkpoint). ``--chat`` wraps the prompt in the tokenizer's chat template as a
user turn. Compilation time and decoding speed go to stderr at the end.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time


class CliError(Exception):
    """A problem with the command line (reported without a traceback)."""


def load_model(spec: str, dtype: str):
    """``(model, params, tokenizer, stop_ids)`` for ``--model``: an HF directory, ``smollm2`` or a run directory."""
    import jaxeff

    if spec == "smollm2":
        import jaxeff.assets

        path = jaxeff.assets.smollm2_path()
    else:
        path = pathlib.Path(spec).expanduser()
        if not path.exists():
            raise CliError(
                f"--model {spec!r}: no such directory (expected a Hugging Face checkpoint directory, a training run "
                "directory, or 'smollm2')"
            )
        if not path.is_dir():
            raise CliError(f"--model {spec!r} is a file; expected a checkpoint or training run directory")
    if (path / "model.yaml").is_file():  # a training run
        from jaxeff.training import load_run

        model, params, tokenizer = load_run(path, dtype=dtype)
    elif (path / "config.json").is_file():
        model, params = jaxeff.load_pretrained(path, dtype=dtype)
        tokenizer = jaxeff.load_tokenizer(path)
    else:
        raise CliError(
            f"--model {spec!r}: {str(path)!r} has neither config.json (a Hugging Face checkpoint) nor model.yaml "
            "(a training run)"
        )
    stop = {model.config.eos_token_id, getattr(tokenizer, "eos_token_id", None)}
    return model, params, tokenizer, sorted(i for i in stop if i is not None)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of ``prompt``; with ``chat``, of the chat template applied to it as one user turn."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            print("[generate] the tokenizer has no chat template; using the raw prompt", file=sys.stderr)
        else:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            # the template already holds whatever special tokens the model expects
            return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt))


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces. Decodes the whole id list each time and emits the new suffix;
    a trailing U+FFFD (a multi-byte character split across tokens) is held back until its bytes are complete."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._text()
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""  # incomplete character, or decoding of the prefix changed: wait for more tokens
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        """Whatever is left (including replacement characters for bytes that never completed)."""
        text = self._text()
        if not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


class _CompileTimer:
    """Sums JAX's tracing, lowering and backend compilation durations while active."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.seconds = 0.0

    def _listen(self, event, duration, **kwargs):
        if event in self.EVENTS:
            self.seconds += duration

    def __enter__(self):
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._listen)


def run(args, out=None, err=None) -> int:
    import jax

    import jaxeff

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    model, params, tokenizer, stop_ids = load_model(args.model, args.dtype)
    ids = encode_prompt(tokenizer, args.prompt, args.chat)
    if not ids:
        raise CliError("--prompt: the prompt encodes to no tokens")
    decoder = IncrementalDecoder(tokenizer)
    n_tokens, first_token_s = 0, None
    start = time.perf_counter()
    with _CompileTimer() as compile_timer:
        stream = jaxeff.generate_stream(
            model, params, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, stop_tokens=stop_ids, rng=jax.random.key(args.seed),
        )
        for step in stream:
            tok = int(step[0])
            if tok < 0:  # the sequence has stopped
                break
            n_tokens += 1
            if first_token_s is None:
                first_token_s = time.perf_counter() - start
            if tok in stop_ids:
                break
            out.write(decoder.push(tok))
            out.flush()
    total = time.perf_counter() - start
    out.write(decoder.flush() + "\n")
    out.flush()
    decode_s = max(total - compile_timer.seconds, 1e-9)
    print(
        f"[generate] compile {compile_timer.seconds:.2f} s | first token {first_token_s or 0.0:.2f} s | "
        f"{n_tokens} tokens in {total:.2f} s: {n_tokens / total:.1f} tokens/s, "
        f"{n_tokens / decode_s:.1f} tokens/s without compilation | device {jax.devices()[0].platform}",
        file=err,
    )
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="Hugging Face checkpoint directory, 'smollm2', or a training run directory")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxeff.checkpoint import CheckpointError
    from jaxeff.config import ConfigError

    try:
        return run(args)
    except (CliError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
