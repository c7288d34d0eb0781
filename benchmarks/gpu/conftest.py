"""The GPU kit is its own gate project (pyproject.toml here): collected only when pytest runs from this folder.

``pytest benchmarks`` from the repository root (the repository's demo ladder) leaves these tests out.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path, config):
    if config.rootpath != HERE:
        return True
    return None
