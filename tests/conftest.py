"""Fixtures shared by test modules."""

# QEMU guest fixtures (guest_kernel, new_guest, shared_guest): see tests/vm/fixtures.py.
from tests.vm.fixtures import guest_kernel, new_guest, shared_guest  # noqa: F401
