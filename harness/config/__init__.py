"""The config: its schema (`schema`), the checks run before launch (`checks`), composing it (`compose`)."""
