"""abdoreg: chain the registration toolkit's MONAI bundles, and make synthetic data."""
