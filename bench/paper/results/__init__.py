"""The studies' result files (bench/paper/*.py write them), shipped as `snr_triton.results` so that
`snr_triton.claims` reads what was measured."""
