"""XLNet on the shared engine (`common`), imported first: it sets the host allocator before anything starts JAX."""
import common  # noqa: F401  pylint: disable=unused-import
