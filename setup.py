"""Packages by discovery: every package under onnxstack/, plus the CLI, which lives in cli/ and installs as
onnxstack.cli (pyproject.toml holds everything else)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["onnxstack", "onnxstack.*"]) + ["onnxstack.cli"],
      package_dir={"onnxstack.cli": "cli"})
