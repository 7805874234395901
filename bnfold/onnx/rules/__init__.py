"""Fold rules: one module per pattern (see ``docs/rules.md``); `registry.rules()` lists them in order."""
