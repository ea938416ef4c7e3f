"""The benchmark suite (not part of the test run): `./scripts/bench.sh`."""
