"""Efficient-vDiT stage 3: knowledge distillation from the dense teacher into the sparse student.

The student starts from the teacher's weights and runs with the searched masks; it learns to reproduce the
teacher's final output and each layer's self-attention output on noised training clips:

    L = α · mean |f_s - f_t|^2  +  β · mean_l mean |A_s^l - A_t^l|^2  (+ γ · denoising loss on the data)

(the spec's "layerwise knowledge distillation"; the weights are documented defaults, α = 1, β = 1, γ = 0, since the
paper's were not recoverable). With full masks and the teacher's weights the loss is exactly 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kd_loss(model, student_params, teacher_params, z, t, text, student_attention, *, alpha: float = 1.0,
            beta: float = 1.0, gamma: float = 0.0, target=None, teacher_attention=None):
    """``(loss, metrics)`` of one distillation batch. ``target``: the denoising target of the data (needed when
    ``gamma > 0``). The teacher pass is not differentiated."""
    t_out = model.apply(teacher_params, z, t, text, self_attention=teacher_attention,
                        return_attention_outputs=beta > 0)
    f_t = jax.lax.stop_gradient(t_out.sample)
    s_out = model.apply(student_params, z, t, text, self_attention=student_attention,
                        return_attention_outputs=beta > 0)
    final = jnp.mean(jnp.square(s_out.sample - f_t))
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
        if target is None:
            raise ValueError("kd_loss: gamma > 0 needs the denoising target")
        data = jnp.mean(jnp.square(s_out.sample - target))
        loss = loss + gamma * data
        metrics["kd_data"] = data
    metrics["loss"] = loss
    return loss, metrics
