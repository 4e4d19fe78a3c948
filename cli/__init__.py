"""The `dantinox-eqx` command line: thin Click commands over the `dantinox_eqx` library."""
