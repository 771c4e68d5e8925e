"""The channel: what happens to the clients' messages between their training and the server's rule.

Four things FL studies add to almost every experiment, each a few array
operations on the round's stacked messages, so they run inside the round's one
``jit`` and compose with every algorithm whose server reads the clients' mean
message, with ISR and with hybrid rounds:

- :mod:`~isr_jax.fl.channel.dp` — client-level differential privacy (DP-FedAvg,
  McMahan et al. ICLR 2018; adaptive clipping, Andrew et al. NeurIPS 2021), with
  the privacy spent computed by :mod:`~isr_jax.fl.channel.accountant`.
- :mod:`~isr_jax.fl.channel.robust` — robust aggregation rules, and
  :mod:`~isr_jax.fl.channel.attacks`, the malicious clients they are tested against.
- :mod:`~isr_jax.fl.channel.compression` — compressed uplinks (QSGD, top-k with
  error feedback).
- :mod:`~isr_jax.fl.channel.stragglers` — clients that finish part of their local
  work or drop out of the round.

Each module owns its settings (``DEFAULTS`` and ``settings(config)``, as the
algorithms do); :mod:`~isr_jax.fl.channel.spec` collects them into one static
:class:`~isr_jax.fl.channel.spec.ChannelSpec`, and
:mod:`~isr_jax.fl.channel.pipeline` holds the three places the round calls:
before the clients train, as each client sends, and as the server receives.
With every section off the round is the plain round, bit for bit.
"""

from isr_jax.fl.channel.spec import ChannelSpec, channel_defaults, channel_spec

__all__ = ["ChannelSpec", "channel_defaults", "channel_spec"]
