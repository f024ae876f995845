"""The generic containerd shim runtime: bootstrap, socket, events, shutdown."""
