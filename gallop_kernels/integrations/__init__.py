"""Integrations with other libraries (bitsandbytes, transformers, ...), imported on demand."""
