"""The @triton.jit kernels, one concern per file. Launchers live one level up in `gallop_kernels.ops`."""
