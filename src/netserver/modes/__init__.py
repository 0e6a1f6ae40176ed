"""One module per concurrency mode, all behind the `Mode` contract in `base`."""
