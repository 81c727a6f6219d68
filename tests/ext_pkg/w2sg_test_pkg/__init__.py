"""A user's project as a package: ``extensions: [w2sg_test_pkg.methods]`` lists one module of it, which imports a
helper module of the same package (tests/test_extensions.py edits the helper and expects a new version)."""
