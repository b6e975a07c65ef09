"""The report's Jinja2 templates. The folder stays at the top of the repository and is installed as the package
`gridlab.templates` (pyproject.toml's package-dir), so every kind of install finds it with importlib.resources."""
