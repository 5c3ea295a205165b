"""Fixtures shared by test modules, and the CI policy (tests/ci_policy.py: no skips under CI=true)."""

# QEMU guest fixtures (guest_kernel, new_guest, shared_guest): see tests/vm/fixtures.py.
from tests.vm.fixtures import guest_kernel, new_guest, shared_guest  # noqa: F401

pytest_plugins = ["tests.ci_policy"]
