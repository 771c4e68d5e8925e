"""Building blocks of models that are not models themselves, one job per module.

* :mod:`isr_jax.nn.lowering`: which convolution lowering runs where (impl names,
  size thresholds, :func:`~isr_jax.nn.lowering.textbook_lowering`);
* :mod:`isr_jax.nn.conv`: the convolution lowerings with their custom VJPs, and the
  :class:`~isr_jax.nn.conv.Conv` layer;
* :mod:`isr_jax.nn.dense`: :func:`~isr_jax.nn.dense.matmul` and ``linear``;
* :mod:`isr_jax.nn.pooling`: max, average and global average pools;
* :mod:`isr_jax.nn.norm`: ``group_norm``;
* :mod:`isr_jax.nn.compiler`: XLA compiler options for training rounds.

Models (:mod:`isr_jax.models`) and the federated engine (:mod:`isr_jax.fl`) both
build on these; the engine never imports a model module.
"""
