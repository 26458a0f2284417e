"""Store formats: the token store (``stores.tokens``), the logit store (``stores.logits``: schema, writer,
verify, info) and its reader (``stores.reader``). Import from those modules; this package re-exports nothing."""
