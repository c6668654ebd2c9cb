"""Method plug-ins: one module per method (see methods/README.md)."""
