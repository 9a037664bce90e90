# Shared fixtures for tests/ and integrations/*/tests/ live in the package, written once.
pytest_plugins = ["gmsa_rag.pytest_plugin"]
