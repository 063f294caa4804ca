"""Code both services use: the network, the data, the snapshot format and registry, Redis naming."""
