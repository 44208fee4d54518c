"""Developer tools (not installed): the sm_90 compile check of the Triton kernels."""
