"""The package layout pyproject.toml cannot state: the packages found, plus two data packages mapped onto the
checkout's top-level folders, so an installed wheel carries the kernel sources (``dit_gspn/csrc``, built on
first use) and the presets (``dit_gspn/configs``) while the checkout keeps ``csrc/`` and ``configs/`` where
users know them. ``dit_gspn.resources`` finds either copy. Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

#: Installed data package -> the checkout folder it is built from.
DATA_PACKAGES = {"dit_gspn.csrc": "csrc", "dit_gspn.configs": "configs"}

setup(
    packages=find_packages(include=["dit_gspn", "dit_gspn.*", "evaluation", "evaluation.*"]) + list(DATA_PACKAGES),
    package_dir=DATA_PACKAGES,
    package_data={"dit_gspn.csrc": ["**/*.h", "**/*.cuh", "**/*.cpp", "**/*.cu"], "dit_gspn.configs": ["*.yaml"]},
)
