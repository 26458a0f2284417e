"""Store formats: the token store (tokens.zarr) and the logit store (logits.zarr)."""

from stores.tokens import TokenStore, TokenStoreError, window_starts, write_token_store

__all__ = ["TokenStore", "TokenStoreError", "window_starts", "write_token_store"]

from stores.logits import (  # noqa: E402
    PAD_LOGP,
    LogitStoreError,
    incomplete_reason,
    store_info,
    verify_store,
)

__all__ += ["LogitStoreError", "LogitStoreReader", "PAD_LOGP", "incomplete_reason", "store_info", "verify_store"]


def __getattr__(name: str):
    # The reader needs torch; `store info` / `store verify` should not pay for importing it.
    if name == "LogitStoreReader":
        from stores.reader import LogitStoreReader

        return LogitStoreReader
    raise AttributeError(f"module 'stores' has no attribute {name!r}")
