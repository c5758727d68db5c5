"""Integrations with other libraries (Hugging Face ``Trainer``: :mod:`gallop_kernels.integrations.transformers`)."""
