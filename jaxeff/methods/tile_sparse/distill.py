"""Efficient-vDiT stage 3: knowledge distillation from the dense teacher into the sparse student.

The student starts from the teacher's weights and runs with the searched masks; it learns to reproduce the
teacher's final output and each layer's self-attention output on noised training clips:

    L = α · mean |f_s - f_t|^2  +  β · mean_l mean |A_s^l - A_t^l|^2  (+ γ · denoising loss on the data)

(the spec's "layerwise knowledge distillation"; the weights are documented defaults, α = 1, β = 1, γ = 0, since the
paper's were not recoverable). With full masks and the teacher's weights the loss is exactly 0.

Guided distillation (``guidance_scale=w``): a sampler with classifier-free guidance consumes
``f_u + w (f_c - f_u)``, in which an error of the unconditional branch weighs ``w - 1`` times as much as with no
guidance, yet caption dropout shows that branch only a tenth of the batches. With ``w`` set, every batch is run in
both branches (captions and empty captions), the final-output term is taken on the guided outputs and the
per-layer term averages both branches: the student is distilled on what the guided sampler reads.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def kd_loss(model, student_params, teacher_params, z, t, text, student_attention, *, alpha: float = 1.0,
            beta: float = 1.0, gamma: float = 0.0, target=None, teacher_attention=None,
            guidance_scale: Optional[float] = None):
    """``(loss, metrics)`` of one distillation batch. ``target``: the denoising target of the data (needed when
    ``gamma > 0``; with ``guidance_scale`` it is compared with the conditional branch). ``guidance_scale``: distil
    the guided output (see the module docstring); ``None``: the outputs for ``text`` as given. The teacher pass is
    not differentiated."""
    if gamma > 0 and target is None:
        raise ValueError("kd_loss: gamma > 0 needs the denoising target")
    B = z.shape[0]
    if guidance_scale is not None:
        z = jnp.concatenate([z, z])
        t = jnp.concatenate([t, t])
        text = jnp.concatenate([text, jnp.zeros_like(text)])
    t_out = model.apply(teacher_params, z, t, text, self_attention=teacher_attention,
                        return_attention_outputs=beta > 0)
    f_t = jax.lax.stop_gradient(t_out.sample)
    s_out = model.apply(student_params, z, t, text, self_attention=student_attention,
                        return_attention_outputs=beta > 0)
    f_s = s_out.sample
    if guidance_scale is not None:
        f_t, f_s = _guided(f_t, B, guidance_scale), _guided(f_s, B, guidance_scale)
    final = jnp.mean(jnp.square(f_s - f_t))
    loss = alpha * final
    metrics = {"kd_final": final}
    if beta > 0:
        a_t = jax.tree.map(jax.lax.stop_gradient, t_out.attention_outputs)
        per_layer = jax.tree.map(lambda a, b: jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))),
                                 s_out.attention_outputs, a_t)
        leaves = jax.tree.leaves(per_layer)
        attn = sum(leaves) / len(leaves)
        loss = loss + beta * attn
        metrics["kd_attn"] = attn
    if gamma > 0:
        data = jnp.mean(jnp.square(s_out.sample[:B] - target))
        loss = loss + gamma * data
        metrics["kd_data"] = data
    metrics["loss"] = loss
    return loss, metrics


def _guided(out: jax.Array, batch: int, w: float) -> jax.Array:
    """The classifier-free-guided output of a doubled batch ``[conditional; unconditional]``."""
    cond, uncond = out[:batch], out[batch:]
    return uncond + w * (cond - uncond)
