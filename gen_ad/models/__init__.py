"""Pure nn.Module networks of every family (no optimisers, losses or IO)."""
