"""p2pcold: CoLD Fusion (collaborative descent) as a peer-to-peer trainer over hivemind."""

__version__ = "0.1.0"
