"""Store formats: the token store (tokens.zarr) and the logit store (logits.zarr)."""

from stores.tokens import TokenStore, TokenStoreError, window_starts, write_token_store

__all__ = ["TokenStore", "TokenStoreError", "window_starts", "write_token_store"]
