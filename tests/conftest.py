"""Shared test helpers."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
PARITY_DIR = os.path.join(SHARED, "data", "reference_parity")
CRITEO_DIR = os.path.join(SHARED, "data", "criteo")

if REPO not in sys.path:  # configs/ is not part of the installed package.
  sys.path.insert(0, REPO)


def load_config(name: str):
  """get_config() of configs/NAME.py."""
  import importlib

  return importlib.import_module(f"configs.{name}").get_config()


@pytest.fixture
def tiny_config():
  return load_config("tiny")
