"""Efficient-vDiT stage 2: the layer-wise mask search.

For each layer in order, try the Attention Tile masks from the sparsest (fewest reference frames) to the densest and
keep the sparsest whose effect on the model's final output stays within a threshold ``r``:

    err_l(k) = E[ |y_full - y_{l <- k}|^2 ] / E[ |y_full|^2 ]          (relative output error)

over a few calibration inputs. Two criteria (``criterion``):

* ``"output"``: ``y`` is the model's output on noised clips at a few timesteps, with their captions (one step);
* ``"sample"``: ``y`` is the clip a sampler produces (by default a short guided DDIM run of the teacher; a
  few-step student passes its own sampler) from fixed noise and captions, and the error is
  relative to the clips' variance around their own mean. Errors compound over sampling steps and guidance
  amplifies them, so one-step errors of a few percent can still change the samples a lot (measured on the tiny
  teacher: uniform ``k = 1`` has a 1.7% one-step error but moves the Fréchet distance of its samples from 164 to
  thousands); this criterion sees what sampling will do. The pipeline's default.

Documented choices where the paper's Algorithm 1 was not available:

* the error is relative to the output's energy, so ``r`` does not depend on the output scale (``r = 0`` keeps
  every layer dense, ``r = inf`` puts every layer at its sparsest candidate);
* greedy-sequential by default: layers already decided keep their masks while later ones are searched (the
  errors compound the way they will at inference); ``greedy=False`` searches each layer alone;
* candidates ``k = min_k .. max_k`` (default ``1 .. T/2``, the paper's ladders), then dense.

The search runs the masked-dense equivalent of the sparse attention (a token mask built from the tile mask inside
one compiled function), so the whole ladder costs one compilation; the block-sparse kernels compute the same
function (tested) and serve the chosen masks afterwards.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxeff.attention.tile_masks import attention_tile_mask, attention_tile_sparsity


@dataclasses.dataclass
class SearchResult:
    layer_k: tuple            # chosen k per layer (None = dense)
    errors: dict              # {layer: {k: relative error}} for every candidate tried (k = None: dense)
    threshold: float
    sparsity: float           # mean tile sparsity over layers

    def to_json(self) -> dict:
        return {"layer_k": list(self.layer_k), "threshold": self.threshold, "sparsity": self.sparsity,
                "errors": {str(l): {("dense" if k is None else str(k)): v for k, v in e.items()}
                           for l, e in self.errors.items()}}


def masked_dense_attention(q, k, v, token_mask):
    """Attention with a boolean ``[N, N]`` token mask (q/k/v ``[B, H, N, D]``, scale ``D ** -0.5``)."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    s = jnp.where(token_mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def make_masked_forward(model, num_frames: int, tokens_per_frame: int):
    """``fn(params, z, t, text, tile_masks bool [L, T, T]) -> sample``: the model with every layer's attention
    restricted to its (traced) frame-tile mask. One compilation serves every mask assignment."""
    S = tokens_per_frame

    def forward(params, z, t, text, tile_masks):
        def hook(q, k, v, layer_index):
            tm = tile_masks[layer_index]
            token_mask = jnp.repeat(jnp.repeat(tm, S, axis=0), S, axis=1)
            return masked_dense_attention(q, k, v, token_mask)

        return model.apply(params, z, t, text, self_attention=hook).sample

    return jax.jit(forward)


def make_masked_sampler(model, num_frames: int, tokens_per_frame: int, diffusion=None, steps: int = 10,
                        guidance_scale: Optional[float] = None, sample_fn=None):
    """``fn(params, z_T, text, tile_masks bool [L, T, T]) -> clips``: a sampler with every layer's attention
    restricted to its traced frame-tile mask. ``sample_fn(params, z_T, text, self_attention) -> clips`` is the
    sampler (traceable); by default the teacher's DDIM sampler (``steps`` steps, classifier-free guidance, from
    ``diffusion``)."""
    if sample_fn is None:
        if diffusion is None:
            raise ValueError("make_masked_sampler: give the teacher's diffusion config or a sample_fn")
        from jaxeff.training.vdit import sample_clips

        def sample_fn(params, z_T, text, self_attention):
            return sample_clips(model, params, text, diffusion, None, steps=steps, guidance_scale=guidance_scale,
                                self_attention=self_attention, z_T=z_T)

    S = tokens_per_frame

    def sample(params, z_T, text, tile_masks):
        def hook(q, k, v, layer_index):
            tm = tile_masks[layer_index]
            return masked_dense_attention(q, k, v, jnp.repeat(jnp.repeat(tm, S, axis=0), S, axis=1))

        return sample_fn(params, z_T, text, hook)

    return jax.jit(sample)


def search_layer_k(model, params, calib: Sequence[tuple], *, num_frames: int, tokens_per_frame: int,
                   threshold: float, min_k: int = 1, max_k: Optional[int] = None, greedy: bool = True,
                   progress: bool = True, criterion: str = "output", diffusion=None, sample_steps: int = 10,
                   guidance_scale: Optional[float] = None, sample_fn=None) -> SearchResult:
    """Stage 2. ``calib``: for ``criterion="output"``, batches ``(z [n, C, F, H, W], t [n] float, text [n, L, D])``;
    for ``"sample"``, batches ``(z_T, text)`` and either ``diffusion`` (the teacher's ``DiffusionConfig``: its guided
    DDIM sampler) or ``sample_fn(params, z_T, text, self_attention) -> clips`` (any traceable sampler, e.g. a
    few-step student's). Returns the chosen ``k`` per layer and every error measured."""
    T = num_frames
    L = model.config.num_layers
    max_k = T // 2 if max_k is None else max_k
    if threshold < 0:
        raise ValueError(f"threshold: expected r >= 0, got {threshold}")
    if not 0 <= min_k <= max_k < T:
        raise ValueError(f"min_k/max_k: expected 0 <= min_k <= max_k < num_frames={T}, got {min_k}, {max_k}")
    if not calib:
        raise ValueError("calib: expected at least one calibration batch")
    if criterion == "output":
        forward = make_masked_forward(model, T, tokens_per_frame)

        def run(masks: np.ndarray) -> list:
            return [forward(params, z, t, text, jnp.asarray(masks)) for z, t, text in calib]
    elif criterion == "sample":
        if diffusion is None and sample_fn is None:
            raise ValueError("search_layer_k: criterion='sample' needs the teacher's diffusion config or a sample_fn")
        sampler = make_masked_sampler(model, T, tokens_per_frame, diffusion, sample_steps, guidance_scale, sample_fn)

        def run(masks: np.ndarray) -> list:
            return [sampler(params, z, text, jnp.asarray(masks)) for z, text in calib]
    else:
        raise ValueError(f"criterion: expected 'output' or 'sample', got {criterion!r}")
    full = np.ones((T, T), bool)
    candidates = {k: attention_tile_mask(T, k) for k in range(min_k, max_k + 1)}

    dense_masks = np.broadcast_to(full, (L, T, T)).copy()
    y_full = run(dense_masks)
    if criterion == "sample":  # the clips' variance around their own mean (background pixels carry no signal)
        energy = sum(float(jnp.mean(jnp.square(y - jnp.mean(y, axis=tuple(range(1, y.ndim)), keepdims=True))))
                     for y in y_full)
    else:
        energy = sum(float(jnp.mean(jnp.square(y))) for y in y_full)

    def rel_err(ys) -> float:
        return sum(float(jnp.mean(jnp.square(a - b))) for a, b in zip(ys, y_full)) / max(energy, 1e-30)

    chosen: list = [None] * L
    errors: dict = {}
    current = dense_masks.copy()
    bar = tqdm(total=L * len(candidates), desc="mask search", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for l in range(L):
        errors[l] = {}
        for k, tm in candidates.items():  # sparsest first
            trial = (current if greedy else dense_masks).copy()
            trial[l] = tm
            err = rel_err(run(trial))
            errors[l][k] = err
            bar.update(1)
            if err <= threshold:
                chosen[l] = k
                break
        else:
            errors[l][None] = 0.0 if not greedy else rel_err(run(current))
        if chosen[l] is not None:
            bar.update(len(candidates) - len(errors[l]))
            current[l] = candidates[chosen[l]]
    bar.close()
    sparsity = float(np.mean([0.0 if k is None else attention_tile_sparsity(T, k) for k in chosen]))
    return SearchResult(tuple(chosen), errors, float(threshold), sparsity)
